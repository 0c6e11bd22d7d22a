"""Exit dataplane at scale: N leases up, a no-op reconcile, N leases down.

Run in the VM (needs root and L2TP):   tests/vm/run bench/dataplane.py [N]
Goal: a no-op reconcile of 500 live leases under 0.5 s in the VM.
"""

import os
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


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    ns = Namespaces()
    tmp = tempfile.mkdtemp()
    rows = []
    try:
        ex, cl = ns.add("x"), ns.add("c")
        ns.link(ex, cl, "fc00::1/64", "fc00::2/64")
        for restrict in ("none", "dns+web"):
            svc = SimpleNamespace(name="exit", kind="l2tpv3", bridge="", isolate=True,
                                  restrict=restrict,
                                  ports=[80, 443], mtu=1280)
            cfg = SimpleNamespace(tunnel_ids=(1, 4000), filter="", services={"exit": svc})
            store = LeaseStore(os.path.join(tmp, "leases-" + restrict), tunnel_ids=(1, 4000),
                               session_ids=(1, 4000), max_leases=n + 1, max_per_client=n + 1)
            leases = [store.allocate("fc00::%x" % (i + 2), "exit", "l2tpv3", "ip", "fc00::1",
                                     1280, 3600)[0] for i in range(n)]
            with inside(ex):
                dp = dataplane.Dataplane(cfg)
                up = []
                for lease in leases:
                    t0 = time.perf_counter()
                    dp.up(lease, svc)
                    up.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                report = dp.reconcile(store.leases(), [svc])
                rec = time.perf_counter() - t0
                assert not any(report.values()), report     # nothing to change
                down = []
                for lease in leases:
                    t0 = time.perf_counter()
                    dp.down(lease)
                    down.append(time.perf_counter() - t0)
                assert wait_for(lambda: run("ip", "l2tp", "show", "tunnel").strip() == "", 60)
            rows.append((restrict, dp.filters().name, up, down, rec))
    finally:
        ns.cleanup()
    print("exit dataplane, N=%d leases (tunnel+session+bridge+isolation+filters)" % n)
    print("%-9s %-8s %14s %14s %12s %18s" % ("restrict", "filter", "up med (ms)", "down med (ms)",
                                             "up total (s)", "no-op reconcile (s)"))
    for restrict, fname, up, down, rec in rows:
        print("%-9s %-8s %14.2f %14.2f %12.1f %18.3f" % (
            restrict, fname, statistics.median(up) * 1000, statistics.median(down) * 1000,
            sum(up), rec))


if __name__ == "__main__":
    main()
