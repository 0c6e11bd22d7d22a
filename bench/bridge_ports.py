"""Where a bridge port's kernel time goes, at 0 and at N ports on one Linux bridge.

Run in the VM (root, L2TP):
    tests/vm/run bench/bridge_ports.py [N]

Each step of one L2TP port's build is its own request here (a lease sends
MTU, master and up as one), timed for ROUNDS x SAMPLE scratch ports at 0
live and again with N ports on the bridge, with the bridge's multicast
snooping on (the kernel's default) and off (netifd's default, and the
bridge microbroker makes), the two interleaved so that both see the same
kernel. What bench/scale.py calls "the kernel alone" grows with N here;
the table says which request grows.
"""

import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from microbroker import l2tp, procsys, rtnl  # noqa: E402
from nsutil import Namespaces, inside, run, wait_for  # noqa: E402

EXIT6 = "fc00:1::1"
BR = "br-bench"
SAMPLE = 20
ROUNDS = 3
STEPS = ("tunnel", "session", "ipv6 off", "mtu", "master", "up", "isolated")
SCRATCH = 60001


def build(l2, rt, i, times=None):
    """One port, each step timed into times[step]."""
    name = "p%d" % i
    steps = (
        lambda: l2.create_tunnel(i, i, EXIT6, "fc00:2::%x" % i),
        lambda: l2.create_session(i, i, i, ifname=name),
        lambda: procsys.disable_ipv6(name),
        lambda: rt.set_mtu(name, 1400),
        lambda: rt.set_master(name, BR),
        lambda: rt.set_up(name),
        lambda: rt.set_isolated(name, True),
    )
    for label, step in zip(STEPS, steps):
        t0 = time.perf_counter()
        step()
        if times is not None:
            times[label].append(time.perf_counter() - t0)


def gone(lo, hi):
    return not any(os.path.exists("/sys/class/net/p%d" % i) for i in range(lo, hi))


def sample(ns, l2, rt, snooping):
    """SAMPLE scratch ports built and removed again, the kernel done with them."""
    run("ip", "link", "set", BR, "type", "bridge", "mcast_snooping", snooping, ns=ns)
    times = {s: [] for s in STEPS}
    for i in range(SCRATCH, SCRATCH + SAMPLE):
        build(l2, rt, i, times)
    for i in range(SCRATCH, SCRATCH + SAMPLE):
        l2.delete_tunnel(i)
    assert wait_for(lambda: gone(SCRATCH, SCRATCH + SAMPLE), 60)
    return times


def both(ns, l2, rt):
    """{snooping: {step: [seconds]}}, on and off interleaved ROUNDS times."""
    out = {"1": {s: [] for s in STEPS}, "0": {s: [] for s in STEPS}}
    for _ in range(ROUNDS):
        for snooping in ("1", "0"):
            for step, xs in sample(ns, l2, rt, snooping).items():
                out[snooping][step] += xs
    return out


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    nss = Namespaces()
    try:
        ns = nss.add("x")
        run("ip", "link", "add", "d0", "type", "dummy", ns=ns)
        run("ip", "-6", "addr", "add", EXIT6 + "/64", "dev", "d0", "nodad", ns=ns)
        run("ip", "link", "set", "d0", "up", ns=ns)
        run("ip", "-6", "route", "add", "fc00:2::/64", "dev", "d0", ns=ns)
        run("modprobe", "l2tp_eth")
        run("modprobe", "l2tp_ip6")
        with inside(ns), l2tp.L2TP() as l2, rtnl.Rtnl() as rt:
            rt.add_bridge(BR, "02:6d:42:00:00:01")
            rt.set_up(BR)
            sample(ns, l2, rt, "1")          # warm: the first ports load code
            at0 = both(ns, l2, rt)
            t0 = time.perf_counter()
            for i in range(1, n + 1):
                build(l2, rt, i)
            fill = time.perf_counter() - t0
            atn = both(ns, l2, rt)
    finally:
        nss.cleanup()
    print("%d ports on one bridge, built in %.1f s; median of %d per cell, ms"
          % (n, fill, ROUNDS * SAMPLE))
    print()
    print("%-12s %14s %14s %14s %14s" % ("request", "snoop on: 0", "at %d" % n,
                                         "snoop off: 0", "at %d" % n))
    total = {k: [0.0, 0.0] for k in ("1", "0")}
    for step in STEPS:
        row = []
        for k in ("1", "0"):
            a = statistics.median(at0[k][step]) * 1e3
            b = statistics.median(atn[k][step]) * 1e3
            total[k][0] += a
            total[k][1] += b
            row += ["%6.2f" % a, "%6.2f %5.2fx" % (b, b / a)]
        print("%-12s %14s %14s %14s %14s" % (step, *row))
    row = []
    for k in ("1", "0"):
        a, b = total[k]
        row += ["%6.2f" % a, "%6.2f %5.2fx" % (b, b / a)]
    print("%-12s %14s %14s %14s %14s" % ("sum", *row))


if __name__ == "__main__":
    main()
