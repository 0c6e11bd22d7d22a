"""The broker end to end in a real kernel: HTTP lease -> kernel tunnel -> ping -> release/expiry."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import urlencode

import pytest

from microbroker import config as mbconfig, l2tp, rtnl, wiring
from nsutil import inside, ping, run, wait_for

pytestmark = pytest.mark.kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT6, CLIENT6 = "fc00:1::1", "fc00:1::2"

CONFIG = """
config broker 'main'
	option state_dir '%(state)s'
	list listen '[%(exit)s]:8053'
	option tunnel_ids '100-199'
	option session_ids '100-199'
	option sweep_interval '1'
config service 'exit'
	option endpoint '%(exit)s'
	option lifetime '600'
"""


@pytest.fixture
def net(netns, tmp_path):
    ex, cl = netns.add("x"), netns.add("c")
    netns.link(ex, cl, EXIT6 + "/64", CLIENT6 + "/64")
    cfg = tmp_path / "microbroker"
    cfg.write_text(CONFIG % {"state": tmp_path / "state", "exit": EXIT6})
    procs = []

    def start(reconciled=False):
        """The server, answering offers; with `reconciled`, also past its
        start-up reconcile (offers are answered while it runs)."""
        p = subprocess.Popen(["ip", "netns", "exec", ex, sys.executable, "-m", "microbroker",
                              "-c", str(cfg), "serve"], cwd=ROOT, stderr=subprocess.PIPE,
                             text=True)
        p.said = []
        threading.Thread(target=lambda: p.said.extend(p.stderr), daemon=True).start()
        procs.append(p)
        if not wait_for(lambda: _up(cl), 60):
            p.terminate()
            p.wait(10)
            raise AssertionError("broker did not start: %s" % "".join(p.said))
        if reconciled:
            # Its own line: the test's directory, in the "listening" line,
            # may say "reconcile" too.
            assert wait_for(lambda: any(": start-up reconcile done: " in line
                                        for line in p.said), 60), "".join(p.said)
        return p
    yield ex, cl, start, str(cfg)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(10)


def _up(ns):
    try:
        return _request(ns, "GET", "/offer")[0] == 200
    except OSError:
        return False


def request(ns, method, path, fields=None):
    """One request; a 503 busy (the broker still reconciling at start, or its
    lease file's lock) is asked again after its Retry-After, as clients do."""
    deadline = time.monotonic() + 60
    while True:
        status, answer = _request(ns, method, path, fields)
        if status != 503 or answer.get("error", {}).get("code") != "busy" or \
                time.monotonic() > deadline:
            return status, answer
        time.sleep(answer["error"].get("retry_after", 1))


def _request(ns, method, path, fields=None):
    with inside(ns):
        c = http.client.HTTPConnection(EXIT6, 8053, timeout=10)
        c.connect()
    try:
        body = urlencode(fields) if fields else None
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
        c.request(method, path, body, headers)
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        c.close()


def client_end(ns, lease):
    with inside(ns), l2tp.L2TP() as l2, rtnl.Rtnl() as rt:
        l2.create_tunnel(lease["tunnel_id"], lease["peer_tunnel_id"], lease["local"],
                         lease["remote"])
        l2.create_session(lease["tunnel_id"], lease["session_id"], lease["peer_session_id"],
                          ifname="pw0")
        rt.set_mtu("pw0", lease["mtu"])
        rt.set_up("pw0")
        rt.add_address("pw0", "10.99.0.2/24")


def test_http_lease_builds_kernel_side_and_release_removes_it(net):
    ex, cl, start, _cfg = net
    start()
    status, offer = request(cl, "GET", "/offer")
    assert status == 200 and offer["kernel"] is True
    status, lease = request(cl, "POST", "/lease", {"service": "exit"})
    assert status == 200, lease
    assert lease["local"] == CLIENT6 and lease["remote"] == EXIT6
    # The kernel's view (iproute2 as oracle): tunnel towards the requester, bridged port.
    out = run("ip", "l2tp", "show", "tunnel", ns=ex)
    assert "Tunnel %d, encap IP" % lease["peer_tunnel_id"] in out
    assert "From %s to %s" % (EXIT6, CLIENT6) in out
    exit_if = "mb%d" % lease["peer_tunnel_id"]
    link = run("ip", "link", "show", exit_if, ns=ex)
    assert "master br-exit" in link and "mtu 1280" in link
    run("ip", "addr", "add", "10.99.0.1/24", "dev", "br-exit", ns=ex)
    client_end(cl, lease)
    assert ping(cl, "10.99.0.1")
    auth = {"lease_id": lease["lease_id"], "secret": lease["secret"]}
    status, st = request(cl, "POST", "/status", auth)
    assert status == 200 and st["counters"]["rx_packets"] >= 1
    status, r = request(cl, "POST", "/renew", auth)
    assert status == 200 and r["expires"] >= lease["expires"]
    # The exit's tunnel deleted by hand while the lease lives: the next
    # renew builds it again.
    run("ip", "l2tp", "del", "tunnel", "tunnel_id", lease["peer_tunnel_id"], ns=ex)
    assert wait_for(lambda: exit_if not in run("ip", "-o", "link", ns=ex))
    assert not ping(cl, "10.99.0.1", count=1, timeout=1)
    status, r = request(cl, "POST", "/renew", auth)
    assert status == 200
    assert "master br-exit" in run("ip", "link", "show", exit_if, ns=ex)
    assert wait_for(lambda: ping(cl, "10.99.0.1", count=1), timeout=20)
    status, r = request(cl, "POST", "/release", auth)
    assert status == 200 and r["released"] is True
    assert wait_for(lambda: run("ip", "l2tp", "show", "tunnel", ns=ex).strip() == "")
    assert request(cl, "POST", "/status", auth)[0] == 404


def test_kernel_failure_rolls_the_lease_back(net):
    ex, cl, start, _cfg = net
    start(reconciled=True)      # which would remove a tunnel in its id range
    # Take the exit's tunnel id the store will hand out first: the kernel refuses.
    run("ip", "l2tp", "add", "tunnel", "tunnel_id", 100, "peer_tunnel_id", 9, "encap", "ip",
        "local", EXIT6, "remote", "fc00:1::99", ns=ex)
    status, lease = request(cl, "POST", "/lease", {"service": "exit"})
    # Either the broker skipped the busy id (it asks the kernel) or it rolled back.
    if status == 200:
        assert lease["peer_tunnel_id"] != 100
        assert "Tunnel %d," % lease["peer_tunnel_id"] in run("ip", "l2tp", "show", "tunnel",
                                                             ns=ex)
    else:
        assert lease["error"]["code"] == "kernel"


def test_expired_lease_is_swept_from_kernel_and_file(net):
    ex, cl, _start, cfg = net
    config = mbconfig.load(cfg)
    assert config.problems == []
    with inside(ex):
        b = wiring.make_broker(config)
        v = b.lease(CLIENT6, "exit")
        assert "Tunnel %d," % v["peer_tunnel_id"] in run("ip", "l2tp", "show", "tunnel")
        assert len(b.store.leases()) == 1
        now = time.time()
        b.clock = lambda: now + 601       # a lifetime later, never renewed, no traffic
        gone = b.sweep()
    assert [l.lease_id for l in gone] == [v["lease_id"]]
    assert wait_for(lambda: run("ip", "l2tp", "show", "tunnel", ns=ex).strip() == "")
    assert b.store.leases() == []


def test_restart_reconciles_what_changed_while_down(net):
    ex, cl, start, _cfg = net
    p = start()
    status, lease = request(cl, "POST", "/lease", {"service": "exit"})
    assert status == 200
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    tid = lease["peer_tunnel_id"]
    run("ip", "l2tp", "del", "session", "tunnel_id", tid, "session_id", lease["peer_session_id"],
        ns=ex)
    run("ip", "l2tp", "add", "tunnel", "tunnel_id", 150, "peer_tunnel_id", 150, "encap", "ip",
        "local", EXIT6, "remote", CLIENT6, ns=ex)
    assert wait_for(lambda: "mb%d" % tid not in run("ip", "link", ns=ex))
    start(reconciled=True)      # offers come first; the reconcile is what this is about
    assert wait_for(lambda: "Tunnel 150," not in run("ip", "l2tp", "show", "tunnel", ns=ex))
    assert "master br-exit" in run("ip", "link", "show", "mb%d" % tid, ns=ex)


def test_cgi_lease_and_renew_on_the_kernel_data_plane_stay_small(net):
    """An exit's own CGI: a lease builds its tunnel and bridge port and
    checks the filter tables by netlink, a renew asks the kernel for the
    port; neither loads os, socket.py, enum or subprocess. (The first
    lease creates the bridge and the tables, with `nft -f`.)"""
    ex, _cl, _start, cfg = net
    boot = ("import sys; sys.path.insert(0, %r); from microbroker.cgi import main; "
            "main(); sys.stderr.write(' '.join(sorted(sys.modules)))" % ROOT)

    def cgi(path, body, remote=CLIENT6):
        env = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": "format=sh",
               "REMOTE_ADDR": remote, "SERVER_ADDR": EXIT6, "MICROBROKER_CONFIG": cfg,
               "CONTENT_TYPE": "application/x-www-form-urlencoded",
               "CONTENT_LENGTH": str(len(body)), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        p = subprocess.run(["ip", "netns", "exec", ex, sys.executable, "-I", "-S", "-c",
                            boot], input=body, env=env, capture_output=True, timeout=60)
        assert b"STATUS='200'" in p.stdout, (p.stdout, p.stderr)
        fields = dict(l.split("=", 1) for l in p.stdout.decode().splitlines() if "=" in l)
        return {k: v.strip("'") for k, v in fields.items()}, \
            set(p.stderr.decode().rpartition("\n")[2].split())

    cgi("/lease", b"service=exit", remote="fc00:1::3")
    lease, lease_mods = cgi("/lease", b"service=exit")
    with inside(ex), l2tp.L2TP() as l2, rtnl.Rtnl() as rt:
        mine = [t for t, remote in l2.tunnel_remotes().items() if remote == CLIENT6]
        assert len(mine) == 1
        assert rt.link("mb%d" % mine[0]).flags & rtnl.IFF_UP
    _, renew_mods = cgi("/renew", ("lease_id=%s&secret=%s" % (
        lease["LEASE_ID"], lease["SECRET"])).encode())
    assert "microbroker.filters" in lease_mods and "microbroker.l2tp" in lease_mods
    assert "microbroker.rtnl" in renew_mods
    for what, mods in (("lease", lease_mods), ("renew", renew_mods)):
        for bad in ("os", "_collections_abc", "socket", "enum", "subprocess", "selectors",
                    "struct", "threading"):
            assert bad not in mods, (what, bad)
