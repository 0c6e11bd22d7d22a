#!/usr/bin/env python3
"""Benchmark the front door: python bench/broker.py [--leases N] [--requests N]

- offer and renew against the standalone server on loopback with N live
  leases (default 1000): requests per second and median latency, one
  client and four concurrent clients;
- resident memory of that server against a bare interpreter's;
- wall time, CPU time and peak memory of one CGI request (offer, a new
  lease, renew) against a bare `python3 -I -S -c pass`, measured in the
  same run, interleaved (each lease is from a client with none, and is
  removed again, untimed, before the next). CPU time (user + system, from
  the kernel's accounting of the child) moves less than wall time when
  other work (a VM) shares the machine. The same requests again from a
  copy of the package as the OpenWrt package installs it (.pyc only, no
  sources: what an exit runs), beside the rows from the source tree.

The lease file lives in memory (/dev/shm, or --state-dir), as the OpenWrt
example config keeps it (/var/run is a tmpfs there); a lease and a renew
with the lease file on this machine's disk are measured beside them, since
each writes it durably (fsync), which costs what the disk costs.

Goals: CGI request <= 1.5x the bare interpreter, server RSS with the
leases <= 1.5x a bare interpreter's. The data plane is `none` (no kernel
work is measured here; that is bench/ of the kernel layer). Clients are
127.1.x.y so that each lease has its own source address on loopback.
"""

import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchutil import package_copy  # noqa: E402 (beside this file)

BOOT = ("import sys; sys.path.insert(0, %r); "
        "from microbroker.__main__ import main; sys.exit(main())" % ROOT)
CGI_BOOT = ("import sys; sys.path.insert(0, %r); "
            "from microbroker.cgi import run; run()" % ROOT)

CONFIG = """
config broker
	option dataplane 'none'
	option state_dir '%(state)s'
	list listen '127.0.0.1:%(port)d'
	option max_leases '%(max)d'
	option max_per_client '4'
	option sweep_interval '3600'
	option max_connections '256'
	option lease_rate '0'
	option log_level 'warning'

config service 'v4'
	option family '4'
	option endpoint '127.0.0.1'
	option lifetime '3600'
	option capacity '%(capacity)d'
"""


def client_addr(i):
    return "127.1.%d.%d" % (i // 250, i % 250 + 1)


def populate(cfg, n):
    """n leases through the broker itself, one per client address."""
    from microbroker.nulldataplane import NullDataplane
    from microbroker.wiring import make_broker
    b = make_broker(cfg, dataplane=NullDataplane())
    out = []
    for i in range(n):
        c = client_addr(i)
        v = b.lease(c, "v4", local="127.0.0.1")
        out.append((c, v["lease_id"], v["secret"]))
    return out


def http(port, source, data):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(data)
    chunks = []
    while True:
        c = s.recv(65536)
        if not c:
            break
        chunks.append(c)
    s.close()
    raw = b"".join(chunks)
    assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
    return raw


def offer_req():
    return b"GET /offer HTTP/1.1\r\nHost: b\r\n\r\n"


def renew_req(lease_id, secret):
    body = ("lease_id=%s&secret=%s" % (lease_id, secret)).encode()
    return (b"POST /renew HTTP/1.1\r\nHost: b\r\nContent-Type: "
            b"application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n"
            % len(body)) + body


def load(port, leases, kind, n, threads):
    """(requests per second, median latency in ms)."""
    lat = []
    lock = threading.Lock()
    per = n // threads

    def work(t):
        mine = []
        for k in range(per):
            i = (t * per + k) % len(leases)
            c, lid, sec = leases[i]
            data = offer_req() if kind == "offer" else renew_req(lid, sec)
            t0 = time.perf_counter()
            http(port, c, data)
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    return len(lat) / wall, statistics.median(lat) * 1000


def rss_kib(pid, field="VmRSS"):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def bare_resident(code="pass"):
    """RSS of an idle interpreter after `code`, read the same way as the
    server's."""
    p = subprocess.Popen([sys.executable, "-I", "-S", "-c",
                          "import sys; sys.path.insert(0, %r); %s; "
                          "sys.stdin.read()" % (ROOT, code)],
                         stdin=subprocess.PIPE)
    time.sleep(0.3)
    try:
        return rss_kib(p.pid)
    finally:
        p.stdin.close()
        p.wait()


# Peak memory: a child's ru_maxrss would include the RSS of the forked
# benchmark process before exec, so the child reports its own VmHWM (the
# high-water mark of its post-exec address space) on a pipe instead, as it
# ends: after its code, or in posix._exit (cgi.run ends the process that
# way, past any finally). Bare and CGI runs do this the same way; wall times
# come from runs without it. posix, not os: the CGI path never loads os.
HWM = ("import posix; f = open('/proc/self/status', 'rb'); "
       "posix.write(%d, [l for l in f.read().split(b'\\n') "
       "if l.startswith(b'VmHWM')][0].split()[1])")
HWM_RUN = """import posix as _posix
_exit = _posix._exit
def _hwm_exit(status):
 %(hwm)s
 _exit(status)
_posix._exit = _hwm_exit
try:
 %(code)s
finally:
 %(hwm)s"""


def measured_child(argv, env, stdin, hwm=False, after=None, cpu=False):
    """Wall seconds (or, with hwm, peak KiB) of one child process; then
    after(), untimed. cpu: (wall, its CPU seconds, user + system)."""
    if hwm:
        r3, w3 = os.pipe()
        argv = argv[:-1] + [HWM_RUN % {"hwm": HWM % w3,
                                      "code": argv[-1].replace("; ", "\n ")}]
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         pass_fds=(w3,) if hwm else ())
    _, err = p.communicate(stdin)
    wall = time.perf_counter() - t0
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit("child failed: %s" % err.decode())
    if after is not None:
        after()
    if cpu:
        return wall, (now.ru_utime - used.ru_utime) + (now.ru_stime -
                                                       used.ru_stime)
    if not hwm:
        return wall
    os.close(w3)
    with os.fdopen(r3, "rb") as f:
        return int(f.read())


def cgi_env(cfgpath, method, path, client, body=b""):
    env = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "",
           "REMOTE_ADDR": client, "SERVER_ADDR": "127.0.0.1",
           "HTTP_HOST": "b", "MICROBROKER_CONFIG": cfgpath,
           "GATEWAY_INTERFACE": "CGI/1.1"}
    if body:
        env["CONTENT_TYPE"] = "application/x-www-form-urlencoded"
        env["CONTENT_LENGTH"] = str(len(body))
    return env


def main():
    n_leases = 1000
    n_req = 2000
    rounds = 15
    state_base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    args = sys.argv[1:]
    while args:
        a = args.pop(0)
        if a == "--leases":
            n_leases = int(args.pop(0))
        elif a == "--requests":
            n_req = int(args.pop(0))
        elif a == "--rounds":
            rounds = int(args.pop(0))
        elif a == "--state-dir":
            state_base = args.pop(0)
        else:
            sys.exit(__doc__)

    from microbroker import config
    tmp = tempfile.mkdtemp(prefix="mb-bench-", dir=state_base)
    disk = tempfile.mkdtemp(prefix="mb-bench-")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()

    from microbroker.broker import log
    log.configure("stderr", "warning")

    def setup(where):
        path = os.path.join(where, "microbroker")
        with open(path, "w") as f:
            f.write(CONFIG % {"state": where + "/state", "port": port,
                              "max": n_leases + 100,
                              # a Linux bridge's ports (check-config),
                              # though the data plane here is 'none'
                              "capacity": min(n_leases + 20, 1020)})
        cfg = config.load(path)
        assert not cfg.problems, cfg.problems
        return path, cfg, populate(cfg, n_leases)
    t0 = time.perf_counter()
    cfgpath, cfg, leases = setup(tmp)
    t_pop = time.perf_counter() - t0
    disk_cfgpath, disk_cfg, disk_leases = setup(disk)
    from microbroker.leases import LeaseStore
    backend = LeaseStore(cfg.lease_path).backend

    print("python %s (%s), lease store %s, %d leases (made in %.1f s), "
          "lease file in %s, on disk in %s"
          % (sys.version.split()[0], sys.executable, backend, n_leases,
             t_pop, tmp, disk))

    # -- CGI against the bare interpreter, interleaved
    py = os.path.realpath(sys.executable)
    bare = ([py, "-I", "-S", "-c", "pass"], {}, b"")

    installed = package_copy(tmp, sourceless=True)

    def cgi_job(path, method, route, client, body=b"", boot=CGI_BOOT):
        return ([py, "-I", "-S", "-c", boot],
                cgi_env(path, method, route, client, body), body)

    # A new lease each time, from a client that holds none: one address
    # past the populated ones, its lease removed before the next run.
    newcomer = client_addr(n_leases)

    def lease_and_renew(path, lease_path, held, boot=CGI_BOOT):
        """(a new lease, what removes it after each run, a renew of held[0])."""
        store = LeaseStore(lease_path)

        def unlease():
            mine = store.leases(newcomer)
            if len(mine) != 1:
                raise SystemExit("the CGI lease made %d leases" % len(mine))
            store.remove(mine[0].lease_id)
        c, lid, sec = held[0]
        return (cgi_job(path, "POST", "/lease", newcomer, b"service=v4",
                        boot),
                unlease,
                cgi_job(path, "POST", "/renew", c,
                        ("lease_id=%s&secret=%s" % (lid, sec)).encode(), boot))
    cgi_lease, unlease, cgi_renew = lease_and_renew(cfgpath, cfg.lease_path,
                                                    leases)
    disk_lease, disk_unlease, disk_renew = lease_and_renew(
        disk_cfgpath, disk_cfg.lease_path, disk_leases)
    inst_boot = CGI_BOOT.replace(repr(ROOT), repr(installed))
    inst_lease, _, inst_renew = lease_and_renew(cfgpath, cfg.lease_path,
                                                leases, inst_boot)
    jobs = (("bare", bare, None),
            ("offer", cgi_job(cfgpath, "GET", "/offer", leases[0][0]), None),
            ("lease", cgi_lease, unlease),
            ("renew", cgi_renew, None),
            ("lease, lease file on disk", disk_lease, disk_unlease),
            ("renew, lease file on disk", disk_renew, None),
            ("offer, installed as .pyc", cgi_job(cfgpath, "GET", "/offer",
                                                 leases[0][0], b"", inst_boot),
             None),
            ("lease, installed as .pyc", inst_lease, unlease),
            ("renew, installed as .pyc", inst_renew, None))
    res = {name: [] for name, _, _ in jobs}
    for _, job, after in jobs:   # warm the page cache, pyc
        measured_child(*job, after=after)
    for _ in range(rounds):
        for name, job, after in jobs:
            wall, cpu = measured_child(*job, after=after, cpu=True)
            res[name].append((wall, measured_child(*job, hwm=True,
                                                   after=after), cpu))
    # Where a CGI request's time goes: the import of each part alone.
    parts = [
        ("front door (cgi, web, config, broker)",
         "import microbroker.cgi, microbroker.web"),
        ("lease store (microbroker.leases.store)",
         "import microbroker.leases.store"),
        ("  json (only for listings of many leases)", "import json"),
        ("  secret (CPython's own _sha256, or hashlib's)",
         "import microbroker.leases.secret"),
        ("  hashlib, hmac (OpenSSL where Python has _hashlib)",
         "import hashlib, hmac"),
        ("kernel data plane (dataplane 'kernel')",
         "import microbroker.dataplane"),
    ]
    imports = {}
    for label, code in parts:
        job = ([py, "-I", "-S", "-c", "import sys; sys.path.insert(0, %r); "
                % ROOT + code], {}, b"")
        measured_child(*job)
        imports[label] = statistics.median(
            measured_child(*job) for _ in range(max(5, rounds // 2)))

    def med(name, i):
        return statistics.median(x[i] for x in res[name])

    # -- the server
    srv = subprocess.Popen([py, "-I", "-S", "-c", BOOT, "-c", cfgpath,
                            "serve"], stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if time.time() > deadline or srv.poll() is not None:
                    raise SystemExit("server did not start: %s"
                                     % srv.stderr.read().decode())
                time.sleep(0.05)
        rss_idle = rss_kib(srv.pid)
        http(port, "127.0.0.1", offer_req())
        results = {}
        for kind in ("offer", "renew"):
            for threads in (1, 4):
                results[(kind, threads)] = load(port, leases, kind, n_req,
                                                threads)
        rss = rss_kib(srv.pid)
        hwm = rss_kib(srv.pid, "VmHWM")
    finally:
        srv.terminate()
        srv.wait(timeout=30)
    bare_rss = bare_resident()
    stack_rss = [
        ("RSS: import of http.server alone (+ ssl)",
         bare_resident("import http.server")),
        ("RSS: import of the service and its http.server handler",
         bare_resident("import microbroker.service, microbroker.server")),
        ("RSS: + lease store and its dbm",
         bare_resident("import microbroker.service, microbroker.server, "
                       "microbroker.leases.store; "
                       "from microbroker.leases import dbfile; "
                       "dbfile._module(%r)" % backend)),
    ]

    bw, bm, bc = med("bare", 0) * 1000, med("bare", 1), med("bare", 2) * 1000
    print()
    print("%-52s %12s %12s %8s" % ("measure", "value", "baseline", "ratio"))
    print("-" * 87)
    for name, _, _ in jobs[1:]:
        w, m, c = med(name, 0) * 1000, med(name, 1), med(name, 2) * 1000
        print("%-52s %9.1f ms %9.1f ms %7.2fx" % (
            "CGI %s: wall time (median of %d)" % (name, rounds), w, bw,
            w / bw))
        print("%-52s %9.1f ms %9.1f ms %7.2fx" % (
            "CGI %s: CPU time, user + system" % name, c, bc, c / bc))
        print("%-52s %8.1f MiB %8.1f MiB %7.2fx" % (
            "CGI %s: peak memory" % name, m / 1024, bm / 1024, m / bm))
    for label, wall in imports.items():
        print("%-52s %9.1f ms %9.1f ms %7.2fx" % (
            "import " + label if not label.startswith(" ") else label,
            wall * 1000, bw, wall * 1000 / bw))
    print("%-52s %8.1f MiB %8.1f MiB %7.2fx" % (
        "server RSS, %d leases, idle" % n_leases, rss_idle / 1024,
        bare_rss / 1024, rss_idle / bare_rss))
    print("%-52s %8.1f MiB %8.1f MiB %7.2fx" % (
        "server RSS, %d leases, after load" % n_leases, rss / 1024,
        bare_rss / 1024, rss / bare_rss))
    print("%-52s %8.1f MiB %8.1f MiB %7.2fx" % (
        "server peak RSS (VmHWM)", hwm / 1024, bare_rss / 1024,
        hwm / bare_rss))
    for label, kib in stack_rss:
        print("%-52s %8.1f MiB %8.1f MiB %7.2fx" % (
            label, kib / 1024, bare_rss / 1024, kib / bare_rss))
    for (kind, threads), (rps, ms) in results.items():
        print("%-52s %9.0f /s %9.2f ms %8s" % (
            "server %s, %d client%s: req/s, median" % (
                kind, threads, "s" if threads > 1 else ""), rps, ms, ""))
    print()
    print("goals: CGI wall <= 1.5x bare interpreter; server RSS <= 1.5x "
          "bare interpreter")
    subprocess.run(["rm", "-rf", tmp, disk])


if __name__ == "__main__":
    main()
