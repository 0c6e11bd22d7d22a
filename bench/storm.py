"""A storm of clients: N real client scripts started at once against `serve`.

Run in the VM (root, L2TP):
    tests/vm/run exec /work/wt/kernel/.venv/bin/python bench/storm.py [N ...]

The exit (`python3 -m microbroker serve`, kernel dataplane) is in one
namespace; each client is client/microbroker-client `run` under busybox sh
with BusyBox wget, in a namespace of its own (one source address each, as
on a mesh), all on one bridge to the exit. Measured from the moment all
are started: time until N exit ports are bridged with exactly N tunnels,
offers' latency (a prober asking every 0.2 s, 10 s timeout as the client's),
and leases the broker re-issued (a client asking again for what it has).
Goal (issue 17): N=100 bridged in <= 30 s, offers' p99 <= 1 s throughout.
"""

import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from microbroker import l2tp, rtnl  # noqa: E402
from nsutil import Namespaces, inside, run, wait_for  # noqa: E402

EXIT6 = "fc00::1"
URL = "http://[%s]:8053" % EXIT6
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
CLIENT = os.path.join(ROOT, "client", "microbroker-client")
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
DEADLINE = 300.0
OFFER_TIMEOUT = 10.0

CONFIG = """
config broker 'main'
	option state_dir '%(state)s'
	list listen '[%(exit)s]:8053'
	option tunnel_ids '1-4000'
	option session_ids '1-4000'
	option max_leases '1000'
	option max_per_client '2'
	option sweep_interval '30'
	option log 'stderr'
config service 'exit'
	option endpoint '%(exit)s'
	option lifetime '600'
	option renew_interval '120'
	option capacity '1000'
"""


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))] if xs else float("nan")


class World:
    """The exit's namespace with the uplink bridge, and client namespaces on it."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.ns = Namespaces()
        self.exit = self.ns.add("x")
        with inside(self.exit), rtnl.Rtnl() as rt:
            rt.add_bridge("br-up")
            rt.add_address("br-up", EXIT6 + "/64")
            rt.set_up("br-up")
        self.clients = []
        self.probe = self.client_ns()

    def client_ns(self):
        k = len(self.clients) + 1
        ns = self.ns.add("c")
        run("ip", "link", "add", "u%d" % k, "netns", self.exit, "type", "veth", "peer",
            "name", "veth0", "netns", ns)
        with inside(self.exit), rtnl.Rtnl() as rt:
            rt.setup_port("u%d" % k, "br-up")
        with inside(ns), rtnl.Rtnl() as rt:
            rt.add_address("veth0", "fc00::%x/64" % (k + 1))
            rt.set_up("veth0")
        self.clients.append(ns)
        return ns

    def grow(self, n):
        while len(self.clients) < n + 1:         # the prober's is the first
            self.client_ns()

    def kernel(self):
        """(ports on br-exit, l2tp tunnels) in the exit."""
        with inside(self.exit), rtnl.Rtnl() as rt:
            try:
                br = rt.ifindex("br-exit")
            except rtnl.NoSuchLink:
                br = None
            ports = sum(1 for l in rt.bridge_ports() if br and l.master == br)
            with l2tp.L2TP() as l2:
                tunnels = len(l2.tunnels(stats=False))
        return ports, tunnels

    def close(self):
        self.ns.cleanup()


def offer_ms(ns):
    t0 = time.perf_counter()
    try:
        with inside(ns):
            c = http.client.HTTPConnection(EXIT6, 8053, timeout=OFFER_TIMEOUT)
            c.connect()
        try:
            c.request("GET", "/offer")
            ok = c.getresponse().status == 200
        finally:
            c.close()
    except OSError:
        ok = False
    return (time.perf_counter() - t0) * 1000 if ok else OFFER_TIMEOUT * 1000


def storm(world, n):
    tmp = tempfile.mkdtemp(dir=world.tmp)
    cfg = os.path.join(tmp, "microbroker")
    with open(cfg, "w") as f:
        f.write(CONFIG % {"state": os.path.join(tmp, "state"), "exit": EXIT6})
    log_path = os.path.join(tmp, "serve.log")
    with open(log_path, "w") as log:
        serve = subprocess.Popen(["ip", "netns", "exec", world.exit, sys.executable, "-m",
                                  "microbroker", "-c", cfg, "serve"], cwd=ROOT, stdout=log,
                                 stderr=log)
    assert wait_for(lambda: offer_ms(world.probe) < OFFER_TIMEOUT * 1000, 60, 0.2), \
        "serve did not answer"
    bindir = os.path.join(tmp, "bin")
    os.mkdir(bindir)
    os.symlink(BUSYBOX, os.path.join(bindir, "wget"))     # BusyBox wget, no -T here
    env = {"PATH": bindir + ":" + PATH, "TMPDIR": tmp}
    clients = []
    stop = threading.Event()
    offers = []

    def prober():
        while not stop.is_set():
            offers.append(offer_ms(world.probe))
            stop.wait(0.2)
    t0 = time.monotonic()
    for k, ns in enumerate(world.clients[1:n + 1]):
        state = os.path.join(tmp, "client%d" % k)
        clients.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, BUSYBOX, "sh", CLIENT, "-q", "-f", "none", "-d",
             state, "-s", URL, "run"], env=env, cwd=tmp, stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(tmp, "client%d.log" % k), "w")))
    started = time.monotonic() - t0
    probe = threading.Thread(target=prober, daemon=True)
    probe.start()
    done = None
    most = 0
    while time.monotonic() - t0 < DEADLINE:
        ports, tunnels = world.kernel()
        most = max(most, tunnels)
        if ports == n and tunnels == n:
            done = time.monotonic() - t0
            break
        time.sleep(0.25)
    stop.set()
    probe.join()
    ports, tunnels = world.kernel()
    for p in clients:
        p.send_signal(signal.SIGTERM)
    for p in clients:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    serve.send_signal(signal.SIGTERM)
    serve.wait(60)
    with open(log_path) as f:
        text = f.read()
    with inside(world.exit), l2tp.L2TP() as l2:
        for t in l2.tunnels(stats=False):
            l2.delete_tunnel(t.tunnel_id)
    run("ip", "link", "del", "br-exit", ns=world.exit, check=False)
    return {"n": n, "started": started, "done": done, "ports": ports, "tunnels": tunnels,
            "most": most, "reissued": text.count(" re-issued to "),
            "granted": text.count(" granted to "),
            "p50": pct(offers, 50), "p99": pct(offers, 99), "offers": len(offers),
            "timeouts": sum(1 for x in offers if x >= OFFER_TIMEOUT * 1000)}


def main():
    sizes = [int(a) for a in sys.argv[1:]] or [20, 100, 200]
    tmp = tempfile.mkdtemp()
    world = World(tmp)
    rows = []
    try:
        world.grow(max(sizes))
        for n in sizes:
            rows.append(storm(world, n))
    finally:
        world.close()
    print("storm: N client scripts (busybox sh + BusyBox wget, -f none) started at once "
          "against serve (VM: other helpers' VMs may share the 2 cores)")
    print("%5s %10s %14s %8s %8s %8s %9s %9s %8s %9s %8s" % (
        "N", "start (s)", "bridged (s)", "ports", "tunnels", "max tun", "granted",
        "re-issued", "offers", "p50 (ms)", "p99 (ms)"))
    for r in rows:
        print("%5d %10.1f %14s %8d %8d %8d %9d %9d %8d %9.0f %8.0f" % (
            r["n"], r["started"], "%.1f" % r["done"] if r["done"] else "> %d" % DEADLINE,
            r["ports"], r["tunnels"], r["most"], r["granted"], r["reissued"], r["offers"],
            r["p50"], r["p99"]))
        if r["timeouts"]:
            print("      %d offers timed out (%.0f s)" % (r["timeouts"], OFFER_TIMEOUT))


if __name__ == "__main__":
    main()
