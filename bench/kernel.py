"""Exit-side lease setup/teardown: our netlink path against `ip` subprocesses.

Run in the VM (needs root and L2TP):   tests/vm/run bench/kernel.py [N]
Each lease is a tunnel + Ethernet session + bridge enslave + MTU + link up.
"""

import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from microbroker import l2tp, rtnl  # noqa: E402
from nsutil import Namespaces, inside, run, wait_for  # noqa: E402

EXIT6, CLIENT6 = "fc00::1", "fc00::2"


def ours(n, base):
    up, down = [], []
    with l2tp.L2TP() as l2, rtnl.Rtnl() as rt:
        for i in range(n):
            tid = base + i
            t0 = time.perf_counter()
            l2.create_tunnel(tid, tid, EXIT6, CLIENT6)
            l2.create_session(tid, tid, tid, ifname="mb%d" % tid)
            rt.setup_port("mb%d" % tid, "mbbr0", mtu=1280)
            up.append(time.perf_counter() - t0)
        for i in range(n):
            t0 = time.perf_counter()
            l2.delete_tunnel(base + i)
            down.append(time.perf_counter() - t0)
    return up, down


def ip(*args):
    subprocess.run(["ip"] + [str(a) for a in args], check=True)


def subprocs(n, base):
    up, down = [], []
    for i in range(n):
        tid = base + i
        t0 = time.perf_counter()
        ip("l2tp", "add", "tunnel", "tunnel_id", tid, "peer_tunnel_id", tid, "encap", "ip",
           "local", EXIT6, "remote", CLIENT6)
        ip("l2tp", "add", "session", "name", "mb%d" % tid, "tunnel_id", tid, "session_id", tid,
           "peer_session_id", tid)
        ip("link", "set", "dev", "mb%d" % tid, "mtu", 1280, "master", "mbbr0", "up")
        up.append(time.perf_counter() - t0)
    for i in range(n):
        t0 = time.perf_counter()
        ip("l2tp", "del", "tunnel", "tunnel_id", base + i)
        down.append(time.perf_counter() - t0)
    return up, down


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    ns = Namespaces()
    try:
        ex, cl = ns.add("x"), ns.add("c")
        ns.link(ex, cl, EXIT6 + "/64", CLIENT6 + "/64")
        with inside(ex):
            with rtnl.Rtnl() as rt:
                rt.add_bridge("mbbr0")
                rt.set_up("mbbr0")
            # Subprocesses forked from this thread inherit its netns.
            sub_up, sub_down = subprocs(n, 10000)
            assert wait_for(lambda: run("ip", "l2tp", "show", "tunnel").strip() == "", 30)
            our_up, our_down = ours(n, 20000)
            assert wait_for(lambda: run("ip", "l2tp", "show", "tunnel").strip() == "", 30)
    finally:
        ns.cleanup()
    ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    print("exit-side lease, N=%d, median per lease (ms)" % n)
    print("%-10s %12s %12s %12s" % ("path", "setup", "teardown", "setup+down"))
    rows = (("ip", sub_up, sub_down), ("netlink", our_up, our_down))
    for name, u, d in rows:
        print("%-10s %12.2f %12.2f %12.2f" % (name, ms(u), ms(d), ms(u) + ms(d)))
    print("%-10s %11.1fx %11.1fx %11.1fx" % (
        "ratio", ms(sub_up) / ms(our_up), ms(sub_down) / ms(our_down),
        (ms(sub_up) + ms(sub_down)) / (ms(our_up) + ms(our_down))))


if __name__ == "__main__":
    main()
