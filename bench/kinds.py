"""Per-lease setup and teardown for each tunnel kind, beside L2TPv3.

Run in the VM (needs root and the modules):   tests/vm/run bench/kinds.py [N]

For every kind: N leases through the exit's Dataplane (the broker's path:
netlink, bridge port or routes, isolation), then the same interfaces made
with `ip` subprocesses as a baseline. Ratios are against L2TPv3's
Dataplane figures and against each kind's own `ip` path, all measured in
this run.
"""

import os
import re
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from microbroker import dataplane  # noqa: E402
from microbroker.leases import LeaseStore  # noqa: E402
from nsutil import Namespaces, inside, run, wait_for  # noqa: E402

KINDS = ("l2tpv3", "ip6gretap", "ip6tnl")
EXIT6 = "fc00::1"


def ours(kind, n, tmp):
    svc = SimpleNamespace(name="b" + kind, kind=kind, bridge="", isolate=True,
                          restrict="none", ports=[], mtu=1280)
    cfg = SimpleNamespace(tunnel_ids=(1, 4000), filter="", services={svc.name: svc})
    store = LeaseStore(os.path.join(tmp, "leases-" + kind), tunnel_ids=(1, 4000),
                       session_ids=(1, 4000), max_leases=n + 1, max_per_client=n + 1)
    leases = [store.allocate("fc00::%x" % (i + 2), svc.name, kind, "ip", EXIT6, 1280,
                             3600)[0] for i in range(n)]
    dp = dataplane.Dataplane(cfg)
    up, down = [], []
    for lease in leases:
        t0 = time.perf_counter()
        dp.up(lease, svc)
        up.append(time.perf_counter() - t0)
    for lease in leases:
        t0 = time.perf_counter()
        dp.down(lease)
        down.append(time.perf_counter() - t0)
    return up, down


def with_ip(kind, n):
    """The same links with iproute2, one `ip` process per step as a shell
    script would do it."""
    run("ip", "link", "add", "ipbr0", "type", "bridge")
    run("ip", "link", "set", "ipbr0", "up")
    up, down = [], []
    for i in range(n):
        t, name, remote = 5000 + i, "ip%d" % i, "fc00::%x" % (i + 2)
        t0 = time.perf_counter()
        if kind == "l2tpv3":
            run("ip", "l2tp", "add", "tunnel", "tunnel_id", t, "peer_tunnel_id", t, "encap", "ip",
                "local", EXIT6, "remote", remote)
            run("ip", "l2tp", "add", "session", "name", name, "tunnel_id", t, "session_id", t,
                "peer_session_id", t)
        elif kind == "ip6gretap":
            run("ip", "link", "add", name, "type", "ip6gretap", "local", EXIT6, "remote",
                remote, "ikey", t, "okey", t, "encaplimit", "none")
        else:
            run("ip", "link", "add", name, "type", "ip6tnl", "mode", "any", "local", EXIT6,
                "remote", remote, "encaplimit", "none")
        if kind == "ip6tnl":
            run("ip", "link", "set", name, "mtu", 1280, "up")
        else:
            run("ip", "link", "set", name, "mtu", 1280, "master", "ipbr0", "up")
            run("bridge", "link", "set", "dev", name, "isolated", "on")
        up.append(time.perf_counter() - t0)
    for i in range(n):
        t0 = time.perf_counter()
        if kind == "l2tpv3":
            run("ip", "l2tp", "del", "tunnel", "tunnel_id", 5000 + i)
        else:
            run("ip", "link", "del", "ip%d" % i)
        down.append(time.perf_counter() - t0)
    run("ip", "link", "del", "ipbr0")
    return up, down


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    ns = Namespaces()
    tmp = tempfile.mkdtemp()
    res = {}
    try:
        ex, cl = ns.add("x"), ns.add("c")
        ns.link(ex, cl, EXIT6 + "/64", "fc00::2/64")
        with inside(ex):
            for kind in KINDS:
                res[kind] = ours(kind, n, tmp) + with_ip(kind, n)
                assert wait_for(lambda: not re.search(r"^\d+: mb\d", run("ip", "-o", "link"),
                                                      re.M)
                                and run("ip", "l2tp", "show", "tunnel").strip() == "", 60)
    finally:
        ns.cleanup()
    med = {k: [statistics.median(x) * 1000 for x in v] for k, v in res.items()}
    base_up, base_down = med["l2tpv3"][0], med["l2tpv3"][1]
    print("per-lease setup/teardown by kind, N=%d each (medians, ms)" % n)
    print("%-10s %9s %11s %10s %11s %12s %13s" % (
        "kind", "up", "up/l2tpv3", "down", "down/l2tpv3", "ip up/ours", "ip down/ours"))
    for kind in KINDS:
        up, down, ip_up, ip_down = med[kind]
        print("%-10s %9.2f %10.2fx %10.2f %10.2fx %11.1fx %12.1fx" % (
            kind, up, up / base_up, down, down / base_down, ip_up / up, ip_down / down))


if __name__ == "__main__":
    main()
