"""Open vSwitch bridge backend against the Linux bridge, in one VM run.

Run in the VM (needs root, L2TP, Debian's openvswitch-switch):
    tests/vm/run exec .venv/bin/python bench/ovs.py [N] [FLOOD_PORTS] [SCALE]
  1. per-lease setup and teardown (Dataplane.up / down, L2TPv3), N leases
     (default 100) on each backend, unrestricted and dns+web;
  2. flooding: FLOOD_PORTS (default 1000) live leases, the exit sends
     broadcast frames into its bridge (as an RA would go), time until the
     last port has sent every one; where the Linux bridge stops taking ports;
  3. SCALE (default 1500) live leases on one OVS-backed service, isolated:
     every port protected and a client's broadcast traced to the exit only;
     until vswitchd has taken them all up, a no-op reconcile (profiled),
     and a release at that size.
A private ovsdb-server/ovs-vswitchd runs in the exit's namespace (tests/ovsutil.py).
"""

import os
import socket
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import ovsutil  # noqa: E402
from microbroker import dataplane, ovsdb, rtnl  # noqa: E402
from microbroker.leases import LeaseStore  # noqa: E402
from nsutil import Namespaces, inside, run, wait_for  # noqa: E402

IDS = (1, 6000)
FRAMES = 50
SAMPLE_DOWNS = 20


def service(backend, restrict="none", name="exit"):
    return SimpleNamespace(name=name, kind="l2tpv3", bridge="", isolate=True,
                           restrict=restrict, ports=[80, 443] if restrict != "none" else [],
                           mtu=1280, bridge_backend=backend)


class Exit:
    def __init__(self, ns, ovs_, tmp):
        self.ns, self.ovs, self.tmp = ns, ovs_, tmp
        self.count = 0
        self.datapath = "" if ovsutil.kernel_datapath() else "netdev"

    def fresh(self, svc, n):
        """A store and a dataplane for one service."""
        self.count += 1
        cfg = SimpleNamespace(tunnel_ids=IDS, filter="", services={svc.name: svc},
                              ovsdb=self.ovs.socket, ovs_datapath=self.datapath)
        store = LeaseStore(os.path.join(self.tmp, "leases%d" % self.count), tunnel_ids=IDS,
                           session_ids=IDS, max_leases=n + 100, max_per_client=2)
        return dataplane.Dataplane(cfg), store

    def leases(self, store, svc, n, start=0):
        # Clients behind one neighbour (a route via the client namespace):
        # a flood then costs no neighbour discovery per port.
        return [store.allocate("fc00:1::%x" % (start + i + 2), svc.name, "l2tpv3", "ip",
                               "fc00::1", 1280, 3600)[0] for i in range(n)]


def applied(ex):
    """Seconds until ovs-vswitchd has taken up what OVSDB holds now (an
    unrestricted lease's port is not waited for by Dataplane.up)."""
    t0 = time.perf_counter()
    with ovsdb.Ovsdb(ex.ovs.socket) as db:
        db.wait_applied(1800)
    return time.perf_counter() - t0


def timed_up_down(ex, backend, restrict, n):
    # One bridge name per backend: a Linux bridge's name cannot be an OVS one.
    svc = service(backend, restrict, name="t" + backend[:1])
    dp, store = ex.fresh(svc, n)
    leases = ex.leases(store, svc, n)
    up, down = [], []
    with inside(ex.ns):
        dp.ensure_service(svc)
        for lease in leases:
            t0 = time.perf_counter()
            dp.up(lease, svc)
            up.append(time.perf_counter() - t0)
        caught_up = applied(ex) if backend == "ovs" else 0.0
        for lease in leases:
            t0 = time.perf_counter()
            dp.down(lease)
            down.append(time.perf_counter() - t0)
    assert wait_for(lambda: run("ip", "l2tp", "show", "tunnel", ns=ex.ns).strip() == "", 120)
    return up, down, caught_up


def flood(ex, br, last):
    """ms per broadcast frame sent by the exit on `br` until port `last`
    has sent it into its tunnel (the Linux bridge and the kernel datapath
    both flood in the sender's context)."""
    with inside(ex.ns), rtnl.Rtnl() as rt:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind((br, 0))
        # (/sys shows the VM's first namespace: any local source MAC will do.)
        frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\xfe\x88\xb5" + bytes(46)
        base = rt.stats(last).tx_packets
        t0 = time.perf_counter()
        for _ in range(FRAMES):
            s.send(frame)
        ok = wait_for(lambda: rt.stats(last).tx_packets >= base + FRAMES, 60, 0.001)
        dt = time.perf_counter() - t0
        s.close()
    assert ok, "not every broadcast reached %s" % last
    return dt / FRAMES * 1000


def flood_run(ex, backend, ports):
    svc = service(backend, name="fl" + backend[:1])
    dp, store = ex.fresh(svc, ports + 30)
    leases = ex.leases(store, svc, ports)
    t0 = time.perf_counter()
    with inside(ex.ns):
        for lease in leases:
            dp.up(lease, svc)
        br = dataplane.bridge_name(svc)
        rtnl.Rtnl().set_up(br)
    if backend == "ovs":
        applied(ex)
    built = time.perf_counter() - t0
    ms = flood(ex, br, leases[-1].ifname)
    limit = ""
    if backend == "linux":
        # Where the Linux bridge stops: more leases until one fails.
        extra = ex.leases(store, svc, 30, start=ports)
        with inside(ex.ns):
            for i, lease in enumerate(extra):
                try:
                    dp.up(lease, svc)
                except OSError as e:
                    limit = "lease %d: %s" % (ports + i + 1, e.strerror or e)
                    break
                leases.append(lease)
    if backend == "ovs":
        # Not measured here: the ports in one transaction, so that each
        # down does not wait for its own reconfiguration (see scale_run).
        with ovsdb.Ovsdb(ex.ovs.socket) as db:
            db.delete_ports(br, [l.ifname for l in leases])
        applied(ex)
    with inside(ex.ns):
        for lease in leases:
            dp.down(lease)
    assert wait_for(lambda: run("ip", "l2tp", "show", "tunnel", ns=ex.ns).strip() == "", 300)
    return built, ms, limit


def scale_run(ex, n):
    """n live leases on one OVS service; isolated from each other."""
    svc = service("ovs", name="big")
    dp, store = ex.fresh(svc, n)
    leases = ex.leases(store, svc, n)
    t0 = time.perf_counter()
    per = []
    with inside(ex.ns):
        for i, lease in enumerate(leases):
            t1 = time.perf_counter()
            dp.up(lease, svc)
            per.append(time.perf_counter() - t1)
            if (i + 1) % 250 == 0:
                print("  scale: %d up, the last 250 at %.0f ms each (median)"
                      % (i + 1, statistics.median(per[-250:]) * 1000), flush=True)
    built = time.perf_counter() - t0
    caught_up = applied(ex)
    br = dataplane.bridge_name(svc)
    with ovsdb.Ovsdb(ex.ovs.socket) as db:
        ports = db.ports(br)
    mine = [ports[l.ifname] for l in leases]
    assert all(p.protected and p.ofport and p.ofport > 0 for p in mine)
    # A client's broadcast goes to the exit's own port only; the exit's to all.
    a = mine[len(mine) // 2].ofport
    out = ex.ovs.appctl("ofproto/trace", br, "in_port=%d,dl_src=02:00:00:00:00:01,"
                        "dl_dst=ff:ff:ff:ff:ff:ff,dl_type=0x0806" % a)
    acts = [l for l in out.splitlines() if l.startswith("Datapath actions:")][-1]
    assert len(acts.split(":", 1)[1].split(",")) == 1, acts
    out = ex.ovs.appctl("ofproto/trace", br, "in_port=LOCAL,dl_dst=ff:ff:ff:ff:ff:ff,"
                        "dl_type=0x0806")
    acts = [l for l in out.splitlines() if l.startswith("Datapath actions:")][-1]
    reached = len(acts.split(":", 1)[1].split(","))
    t0 = time.perf_counter()
    with inside(ex.ns):
        report = dp.reconcile(store.leases(), [svc])
    rec = time.perf_counter() - t0
    # Where a no-op reconcile's time goes at this size (a second one).
    import cProfile
    import pstats
    prof = cProfile.Profile()
    with inside(ex.ns):
        prof.runcall(dp.reconcile, store.leases(), [svc])
    print("\nno-op reconcile at %d, profiled:" % n)
    pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(25)
    assert not report["failed"], report["failed"][:5]
    # A release waits for vswitchd to let go of its port (ovs.Backend.leave):
    # one reconfiguration each, at this size. Timed for a sample; the rest
    # go in one transaction (not measured).
    downs = []
    with inside(ex.ns):
        for lease in leases[:SAMPLE_DOWNS]:
            t0 = time.perf_counter()
            dp.down(lease)
            downs.append(time.perf_counter() - t0)
    with ovsdb.Ovsdb(ex.ovs.socket) as db:
        db.delete_ports(br, [l.ifname for l in leases[SAMPLE_DOWNS:]])
    down_caught_up = applied(ex)
    with inside(ex.ns):
        for lease in leases[SAMPLE_DOWNS:]:
            dp.down(lease)
    assert wait_for(lambda: run("ip", "l2tp", "show", "tunnel", ns=ex.ns).strip() == "", 300)
    return (built, caught_up, statistics.median(per), reached, rec,
            statistics.median(downs), down_caught_up)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    fports = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    scale = int(sys.argv[3]) if len(sys.argv) > 3 else 1500
    ns = Namespaces()
    tmp = tempfile.mkdtemp()
    o = None
    try:
        exn, cl = ns.add("x"), ns.add("c")
        ns.link(exn, cl, "fc00::1/64", "fc00::2/64")
        run("ip", "route", "add", "fc00:1::/64", "via", "fc00::2", ns=exn)
        os.mkdir(os.path.join(tmp, "ovs"))
        o = ovsutil.Ovs(os.path.join(tmp, "ovs"), ns=exn).start()
        ex = Exit(exn, o, tmp)
        print("Open vSwitch backend vs Linux bridge (L2TPv3 leases, Dataplane.up/down; "
              "OVS datapath: %s)" % (ex.datapath or "system"))
        rows = []
        for backend in ("linux", "ovs"):
            for restrict in ("none", "dns+web"):
                rows.append((backend, restrict) + timed_up_down(ex, backend, restrict, n))
        per_lease(rows, n)
        floods = [(b,) + flood_run(ex, b, fports) for b in ("linux", "ovs")]
        print_floods(floods, fports)
        if scale:
            print_scale(scale_run(ex, scale), scale)
    finally:
        if o is not None:
            o.stop()
        ns.cleanup()


def per_lease(rows, n):
    print()
    print("per lease, N=%d" % n)
    print("%-7s %-9s %12s %14s %12s %22s" % ("bridge", "restrict", "up med (ms)",
                                             "down med (ms)", "up vs linux",
                                             "vswitchd after last (s)"))
    base = {r: statistics.median(u) for b, r, u, _d, _c in rows if b == "linux"}
    for b, r, up, down, caught_up in rows:
        print("%-7s %-9s %12.2f %14.2f %11.2fx %22s"
              % (b, r, statistics.median(up) * 1000, statistics.median(down) * 1000,
                 statistics.median(up) / base[r], "%.2f" % caught_up if b == "ovs" else "-"))
    sys.stdout.flush()


def print_floods(floods, fports):
    print()
    print("flooding: %d ports, %d broadcast frames from the exit" % (fports, FRAMES))
    print("%-7s %16s %20s  %s" % ("bridge", "leases up (s)", "ms per broadcast", "limit"))
    for b, built, ms, limit in floods:
        print("%-7s %16.1f %20.2f  %s" % (b, built, ms, limit or "-"))
    sys.stdout.flush()


def print_scale(big, scale):
    built, caught_up, med, reached, rec, down, down_caught_up = big
    print()
    print("scale: %d live leases on one OVS service:" % scale)
    print("  up: %.1f s (median %.1f ms each); ovs-vswitchd had taken up every port %.1f s "
          "after the last" % (built, med * 1000, caught_up))
    print("  every port protected; a client's broadcast reaches 1 port, the exit's %d"
          % reached)
    print("  no-op reconcile: %.2f s" % rec)
    print("  down: %.0f ms each (median of %d, each waits for vswitchd); the other %d "
          "ports in one transaction, let go by vswitchd %.1f s after it"
          % (down * 1000, SAMPLE_DOWNS, scale - SAMPLE_DOWNS, down_caught_up))


if __name__ == "__main__":
    main()
