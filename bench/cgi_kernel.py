"""CGI lease and renew on the kernel data plane, as an exit's uhttpd runs them.

Run in the VM (root, L2TP):
    tests/vm/run exec /usr/bin/python3 bench/cgi_kernel.py [ROUNDS]

bench/broker.py measures the CGI with `dataplane 'none'` on the host; here
each lease builds its L2TP tunnel and bridge port in the exit's namespace
and each renew asks the kernel for the port. The package is copied to the
VM's memory first, as it sits on an exit's own filesystem (bench/scale.py
says why). The first lease, which creates the bridge and the filter tables,
is left out. Against a bare `python3 -I -S` measured in the same rounds.
Goal (issue 17): each at most 1.5x the bare start.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from nsutil import Namespaces, inside  # noqa: E402

from benchutil import exit_and_client, package_copy  # noqa: E402 (beside this file)

EXIT6 = "fc00:1::1"
CONFIG = """
config broker
	option dataplane 'kernel'
	option state_dir '%(state)s'
	option sweep_interval '3600'
	option log_level 'warning'
config service 'exit'
	option endpoint '%(exit)s'
"""


def client(i):
    return "fc00:1::%x" % (0x1000 + i)


def cgi(ns, root, cfg, path, remote, body):
    """Wall seconds and the answer's fields of one CGI request in ns."""
    env = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": "format=sh",
           "REMOTE_ADDR": remote, "SERVER_ADDR": EXIT6, "MICROBROKER_CONFIG": cfg,
           "CONTENT_TYPE": "application/x-www-form-urlencoded",
           "CONTENT_LENGTH": str(len(body)), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    boot = "import sys; sys.path.insert(0, %r); from microbroker.cgi import run; run()" % root
    argv = [sys.executable, "-I", "-S", "-c", boot]
    with inside(ns):    # the child starts in the exit's namespace, as uhttpd's would
        t0 = time.perf_counter()
        p = subprocess.run(argv, input=body, env=env, capture_output=True)
        took = time.perf_counter() - t0
    out = p.stdout.decode()
    if "STATUS='200'" not in out:
        raise SystemExit("%s failed: %s %s" % (path, out, p.stderr.decode()))
    fields = dict(l.split("=", 1) for l in out.splitlines() if "=" in l)
    return took, {k: v.strip("'") for k, v in fields.items()}


def bare(ns):
    with inside(ns):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)
        return time.perf_counter() - t0


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    ns = Namespaces()
    tmp = tempfile.mkdtemp()
    root = package_copy()
    try:
        ex, _cl, cfg = exit_and_client(ns, tmp, CONFIG, EXIT6)
        cgi(ex, root, cfg, "/lease", client(0), b"service=exit")     # bridge, tables
        res = {"bare": [], "lease": [], "renew": []}
        for i in range(1, rounds + 1):
            res["bare"].append(bare(ex))
            took, lease = cgi(ex, root, cfg, "/lease", client(i), b"service=exit")
            res["lease"].append(took)
            body = ("lease_id=%s&secret=%s" % (lease["LEASE_ID"], lease["SECRET"])).encode()
            res["renew"].append(cgi(ex, root, cfg, "/renew", client(i), body)[0])
    finally:
        ns.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(res["bare"])
    print("CGI on the kernel data plane (VM, package in memory), median of %d" % rounds)
    print("%-44s %10s %8s" % ("request", "wall", "ratio"))
    for name, what in (("bare", "bare python3 -I -S"),
                       ("lease", "CGI lease (tunnel and bridge port built)"),
                       ("renew", "CGI renew (the port asked for)")):
        m = statistics.median(res[name])
        print("%-44s %7.1f ms %7.2fx" % (what, m * 1e3, m / base))
    print("goal: CGI lease and renew <= 1.5x bare")


if __name__ == "__main__":
    main()
