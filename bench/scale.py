"""The exit at 1,000 leases: per-lease time by live count, reconcile, restart, rebuild.

Run in the VM (root, L2TP, the lease file on tmpfs):
    tests/vm/run exec /work/main/.venv/bin/python bench/scale.py [-p] [N]

-p: cProfile of one no-op reconcile and of the restart's serve, top entries.

Leases go through the broker (Broker.lease with the real Dataplane and a
lease file, as `serve` does); the live ones between the measured points
are filled in through the store and the dataplane directly, which is the
same kernel work without the HTTP-free policy layer. Goals (issue 17):
per-lease at N live <= 1.3x at 0 (beside it, the baseline: the
kernel's own time for the same four requests at each point, sent
straight from this process); no-op reconcile at 1,000 <= 0.5 s;
restart answers offers within 1 s and drops no tunnel; a restricted lease
<= 2x an unrestricted one. The restart runs twice: from the source tree,
which the VM reads over 9p (each file a start opens is a round trip
through the emulator), and from a copy in the VM's memory, as the package
sits on an exit's own filesystem; the interpreter's own modules come over
9p in both, and in the baselines.
"""

import http.client
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from microbroker import broker as mb, config as mbconfig, dataplane, l2tp, reconcile, wiring  # noqa: E402
from nsutil import Namespaces, inside, run, wait_for  # noqa: E402

from benchutil import exit_and_client, package_copy  # noqa: E402 (beside this file)

EXIT6 = "fc00:1::1"
SAMPLE = 20
ROUNDS = 3      # of SAMPLE per point: the VM's medians of 20 moved 30-49 ms

CONFIG = """
config broker 'main'
	option state_dir '%(state)s'
	list listen '[%(exit)s]:8053'
	option tunnel_ids '1-4000'
	option session_ids '1-4000'
	option max_leases '5000'
	option max_per_client '4'
	option sweep_interval '3600'
	option log 'stderr'
config service 'exit'
	option endpoint '%(exit)s'
	option lifetime '7200'
	option capacity '1020'
config service 'web'
	option endpoint '%(exit)s'
	option lifetime '7200'
	option restrict 'dns+web'
	option capacity '100'
"""


def client(i):
    return "fc00:1::%x" % (0x1000 + i)


def median_ms(xs):
    return statistics.median(xs) * 1000 if xs else float("nan")


class Exit:
    def __init__(self, ns, path):
        self.ns, self.path = ns, path
        self.open()
        self.n = 0              # clients used so far

    def open(self):
        self.cfg = mbconfig.load(self.path)
        self.store = wiring.open_store(self.cfg)
        self.dp = dataplane.Dataplane(self.cfg)
        self.broker = mb.Broker(self.cfg, self.store, self.dp)

    def lease(self, service="exit"):
        """One lease through the broker: (seconds, client, answer)."""
        c = client(self.n)
        self.n += 1
        with inside(self.ns):
            t0 = time.perf_counter()
            v = self.broker.lease(c, service=service)
            return time.perf_counter() - t0, c, v

    def release(self, leases):
        with inside(self.ns):
            for _t, c, v in leases:
                self.broker.release(c, v["lease_id"], v["secret"])
        # The kernel finishes deleting tunnels, then their ports, on a
        # workqueue (holding the rtnl lock a dump waits for): what is
        # measured next starts on a kernel that is done.
        assert wait_for(lambda: len(self.tunnels()) == self.store.count(), 60)
        assert wait_for(lambda: self.ports() == self.store.count(), 60)

    def ports(self):
        """Bridge ports named for a lease (the prefix, then digits)."""
        from microbroker import rtnl
        with inside(self.ns), rtnl.Rtnl() as rt:
            return sum(1 for p in rt.bridge_ports()
                       if p.name.startswith("mb") and p.name[2:].isdigit())

    def fill(self, upto):
        """Live leases up to `upto` the direct way; dataplane.up times."""
        svc = self.cfg.services["exit"]
        times = []
        with inside(self.ns):
            while self.store.count() < upto:
                c = client(self.n)
                self.n += 1
                lease, _s, _r = self.store.allocate(c, "exit", "l2tpv3", "ip", EXIT6, svc.mtu,
                                                    svc.lifetime)
                t0 = time.perf_counter()
                self.dp.up(lease, svc)
                times.append(time.perf_counter() - t0)
                self.store.update(lease.lease_id, state="up")
        return times

    def tunnels(self):
        with inside(self.ns), l2tp.L2TP() as l2:
            return {t.tunnel_id for t in l2.tunnels(stats=False)}


def kernel_alone(ex, live, rows, k=20):
    """The baseline for a lease at `live`: the four netlink requests of an
    L2TP lease's build (tunnel, session, MTU + master + up, isolated) and
    its one /proc/sys write (the port's IPv6 off) sent
    straight from this process for k scratch ports on the same bridge, ids
    outside the broker's range; removed again before the broker's sample.
    k stays within the bridge's 1,023 ports at 1,000 live."""
    from microbroker import procsys, rtnl
    br = dataplane.bridge_name(ex.cfg.services["exit"])
    times = []
    with inside(ex.ns), l2tp.L2TP() as l2, rtnl.Rtnl() as rt:
        for i in range(60001, 60001 + k):
            t0 = time.perf_counter()
            l2.create_tunnel(i, i, EXIT6, "fc00:1::e%03x" % (i - 60000))
            l2.create_session(i, i, i, ifname="kb%d" % i)
            procsys.disable_ipv6("kb%d" % i)
            rt.setup_port("kb%d" % i, br, mtu=1400)
            rt.set_isolated("kb%d" % i, True)
            times.append(time.perf_counter() - t0)
        for i in range(60001, 60001 + k):
            l2.delete_tunnel(i)
    hi = ex.cfg.tunnel_ids[1]
    assert wait_for(lambda: not any(t > hi for t in ex.tunnels()), 60)
    rows.append(("  kernel alone: the 4 requests of one build at %d live (median of %d)"
                 % (live, k), median_ms(times), "ms"))
    return median_ms(times)


def at_live(ex, live, rows):
    """Leases through the broker at `live`: ROUNDS of SAMPLE, each released
    before the next (SAMPLE more would not fit the service's capacity and
    the bridge's ports at 1,000)."""
    ex.fill(live)
    kernel = kernel_alone(ex, live, rows)
    times = []
    for _ in range(ROUNDS):
        if PROFILE:
            print("\nbroker.lease x %d at %d live:" % (SAMPLE, live))
            sample = profiled(lambda: [ex.lease() for _ in range(SAMPLE)], "tottime")
        else:
            sample = [ex.lease() for _ in range(SAMPLE)]
        times += [t for t, _c, _v in sample]
        ex.release(sample)
    rows.append(("lease through the broker at %d live (median of %d)" % (live, len(times)),
                 median_ms(times), "ms"))
    return median_ms(times), kernel


def kernel_part(ex, rows):
    """Where a no-op reconcile's time goes: the lease file, the kernel."""
    from microbroker import rtnl
    t0 = time.perf_counter()
    live = ex.store.leases()
    rows.append(("  of which: store.leases() (%d)" % len(live),
                 time.perf_counter() - t0, "s"))
    with inside(ex.ns):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            report = ex.dp.reconcile(live, ex.cfg.enabled_services())
            times.append(time.perf_counter() - t0)
        assert not any(report.values()), report
        rows.append(("  of which: dataplane.reconcile, leases read (median of 3)",
                     statistics.median(times), "s"))
        with l2tp.L2TP() as l2, rtnl.Rtnl() as rt:
            for what, fn in (("l2tp tunnel dump (ids, remotes)", l2.tunnel_remotes),
                             ("l2tp session dump (ids)", l2.session_ids),
                             ("l2tp tunnel dump, whole tunnels", lambda: l2.tunnels(stats=False)),
                             ("link dumps (bridge ports, kinds)",
                              lambda: reconcile.link_dump(rt)),
                             ("full link dump (before)", rt.links)):
                t0 = time.perf_counter()
                fn()
                rows.append(("    %s" % what, time.perf_counter() - t0, "s"))


def restart(ex, rows, root=ROOT, where="source tree"):
    """serve started on the lease file with every lease live: when it
    answers an offer, when its start-up reconcile is done, what it dropped."""
    before = ex.tunnels()
    t0 = time.monotonic()
    if PROFILE:
        cmd = ["-c", "import sys; sys.path.insert(0, %r); import cProfile; "
               "from microbroker.__main__ import main; "
               "cProfile.run('main()', sort='cumulative')" % root]
    else:   # as init.d/microbroker starts it: no runpy, no site
        cmd = ["-u", "-I", "-S", "-c", "import sys; sys.path.insert(0, %r); "
               "from microbroker.__main__ import main; sys.exit(main())" % root]
    p = subprocess.Popen(["ip", "netns", "exec", ex.ns, sys.executable] + cmd +
                         ["-c", ex.path, "serve"], cwd=ROOT,
                         stderr=subprocess.PIPE, stdout=None if PROFILE else subprocess.DEVNULL,
                         text=True)
    done = []
    listening = []
    said = []

    def watch():
        for line in p.stderr:
            said.append(line)
            if "microbroker listening on" in line:
                listening.append(time.monotonic() - t0)
            if ": start-up reconcile done: " in line or "reconcile at start failed" in line:
                done.append(time.monotonic() - t0)
    threading.Thread(target=watch, daemon=True).start()

    def offer():
        try:
            with inside(ex.ns):
                c = http.client.HTTPConnection(EXIT6, 8053, timeout=2)
                c.connect()
            try:
                c.request("GET", "/offer")
                return c.getresponse().status == 200
            finally:
                c.close()
        except OSError:
            return False
    answered = wait_for(offer, 120, 0.02) and time.monotonic() - t0
    wait_for(lambda: done, 120)
    p.send_signal(signal.SIGTERM)
    p.wait(30)
    if not answered or not done:
        print("restart: serve said:\n" + "".join(said[-20:]))
    dropped = len(before - ex.tunnels())
    rows.append(("restart with %d live (%s): listening" % (len(before), where),
                 listening[0] if listening else float("nan"), "s"))
    rows.append(("  first offer answered", answered or float("nan"), "s"))
    rows.append(("  start-up reconcile done", done[0] if done else float("nan"), "s"))
    rows.append(("  tunnels dropped", dropped, ""))


def start_floor(ex, rows):
    # The floor under those: the interpreter alone, and with the module
    # an http.server service cannot do without (it imports http.client
    # and email).
    for what, code in (("bare python3 -I -S", "pass"),
                       ("python3 -I -S, import http.server", "import http.server")):
        took = []
        for _ in range(3):
            t0 = time.monotonic()
            subprocess.run(["ip", "netns", "exec", ex.ns, sys.executable, "-I", "-S",
                            "-c", code], check=True)
            took.append(time.monotonic() - t0)
        rows.append(("  baseline (median of 3): %s" % what, statistics.median(took), "s"))


def reboot(ex, rows):
    """Kernel state gone, lease file kept: one reconcile rebuilds it all."""
    live = ex.store.count()
    with inside(ex.ns), l2tp.L2TP() as l2:
        for t in l2.tunnels(stats=False):
            l2.delete_tunnel(t.tunnel_id)
    assert wait_for(lambda: not ex.tunnels(), 900, 1.0)    # a workqueue, slow at 1,000
    for br in ("br-exit", "br-web"):
        run("ip", "link", "del", br, ns=ex.ns, check=False)
    run("nft", "flush", "ruleset", ns=ex.ns)
    ex.open()           # a fresh process's broker
    with inside(ex.ns):
        t0 = time.perf_counter()
        report = ex.broker.reconcile()
        took = time.perf_counter() - t0
    rows.append(("rebuild of %d after a reboot (%d rebuilt, %d failed)"
                 % (live, len(report["rebuilt"]), len(report["failed"])), took, "s"))


def profiled(fn, order="cumulative"):
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    try:
        return fn()
    finally:
        prof.disable()
        pstats.Stats(prof, stream=sys.stdout).sort_stats(order).print_stats(30)
        sys.stdout.flush()


PROFILE = "-p" in sys.argv


def main():
    args = [a for a in sys.argv[1:] if a != "-p"]
    n = int(args[0]) if args else 1000
    ns = Namespaces()
    tmp = tempfile.mkdtemp()
    rows = []
    try:
        ex_ns, cl, path = exit_and_client(ns, tmp, CONFIG, EXIT6)
        ex = Exit(ex_ns, path)
        # Restricted against unrestricted, side by side at (nearly) 0 live;
        # the first of each builds its bridge and tables and is left out.
        ex.lease("exit"), ex.lease("web")
        pairs = [(ex.lease("exit"), ex.lease("web")) for _ in range(SAMPLE // 2)]
        plain = median_ms([a[0] for a, _b in pairs])
        restricted = median_ms([b[0] for _a, b in pairs])
        rows.append(("unrestricted lease (median of %d)" % len(pairs), plain, "ms"))
        rows.append(("restricted lease (median of %d)" % len(pairs), restricted, "ms"))
        rows.append(("restricted / unrestricted (goal <= 2)", restricted / plain, "x"))
        ex.release([x for pair in pairs for x in pair])
        base = at_live(ex, 0, rows)
        mid = at_live(ex, n // 2, rows)
        kernel_mid = ex.fill(n)             # dataplane.up alone, from n/2 to n live
        top = at_live(ex, n, rows)
        for live, (lease, kernel) in ((n // 2, mid), (n, top)):
            rows.append(("at %d live / at 0 (goal <= 1.3)" % live, lease / base[0], "x"))
            rows.append(("  kernel alone at %d live / at 0" % live, kernel / base[1], "x"))
            rows.append(("  the rest (lease less kernel alone) at %d live / at 0" % live,
                         (lease - kernel) / (base[0] - base[1]), "x"))
        if len(kernel_mid) >= 100:
            rows.append(("dataplane.up alone, first 50 after %d live" % (n // 2),
                         median_ms(kernel_mid[:50]), "ms"))
            rows.append(("dataplane.up alone, last 50 before %d live" % n,
                         median_ms(kernel_mid[-50:]), "ms"))
        recs = []
        for _ in range(5):
            with inside(ex.ns):
                t0 = time.perf_counter()
                report = ex.broker.reconcile()
                recs.append(time.perf_counter() - t0)
            assert not any(report.values()), report
        kernel_part(ex, rows)
        if PROFILE:
            with inside(ex.ns):
                profiled(ex.broker.reconcile)
        rows.append(("no-op reconcile at %d live (median of 5; goal <= 0.5 s)"
                     % ex.store.count(), statistics.median(recs), "s"))
        restart(ex, rows)
        copy = package_copy()
        try:
            restart(ex, rows, copy, "installed in memory")
        finally:
            shutil.rmtree(copy)
        start_floor(ex, rows)
        reboot(ex, rows)
    finally:
        ns.cleanup()
        # Also what was measured before a failure.
        print("exit at scale: N=%d (VM: other helpers' VMs may share the 2 cores)" % n)
        for what, v, unit in rows:
            print("%-62s %10.3f %s" % (what, v, unit) if isinstance(v, float) else
                  "%-62s %10d %s" % (what, v, unit))


if __name__ == "__main__":
    main()
