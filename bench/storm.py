"""A storm of clients: N clients started at once against `serve`.

Run in the VM (root, L2TP):
    tests/vm/run exec /work/main/.venv/bin/python bench/storm.py [-u] [N ...] [-d N ...]

The exit (`python3 -m microbroker serve`, kernel dataplane) is in one
namespace; each client in a namespace of its own (one source address
each, as on a mesh), all on one bridge to the exit. Two storms per N:

- scripts: client/microbroker-client `run` under busybox sh with BusyBox
  wget; with -u, OpenWrt's uclient-fetch from /opt/openwrt (built here
  against OpenSSL 3, whose start costs each fetch about a second of CPU
  under emulation: OpenWrt's mbedTLS or wolfSSL builds do not pay that).
  All N wait on one FIFO and start when it opens. On a real
  mesh each client has a CPU of its own; here they share the exit's two
  vCPUs, so they run at nice 19 and their CPU time is reported beside the
  exit's.
- driver: N threads, each in a client namespace, asking GET /offer and
  POST /lease over HTTP as the script does, and nothing else: the exit
  alone under N simultaneous requests. Sizes after -d: the driver only.

Measured from the start: time until N exit ports are bridged with exactly
N tunnels, offers' latency (a prober process asking every 0.2 s, 10 s timeout
as the client's; an answer other than 200, a 503 for too many connections
among them, counts as the timeout, and is listed by status), the most connections seen waiting in serve's accept queue
("queued", sock_diag, every 0.25 s: what an offer waits behind before serve
reads it), leases the broker re-issued (a client asking again for what
it has), CPU seconds of serve and of everything else.
Goal (issue 17): N=100 bridged in <= 30 s, offers' p99 <= 1 s throughout.
"""

import collections
import http.client
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from microbroker import l2tp, netlink as nl, rtnl  # noqa: E402
from nsutil import Namespaces, inside, run, wait_for  # noqa: E402
import owrt  # noqa: E402

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


PROBER = r"""
import http.client, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
while True:
    t0 = time.perf_counter()
    try:
        c = http.client.HTTPConnection(host, port, timeout=timeout)
        c.request("GET", "/offer")
        status = c.getresponse().status
        c.close()
    except OSError:
        status = 0
    ms = (time.perf_counter() - t0) * 1000 if status == 200 else timeout * 1000
    print(ms, status, flush=True)
    time.sleep(0.2)
"""


NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
TCP_LISTEN = 10
INET_DIAG_NOCOOKIE = 0xFFFFFFFF


def accept_queue(diag, port):
    """Connections waiting in the accept queue of the IPv6 TCP listener on
    `port` (its idiag_rqueue, the Recv-Q of `ss -lt`), over sock_diag
    (linux/inet_diag.h): what an offer waits behind before serve reads it.
    It cannot pass the listen backlog (serve's request_queue_size)."""
    # struct inet_diag_req_v2, its inet_diag_sockid zero but for the cookie
    req = struct.pack("=BBBBI", socket.AF_INET6, socket.IPPROTO_TCP, 0, 0,
                      1 << TCP_LISTEN) + bytes(40) + struct.pack(
                          "=II", INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    queued = 0
    for _t, data, start, _end in diag.dump_parts(SOCK_DIAG_BY_FAMILY, req, "sock_diag"):
        # struct inet_diag_msg: 4 bytes, the sockid (sport first, big-endian),
        # expires, then rqueue
        (sport,) = struct.unpack_from("!H", data, start + 4)
        (rqueue,) = struct.unpack_from("=I", data, start + 56)
        if sport == port:
            queued += rqueue
    return queued


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


def ask(ns, method, path, body=None):
    """One request to the exit from netns ns; the response, read."""
    with inside(ns):
        c = http.client.HTTPConnection(EXIT6, 8053, timeout=OFFER_TIMEOUT)
        c.connect()
    try:
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
        c.request(method, path, body, headers)
        r = c.getresponse()
        r.read()
        return r
    finally:
        c.close()


def offer_ms(ns):
    t0 = time.perf_counter()
    try:
        ok = ask(ns, "GET", "/offer").status == 200
    except OSError:
        ok = False
    return (time.perf_counter() - t0) * 1000 if ok else OFFER_TIMEOUT * 1000


def cpu_seconds(pid=None):
    """CPU time of one process (utime + stime), or of the whole machine."""
    tick = os.sysconf("SC_CLK_TCK")
    if pid is None:
        with open("/proc/stat") as f:
            user, nice, system = f.readline().split()[1:4]
        return (int(user) + int(nice) + int(system)) / tick
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick


def in_open(pid):
    """Is pid blocked in open/openat (the FIFO)?"""
    try:
        with open("/proc/%d/syscall" % pid) as f:
            return f.read().split()[0] in ("2", "257")
    except (OSError, IndexError):
        return False


def shape(text):
    """A log line without its numbers, ids and addresses: for counting."""
    text = re.sub(r"\[[0-9a-f:.]+\]|[0-9a-f]{16,}|fc00:[0-9a-f:]*|\d+", "#", text)
    return text.strip()[:110]


class Exit:
    """serve in the exit's namespace, for one storm."""

    def __init__(self, world, tmp):
        self.world, self.tmp = world, tmp
        cfg = os.path.join(tmp, "microbroker")
        with open(cfg, "w") as f:
            f.write(CONFIG % {"state": os.path.join(tmp, "state"), "exit": EXIT6})
        self.log_path = os.path.join(tmp, "serve.log")
        with open(self.log_path, "w") as log:
            self.p = subprocess.Popen(["ip", "netns", "exec", world.exit, sys.executable,
                                       "-m", "microbroker", "-c", cfg, "serve"], cwd=ROOT,
                                      stdout=log, stderr=log)
        assert wait_for(lambda: offer_ms(world.probe) < OFFER_TIMEOUT * 1000, 60, 0.2), \
            "serve did not answer"

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(60)
        with open(self.log_path) as f:
            text = f.read()
        with inside(self.world.exit), l2tp.L2TP() as l2:
            for t in l2.tunnels(stats=False):
                l2.delete_tunnel(t.tunnel_id)
        run("ip", "link", "del", "br-exit", ns=self.world.exit, check=False)
        return text


def measure(world, n, exit_, start):
    """start() starts the N clients; then watch the kernel, probe offers.
    A result row."""
    # The prober is a process of its own: the driver's threads share this
    # one's interpreter lock, and would be measured with it.
    probe = subprocess.Popen(["ip", "netns", "exec", world.probe, sys.executable, "-c",
                              PROBER, EXIT6, "8053", str(OFFER_TIMEOUT)],
                             stdout=subprocess.PIPE, text=True)
    first = probe.stdout.readline()
    assert first, "the prober did not start"
    with inside(world.exit):
        diag = nl.Socket(NETLINK_SOCK_DIAG)
    cpu0, serve0 = cpu_seconds(), cpu_seconds(exit_.p.pid)
    t0 = time.monotonic()
    start()
    done = None
    most = queued = 0
    try:
        while time.monotonic() - t0 < DEADLINE:
            queued = max(queued, accept_queue(diag, 8053))
            ports, tunnels = world.kernel()
            most = max(most, tunnels)
            if ports == n and tunnels == n:
                done = time.monotonic() - t0
                break
            time.sleep(0.25)
    finally:
        diag.close()
    serve_cpu = cpu_seconds(exit_.p.pid) - serve0
    all_cpu = cpu_seconds() - cpu0
    probe.terminate()
    said = [line.split() for line in probe.stdout.read().splitlines()]
    probe.wait()
    offers = [float(ms) for ms, _status in said]
    other = collections.Counter(int(st) for _ms, st in said if st != "200")
    ports, tunnels = world.kernel()
    return {"n": n, "done": done, "ports": ports, "tunnels": tunnels, "most": most,
            "p50": pct(offers, 50), "p99": pct(offers, 99), "offers": len(offers),
            "timeouts": other.pop(0, 0), "refused": dict(other),
            "serve_cpu": serve_cpu, "other_cpu": all_cpu - serve_cpu, "queued": queued}


def log_counts(text, row):
    row["reissued"] = text.count(" re-issued to ")
    row["granted"] = text.count(" granted to ")
    # _take_down's line "lease ID released (CLIENT, SERVICE)": releases whose
    # tunnel came down ("released but its tunnel stays" is not counted)
    row["released"] = text.count(" released (")


def scripts(world, n, fetcher):
    """N client scripts, started at once through a FIFO."""
    tmp = tempfile.mkdtemp(dir=world.tmp)
    exit_ = Exit(world, tmp)
    bindir = os.path.join(tmp, "bin")
    os.mkdir(bindir)
    os.symlink(fetcher, os.path.join(bindir, "wget"))
    env = {"PATH": bindir + ":" + PATH, "TMPDIR": tmp}
    fifo = os.path.join(tmp, "go")
    os.mkfifo(fifo)
    clients = []
    for k, ns in enumerate(world.clients[1:n + 1]):
        state = os.path.join(tmp, "client%d" % k)
        with open(os.path.join(tmp, "client%d.log" % k), "w") as err:
            clients.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, "nice", "-n", "19", BUSYBOX, "sh", "-c",
                 'read _ <"$0"; exec "$@"', fifo, BUSYBOX, "sh", CLIENT, "-q", "-f", "none",
                 "-d", state, "-s", URL, "run"], env=env, cwd=tmp,
                stdout=subprocess.DEVNULL, stderr=err))
    assert wait_for(lambda: all(in_open(p.pid) for p in clients), 300, 0.2), \
        "the clients did not reach the FIFO"

    def start():
        with open(fifo, "w") as f:
            f.write("go\n")
    row = measure(world, n, exit_, start)
    for p in clients:
        p.send_signal(signal.SIGTERM)
    for p in clients:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    text = exit_.stop()
    log_counts(text, row)
    said = collections.Counter()
    for k in range(n):
        with open(os.path.join(tmp, "client%d.log" % k)) as f:
            said.update({shape(line) for line in f if line.strip()})
    row["said"] = said.most_common(6)
    row["serve_said"] = collections.Counter(
        shape(line) for line in text.splitlines() if ": info: " not in line).most_common(6)
    return row


def driver(world, n):
    """N threads: GET /offer then POST /lease, each from its client
    namespace; a failed lease asks again after Retry-After (or 1 s)."""
    tmp = tempfile.mkdtemp(dir=world.tmp)
    exit_ = Exit(world, tmp)
    go = threading.Event()
    failures = collections.Counter()

    def one(ns):
        go.wait()
        tid = random.randint(1, 65535)
        body = "service=exit&tunnel_id=%d&session_id=%d" % (tid, tid)
        while True:
            try:
                ask(ns, "GET", "/offer")
                r = ask(ns, "POST", "/lease", body)
                if r.status == 200:
                    return
                failures["HTTP %d" % r.status] += 1
                wait = int(r.getheader("Retry-After") or 1)
            except OSError as e:
                failures[type(e).__name__] += 1
                wait = 1
            time.sleep(min(wait, 5))
    threads = [threading.Thread(target=one, args=(ns,), daemon=True)
               for ns in world.clients[1:n + 1]]
    for t in threads:
        t.start()
    row = measure(world, n, exit_, go.set)
    for t in threads:
        t.join(OFFER_TIMEOUT * 3)
    text = exit_.stop()
    log_counts(text, row)
    row["said"] = sorted(failures.items())
    row["serve_said"] = collections.Counter(
        shape(line) for line in text.splitlines() if ": info: " not in line).most_common(6)
    return row


def main():
    args = [a for a in sys.argv[1:] if a != "-u"]
    only = args.index("-d") if "-d" in args else len(args)
    sizes = [int(a) for a in args[:only]] or ([] if args else [20, 100, 200])
    drivers = [int(a) for a in args[only + 1:]]
    fetcher = BUSYBOX
    if "-u" in sys.argv:
        assert not owrt.missing("uclient-fetch"), owrt.missing("uclient-fetch")
        fetcher = owrt.path("uclient-fetch")
    tmp = tempfile.mkdtemp()
    world = World(tmp)
    rows = []
    try:
        world.grow(max(sizes + drivers))
        for n in sizes:
            rows.append(("driver", driver(world, n)))
            rows.append(("scripts", scripts(world, n, fetcher)))
        for n in drivers:
            rows.append(("driver", driver(world, n)))
    finally:
        world.close()
        print("storm: N clients started at once against serve; scripts: busybox sh with "
              "%s as wget, -f none, at nice 19; driver: N Python threads, offer + lease "
              "over HTTP" % ("uclient-fetch" if fetcher != BUSYBOX else "BusyBox wget"))
        print("%8s %5s %12s %6s %6s %6s %8s %9s %7s %8s %8s %7s %10s %10s" % (
            "storm", "N", "bridged (s)", "ports", "tuns", "max", "granted", "re-issued",
            "offers", "p50 (ms)", "p99 (ms)", "queued", "serve CPU", "other CPU"))
        for what, r in rows:
            print("%8s %5d %12s %6d %6d %6d %8d %9d %7d %8.0f %8.0f %7d %9.1fs %9.1fs" % (
                what, r["n"], "%.1f" % r["done"] if r["done"] else "> %d" % DEADLINE,
                r["ports"], r["tunnels"], r["most"], r["granted"], r["reissued"],
                r["offers"], r["p50"], r["p99"], r["queued"], r["serve_cpu"],
                r["other_cpu"]))
            if r["timeouts"]:
                print("         %d offers had no answer in %.0f s" % (r["timeouts"], OFFER_TIMEOUT))
            for status, k in sorted(r["refused"].items()):
                print("         %d offers answered %d (counted as %.0f s)" % (k, status, OFFER_TIMEOUT))
        for what, r in rows:
            print("%s N=%d: the exit released %d leases as the clients stopped; the clients"
                  " said (lines, in how many clients / failures):" % (what, r["n"],
                                                                       r.get("released", 0)))
            for line, k in r["said"]:
                print("   %5d  %s" % (k, line))
            print("  serve warned:")
            for line, k in r["serve_said"]:
                print("   %5d  %s" % (k, line))


if __name__ == "__main__":
    main()
