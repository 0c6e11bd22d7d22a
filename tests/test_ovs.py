"""Open vSwitch backend: OVSDB framing, and ports and flows on a real OVS.

The real-OVS tests run Debian's ovsdb-server and ovs-vswitchd (userspace
`netdev` datapath: no kernel module needed) in a scratch directory and a
network namespace of their own, with veth devices as the leases' ports, and
ask ovs-vswitchd itself (ofproto/trace) where a frame would go.
"""

import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from microbroker import ovs, ovsdb, rtnl
import ovsutil


# ---- framing, against bytes as ovsdb-server writes them -----------------------

def _pair(script):
    """A client on one end of a socketpair; `script(server_sock)` plays
    the server on the other in a thread."""
    a, b = socket.socketpair()
    t = threading.Thread(target=script, args=(b,), daemon=True)
    t.start()
    return ovsdb.Ovsdb("test", timeout=5, sock=a), t


def _read_request(s, buf=b""):
    dec = json.JSONDecoder()
    while True:
        try:
            msg, end = dec.raw_decode(buf.decode())
            return msg, buf[end:]
        except ValueError:
            buf += s.recv(4096)


def test_replies_back_to_back_split_and_after_an_echo():
    seen = []

    def server(s):
        req, _ = _read_request(s)
        # An echo request and a notification before the reply; the reply
        # split inside a multibyte character and glued to the next one.
        s.sendall(b'{"id":"echo","method":"echo","params":[7]}')
        s.sendall(b'  {"id":null,"method":"update","params":["m",{}]}\n')
        echo, rest = _read_request(s)
        seen.append(echo)
        reply = json.dumps({"id": req["id"], "result": [{"rows": [{"name": "p\u00e4"}]}],
                            "error": None}).encode("utf-8")
        reply = reply.replace(b"\\u00e4", "\u00e4".encode())
        cut = reply.index("\u00e4".encode()) + 1
        s.sendall(reply[:cut])
        s.sendall(reply[cut:] + b'{"id":%d,"result":[{"count":1}],"error":null}'
                  % (req["id"] + 1))
        s.recv(4096)        # the second request; its reply is already there

    db, t = _pair(server)
    assert db.transact({"op": "select"})[0]["rows"][0]["name"] == "p\u00e4"
    assert seen == [{"id": "echo", "result": [7], "error": None}]
    assert db.transact({"op": "mutate"})[0]["count"] == 1
    t.join(5)


def test_a_long_reply_cut_after_an_inner_brace():
    rows = [{"name": "mb%d" % i, "external_ids": ["map", [["mb-lease", "%d" % i]]]}
            for i in range(2000)]
    rows[1000]["name"] = "a}b"

    def server(s):
        req, _ = _read_request(s)
        reply = json.dumps({"id": req["id"], "result": [{"rows": rows}], "error": None})
        # Reads that end in "}" before the end: an inner object's, and one
        # inside a string.
        inner = reply.index("}") + 1
        in_string = reply.index("a}b") + 2
        for a, b in ((0, inner), (inner, in_string), (in_string, len(reply))):
            s.sendall(reply[a:b].encode())
            time.sleep(0.05)    # separate reads, most likely

    db, t = _pair(server)
    assert db.transact({"op": "select"})[0]["rows"] == rows
    t.join(5)


def test_a_failed_op_and_an_error_without_result_raise():
    def server(s):
        req, _ = _read_request(s)
        # ovsdb-server 3.1: error null at the top, the failure in result.
        s.sendall(json.dumps({"id": req["id"], "error": None, "result": [
            {"count": 1}, {"error": "constraint violation", "details": "dup name"}, None]})
            .encode())
        req, _ = _read_request(s)
        s.sendall(json.dumps({"id": req["id"], "error": "unknown method"}).encode())
        _read_request(s)
        s.close()

    db, t = _pair(server)
    with pytest.raises(ovsdb.TransactionError) as e:
        db.transact({"op": "a"}, {"op": "b"}, {"op": "c"})
    assert e.value.error == "constraint violation" and "dup name" in str(e.value)
    with pytest.raises(ovsdb.TransactionError, match="unknown method"):
        db.call("nope", [])
    with pytest.raises(ovsdb.ProtocolError, match="closed"):
        db.call("list_dbs", [])
    t.join(5)


def test_no_server_is_not_available(tmp_path):
    with pytest.raises(ovsdb.NotAvailable):
        ovsdb.Ovsdb(str(tmp_path / "db.sock"))


def test_profile_rules_name_their_protocols():
    flows = ovs.profile_flows(7, [443, 80])
    assert all("in_port=7," in f or "in_port=7 " in f for f in flows)
    assert flows[-1] == "cookie=0x6d62000100000007,priority=500,in_port=7 actions=drop"
    for f in flows:
        # A bare tp_dst would be normalized to a match on everything.
        if "_dst=" in f:
            assert any(p in f for p in (",udp,", ",udp6,", ",tcp,", ",tcp6,"))
    assert any("tcp6,tcp_dst=443" in f for f in flows)
    assert not any("tcp_dst=22" in f for f in flows)
    with pytest.raises(ValueError):
        ovs.profile_flows(ovsdb.OFPP_LOCAL, [80])


# ---- a real Open vSwitch ----------------------------------------------------

need_ovs = pytest.mark.skipif(bool(ovsutil.missing()), reason=ovsutil.missing() or "ok")


@pytest.fixture
def switch(tmp_path, netns):
    ns = netns.add("o")
    o = ovsutil.Ovs(tmp_path, ns=ns).start()
    cfg = SimpleNamespace(ovsdb=o.socket, ovs_datapath="netdev")
    yield SimpleNamespace(ovs=o, ns=ns, backend=ovs.Backend(cfg), cfg=cfg)
    o.stop()


def svc(restrict="none", isolate=True):
    return SimpleNamespace(name="exit", bridge_backend="ovs", restrict=restrict,
                           ports=[80, 443] if restrict != "none" else [], isolate=isolate)


def lease(i):
    return SimpleNamespace(ifname="mb%d" % i, lease_id="L%d" % i, service="exit")


def devices(sw, *ids):
    from nsutil import inside
    for i in ids:
        rtnl_run = ["ip", "-n", sw.ns, "link", "add", "mb%d" % i, "type", "veth", "peer",
                    "name", "pe%d" % i]
        import subprocess
        subprocess.run(rtnl_run, check=True)
        with inside(sw.ns), rtnl.Rtnl() as rt:
            rt.set_up("mb%d" % i)
            rt.set_up("pe%d" % i)


def ensure(sw, service, backend=None):
    from nsutil import inside
    with inside(sw.ns), rtnl.Rtnl() as rt:
        (backend or sw.backend).ensure_service(service, "br-exit", rt, "02:6d:42:00:00:01")


def ofports(sw):
    """Once ovs-vswitchd has taken up every port (join does not wait for
    an unrestricted one)."""
    with ovsdb.Ovsdb(sw.ovs.socket) as db:
        db.wait_applied()
        return {n: p.ofport for n, p in db.ports("br-exit").items()}


def trace(sw, in_port, flow):
    """Where ovs-vswitchd would send this frame: output port names, or
    'drop'."""
    out = sw.ovs.appctl("ofproto/trace", "br-exit", "in_port=%s,%s" % (in_port, flow))
    last = [l for l in out.splitlines() if l.startswith("Datapath actions:")][-1]
    acts = last.split(":", 1)[1].strip()
    if acts == "drop":
        return "drop"
    dp = {}
    for line in sw.ovs.appctl("dpif/show").splitlines():
        # "    mb1 1/3: (system)": name, ofport/datapath port
        parts = line.split()
        if len(parts) >= 2 and "/" in parts[1]:
            dp[parts[1].split("/")[1].rstrip(":")] = parts[0]
    return sorted(dp.get(a, a) for a in acts.split(","))


BCAST = "dl_src=02:00:00:00:00:0%d,dl_dst=ff:ff:ff:ff:ff:ff,dl_type=0x0806"


@need_ovs
def test_ports_are_isolated_and_beacons_dropped(switch):
    devices(switch, 1, 2, 3)
    ensure(switch, svc())
    for i in (1, 2, 3):
        switch.backend.join(lease(i), svc(), "br-exit")
    port = ofports(switch)
    assert port["br-exit"] == ovsdb.OFPP_LOCAL and all(port["mb%d" % i] > 0 for i in (1, 2, 3))
    # A client's broadcast reaches the exit's own port only...
    assert trace(switch, port["mb1"], BCAST % 1) == ["br-exit"]
    # ...the exit's reaches every client...
    assert trace(switch, "LOCAL", BCAST % 9) == ["mb1", "mb2", "mb3"]
    # ...and a beacon reaches no one, from either side.
    assert trace(switch, port["mb2"], "dl_type=0xfc00") == "drop"
    assert trace(switch, "LOCAL", "dl_type=0xfc00") == "drop"
    # Without isolation, clients see each other.
    devices(switch, 4)
    switch.backend.join(lease(4), svc(isolate=False), "br-exit")
    with ovsdb.Ovsdb(switch.ovs.socket) as db:
        assert not db.ports("br-exit")["mb4"].protected
    # Leaving removes the port.
    switch.backend.leave(lease(2), svc(), "br-exit")
    assert "mb2" not in ofports(switch)


@need_ovs
def test_restricted_port_reaches_dns_and_web_only(switch):
    devices(switch, 1, 2)
    s = svc("dns+web")
    ensure(switch, s)
    switch.backend.join(lease(1), s, "br-exit")
    switch.backend.join(lease(2), s, "br-exit")
    p = ofports(switch)["mb1"]
    ip = "dl_src=02:00:00:00:00:01,dl_dst=02:6d:42:00:00:01,"
    assert trace(switch, p, ip + "tcp,nw_dst=10.0.0.1,tcp_dst=80") == ["br-exit"]
    assert trace(switch, p, ip + "tcp6,ipv6_dst=2001:db8::1,tcp_dst=443") == ["br-exit"]
    assert trace(switch, p, ip + "udp,nw_dst=10.0.0.1,udp_dst=53") == ["br-exit"]
    assert trace(switch, p, ip + "tcp,nw_dst=10.0.0.1,tcp_dst=22") == "drop"
    assert trace(switch, p, ip + "udp,nw_dst=10.0.0.1,udp_dst=443") == "drop"
    # A port without its profile's rules (not in yet, or gone) drops even
    # what a profile allows: it does not fall through to NORMAL.
    devices(switch, 3)
    with ovsdb.Ovsdb(switch.ovs.socket) as db:
        db.add_port("br-exit", "mb3", True, {ovsdb.LEASE_KEY: "x"})
    assert trace(switch, ofports(switch)["mb3"], "dl_src=02:00:00:00:00:03,"
                 "dl_dst=02:6d:42:00:00:01,tcp,nw_dst=10.0.0.1,tcp_dst=80") == "drop"
    # Replies come back: the profile is on ingress from the client only.
    assert trace(switch, "LOCAL", "dl_src=02:6d:42:00:00:01,dl_dst=ff:ff:ff:ff:ff:ff,"
                 "tcp,tcp_src=22") == ["mb1", "mb2", "mb3"]
    # A lease's rules go with it; the other lease keeps its own.
    n = len(ovs.profile_flows(p, s.ports))
    of = switch.backend.flows("br-exit")
    assert of.count(ovs.lease_cookie(p)) == n
    switch.backend.leave(lease(1), s, "br-exit")
    assert of.count(ovs.lease_cookie(p)) == 0
    assert of.count(ovs.lease_cookie(ofports(switch)["mb2"])) == n


@need_ovs
def test_restart_and_reconcile_restore_ports_and_flows(switch):
    devices(switch, 1, 2, 3, 4)
    s = svc("dns+web")
    ensure(switch, s)
    for i in (1, 2, 3):
        switch.backend.join(lease(i), s, "br-exit")
    before = switch.ovs.dump_flows("br-exit")
    assert len(before) == len(ovs.base_flows(True)) + 3 * len(ovs.profile_flows(1, s.ports))
    # ovs-vswitchd keeps flows in memory only: a new one starts with none
    # (fail_mode secure: nothing passes).
    switch.ovs.kill("ovs-vswitchd")
    switch.ovs.start_vswitchd()
    with ovsdb.Ovsdb(switch.ovs.socket) as db:
        db.ofport("br-exit")
    assert switch.ovs.dump_flows("br-exit") == []
    # The next lease (a new CGI process, or this server) puts them all back.
    ensure(switch, s, ovs.Backend(switch.cfg))
    assert switch.ovs.dump_flows("br-exit") == before
    ensure(switch, s)           # the server's own backend sees the new vswitchd too
    assert switch.ovs.dump_flows("br-exit") == before
    # Reconcile: lease 3 is gone, lease 4's device lost its port, a stray
    # flow of ours is removed, the operator's flow stays.
    with ovsdb.Ovsdb(switch.ovs.socket) as db:
        db.delete_port("mb1")
    of = switch.backend.flows("br-exit")
    of.apply(["add cookie=0x6d620001000003e7,priority=600,in_port=999 actions=drop",
              "add cookie=0x5,priority=1,arp actions=NORMAL"])
    live = [lease(1), lease(2), lease(4)]
    report = {"failed": []}
    switch.backend.reconcile(s, "br-exit", live, {"mb1", "mb2", "mb3", "mb4"}, report)
    assert report["failed"] == []
    assert report["ports_removed"] == ["mb3"] and report["ports_added"] == ["mb1", "mb4"]
    port = ofports(switch)
    assert sorted(port) == ["br-exit", "mb1", "mb2", "mb4"]
    flows = switch.ovs.dump_flows("br-exit")
    assert not any("in_port=999" in f for f in flows)
    assert any(f.startswith("cookie=0x5,") for f in flows)
    for name in ("mb1", "mb2", "mb4"):
        assert of.count(ovs.lease_cookie(port[name])) == len(ovs.profile_flows(1, s.ports))
    assert trace(switch, port["mb4"], "dl_src=02:00:00:00:00:04,dl_dst=ff:ff:ff:ff:ff:ff,"
                 "tcp,tcp_dst=22") == "drop"
    # A second reconcile changes no port.
    report = {"failed": []}
    switch.backend.reconcile(s, "br-exit", live, {"mb1", "mb2", "mb4"}, report)
    assert "ports_added" not in report and "ports_removed" not in report
