"""The exit dataplane in a real kernel: bridge, isolation, beacons, filters, reconcile."""

import os
import socket
import struct
import threading
from types import SimpleNamespace

import pytest

from microbroker import dataplane, l2tp, rtnl
from microbroker.leases import LeaseStore
from nsutil import inside, ping, run, wait_for

pytestmark = pytest.mark.kernel

EXIT_BR = "10.99.0.1"


def service(name="exit", restrict="none", ports=(), isolate=True):
    return SimpleNamespace(name=name, kind="l2tpv3", bridge="", isolate=isolate,
                           restrict=restrict,
                           ports=list(ports), mtu=1280)


@pytest.fixture
def exit_net(netns, tmp_path):
    """An exit with two clients, each on its own veth, and a lease store."""
    ex, clients = netns.exit_with_clients(2)
    cfg = SimpleNamespace(tunnel_ids=(100, 199), filter="")
    store = LeaseStore(str(tmp_path / "leases"), tunnel_ids=(100, 199),
                       session_ids=(100, 199))
    return SimpleNamespace(ns=ex, clients=clients, dp=dataplane.Dataplane(cfg), store=store,
                           cfg=cfg, netns=netns)


def lease_for(net, i, svc):
    lease, _secret, _ = net.store.allocate("fc00:%d::2" % i, svc.name, "l2tpv3", "ip",
                                           "fc00:%d::1" % i, 1280, 600)
    with inside(net.ns):
        net.dp.up(lease, svc)
        try:
            rtnl.Rtnl().add_address(dataplane.bridge_name(svc), EXIT_BR + "/24")
        except rtnl.LinkExists:
            pass
    return lease


def udp_arrives(ns_to, ns_from, src, dst, port=5353):
    """Does a datagram from src (an address in ns_from) reach dst:port?"""
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with inside(ns_to):
        r = socket.socket(fam, socket.SOCK_DGRAM)
    with inside(ns_from):
        s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        r.bind((dst, port))
        r.settimeout(1.5)
        s.bind((src, 0))
        s.sendto(b"from " + src.encode(), (dst, port))
        try:
            return r.recv(64) == b"from " + src.encode()
        except socket.timeout:
            return False
    finally:
        r.close()
        s.close()


def client_end(net, i, lease, addr):
    """The client's side, built with our module (the shell client is tested elsewhere)."""
    with inside(net.clients[i - 1]), l2tp.L2TP() as l2, rtnl.Rtnl() as rt:
        l2.create_tunnel(lease.peer_tunnel_id, lease.tunnel_id, lease.remote, lease.local)
        l2.create_session(lease.peer_tunnel_id, lease.peer_session_id, lease.session_id,
                          ifname="pw0")
        rt.set_mtu("pw0", lease.mtu)
        rt.set_up("pw0")
        rt.add_address("pw0", addr + "/24")


def test_two_clients_reach_the_exit_but_not_each_other(exit_net):
    svc = service()
    l1, l2_ = lease_for(exit_net, 1, svc), lease_for(exit_net, 2, svc)
    client_end(exit_net, 1, l1, "10.99.0.11")
    client_end(exit_net, 2, l2_, "10.99.0.12")
    c1, c2 = exit_net.clients
    assert ping(c1, EXIT_BR) and ping(c2, EXIT_BR)
    assert not ping(c1, "10.99.0.12", count=2, timeout=1)
    assert not ping(c2, "10.99.0.11", count=2, timeout=1)
    out = run("bridge", "-d", "link", "show", "dev", l1.ifname, ns=exit_net.ns)
    assert "isolated on" in out and "master br-exit" in out
    # A port has no IPv6 of its own: no link-local address, no route.
    assert run("ip", "-6", "-o", "addr", "show", "dev", l1.ifname, ns=exit_net.ns) == ""
    assert " dev %s " % l1.ifname not in run("ip", "-6", "route", "show", "table", "all",
                                            ns=exit_net.ns)
    # Nor through the exit as their router (which forwards: it is an exit)...
    run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=exit_net.ns)
    run("ip", "route", "add", "10.99.0.12/32", "via", EXIT_BR, ns=c1)
    assert udp_arrives(exit_net.ns, c1, "10.99.0.11", EXIT_BR)
    assert not udp_arrives(c2, c1, "10.99.0.11", "10.99.0.12")
    # ...because of our rule: the kernel alone routes it back into the bridge.
    run("nft", "flush", "chain", "inet", "microbroker", "isolate", ns=exit_net.ns)
    assert udp_arrives(c2, c1, "10.99.0.11", "10.99.0.12")
    # Teardown leaves no tunnel, interface or filter element behind.
    with inside(exit_net.ns):
        exit_net.dp.down(l1)
        exit_net.dp.down(l2_)
    assert wait_for(lambda: run("ip", "l2tp", "show", "tunnel", ns=exit_net.ns).strip() == "")
    with inside(exit_net.ns):
        assert exit_net.dp.filters().ports() == set()


def test_kernels_without_port_isolation_get_the_filter_rule(exit_net, monkeypatch):
    # As on a kernel before 4.18, which ignores IFLA_BRPORT_ISOLATED.
    # (nft only: the ebtables rule is the same line in static_rules, and
    # the ebtables backend has its own tests for beacons and restriction.)
    monkeypatch.setattr(dataplane, "port_isolation", lambda release=None: False)
    backend = exit_net.cfg.filter = "nft"
    svc = service()
    l1, l2_ = lease_for(exit_net, 1, svc), lease_for(exit_net, 2, svc)
    client_end(exit_net, 1, l1, "10.99.0.11")
    client_end(exit_net, 2, l2_, "10.99.0.12")
    c1, c2 = exit_net.clients
    assert "isolated on" not in run("bridge", "-d", "link", "show", "dev", l1.ifname,
                                    ns=exit_net.ns)
    assert ping(c1, EXIT_BR) and ping(c2, EXIT_BR)
    assert not ping(c1, "10.99.0.12", count=2, timeout=1)
    with inside(exit_net.ns):
        assert exit_net.dp.filters().name == backend


def listen(ns, addr, ports):
    """TCP listeners inside ns that accept and close; returns the sockets."""
    socks = []
    with inside(ns):
        for p in ports:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, p))
            s.listen(8)
            socks.append(s)

    def serve(s):
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            c.close()
    for s in socks:
        threading.Thread(target=serve, args=(s,), daemon=True).start()
    return socks


def reaches(ns, addr, port):
    with inside(ns):
        s = socket.socket()
    s.settimeout(1.5)
    try:
        s.connect((addr, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


@pytest.mark.parametrize("backend", ["nft", "ebtables"])
def test_restricted_client_reaches_dns_and_web_only(exit_net, backend):
    exit_net.cfg.filter = backend
    svc = service("web", restrict="dns+web", ports=(80, 443))
    srv = exit_net.netns.add("s")
    exit_net.netns.link(exit_net.ns, srv, "10.98.0.1/24", "10.98.0.2/24", name_a="srv0")
    run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=exit_net.ns)
    run("ip", "route", "add", "default", "via", "10.98.0.1", ns=srv)
    lease = lease_for(exit_net, 1, svc)
    client_end(exit_net, 1, lease, "10.99.0.11")
    c1 = exit_net.clients[0]
    run("ip", "route", "add", "default", "via", EXIT_BR, ns=c1)
    socks = listen(srv, "10.98.0.2", (53, 80, 443, 22, 8080))
    with inside(exit_net.ns):
        assert exit_net.dp.filters().ports() == {lease.ifname}
    try:
        assert reaches(c1, "10.98.0.2", 53)
        assert reaches(c1, "10.98.0.2", 80)
        assert reaches(c1, "10.98.0.2", 443)
        assert not reaches(c1, "10.98.0.2", 22)
        assert not reaches(c1, "10.98.0.2", 8080)
        # Rules gone while the links stay (an operator's flush): reconcile,
        # in this same process, restricts the live lease again.
        if backend == "nft":
            run("nft", "flush", "ruleset", ns=exit_net.ns)
        else:
            run("ebtables", "-t", "filter", "-F", ns=exit_net.ns)
        assert reaches(c1, "10.98.0.2", 22)
        with inside(exit_net.ns):
            report = exit_net.dp.reconcile(exit_net.store.leases(), [svc])
        assert report["filters_fixed"] == [lease.ifname] and not report["rebuilt"], report
        assert not reaches(c1, "10.98.0.2", 22)
        assert reaches(c1, "10.98.0.2", 80)
        # Its service gone from the config: the live lease keeps its rule.
        with inside(exit_net.ns):
            report = exit_net.dp.reconcile(exit_net.store.leases(), [])
            assert exit_net.dp.filters().ports() == {lease.ifname}, report
        assert not reaches(c1, "10.98.0.2", 22)
        # The same service without restriction reaches 22: the filter did it.
        with inside(exit_net.ns):
            exit_net.dp.filters().remove_port(lease.ifname)
        assert reaches(c1, "10.98.0.2", 22)
        with inside(exit_net.ns):
            assert exit_net.dp.filters().ports() == set()
    finally:
        for s in socks:
            s.close()


ETH_P_ALL = 3


def raw_socket(ns, ifname):
    with inside(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    s.settimeout(0.2)
    return s


def frame(ethertype, tag):
    return b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x99" + struct.pack("!H", ethertype) + \
        tag.ljust(46, b"\0")


def seen(sock, tag, tries=10):
    for _ in range(tries):
        try:
            data = sock.recv(2048)
        except socket.timeout:
            continue
        if tag in data:
            return True
    return False


@pytest.mark.parametrize("backend", ["nft", "ebtables"])
def test_cjdns_beacons_never_cross_a_pseudowire(exit_net, backend):
    exit_net.cfg.filter = backend
    svc = service()
    lease = lease_for(exit_net, 1, svc)
    client_end(exit_net, 1, lease, "10.99.0.11")
    c1 = exit_net.clients[0]
    # Client -> exit: watch the exit's bridge.
    watch = raw_socket(exit_net.ns, "br-exit")
    send = raw_socket(c1, "pw0")
    try:
        send.send(frame(0x88B5, b"control-in"))
        assert seen(watch, b"control-in")          # the path works...
        send.send(frame(0xFC00, b"beacon-in"))
        assert not seen(watch, b"beacon-in")       # ...but not for beacons
    finally:
        watch.close()
        send.close()
    with inside(exit_net.ns):
        assert exit_net.dp.filters().name == backend
    # Exit -> client: sent on the bridge, watched at the client's end.
    watch = raw_socket(c1, "pw0")
    send = raw_socket(exit_net.ns, "br-exit")
    try:
        send.send(frame(0x88B5, b"control-out"))
        assert seen(watch, b"control-out")
        send.send(frame(0xFC00, b"beacon-out"))
        assert not seen(watch, b"beacon-out")
    finally:
        watch.close()
        send.close()



def test_reconcile_restores_leases_and_removes_strays(exit_net):
    svc = service()
    l1, l2_ = lease_for(exit_net, 1, svc), lease_for(exit_net, 2, svc)
    client_end(exit_net, 1, l1, "10.99.0.11")
    ex = exit_net.ns
    # By hand, while "the broker is down": lose one session, add a stray in range.
    run("ip", "l2tp", "del", "session", "tunnel_id", l1.tunnel_id, "session_id", l1.session_id,
        ns=ex)
    run("ip", "l2tp", "add", "tunnel", "tunnel_id", 150, "peer_tunnel_id", 150, "encap", "ip",
        "local", "fc00:1::1", "remote", "fc00:1::2", ns=ex)
    # Out of our range: not ours to touch.
    run("ip", "l2tp", "add", "tunnel", "tunnel_id", 5000, "peer_tunnel_id", 5000, "encap", "ip",
        "local", "fc00:1::1", "remote", "fc00:1::2", ns=ex)
    assert wait_for(lambda: l1.ifname not in run("ip", "link", ns=ex))
    run("nft", "flush", "ruleset", ns=ex)       # and our filter tables are gone
    fresh = dataplane.Dataplane(exit_net.cfg)   # a restarted broker
    with inside(ex):
        report = fresh.reconcile(exit_net.store.leases(), [svc])
    assert report["rebuilt"] == [l1.lease_id]
    assert report["removed"] == [150]
    assert not report["failed"]
    tunnels = run("ip", "l2tp", "show", "tunnel", ns=ex)
    assert "Tunnel 150," not in tunnels and "Tunnel 5000," in tunnels
    out = run("ip", "link", "show", l1.ifname, ns=ex)
    assert "master br-exit" in out and "mtu 1280" in out and "UP" in out
    assert ping(exit_net.clients[0], EXIT_BR)
    assert 'oifname "mb*" ether type 0xfc00 drop' in run("nft", "list", "table", "bridge",
                                                         "microbroker", ns=ex)
    assert 'iifname "br-exit" oifname "br-exit" drop' in run("nft", "list", "table", "inet",
                                                             "microbroker", ns=ex)
    # Nothing left to do: a second pass changes nothing.
    with inside(ex):
        again = fresh.reconcile(exit_net.store.leases(), [svc])
    assert again == {"rebuilt": [], "removed": [], "links_removed": [], "failed": [],
                     "routes_added": [], "routes_removed": [], "filters_fixed": []}
    run("ip", "l2tp", "del", "tunnel", "tunnel_id", 5000, ns=ex)


def test_up_failure_leaves_nothing_behind(exit_net):
    svc = service()
    lease, _s, _ = exit_net.store.allocate("fc00:1::2", "exit", "l2tpv3", "ip",
                                           "fc00:9::1", 1280, 600)   # not our address
    with inside(exit_net.ns):
        with pytest.raises(l2tp.L2TPError, match="local address"):
            exit_net.dp.up(lease, svc)
        assert exit_net.dp.filters().ports() == set()
    assert run("ip", "l2tp", "show", "tunnel", ns=exit_net.ns).strip() == ""


def test_status_reports_capability():
    ok, why = dataplane.Dataplane(SimpleNamespace(tunnel_ids=(1, 2), filter="")).status()
    assert ok and why == "" if os.geteuid() == 0 else not ok


def test_ids_held_by_a_tunnel_not_ours_raise_id_in_use_and_touch_nothing(exit_net):
    """EEXIST for the lease's tunnel id (another tool's tunnel) or session id
    (L2TPv3 session ids are per netns): IdInUse naming the id, the other
    tunnel left alone, nothing of the lease left behind."""
    svc = service()
    ex = exit_net.ns
    lease, _s, _ = exit_net.store.allocate("fc00:1::2", "exit", "l2tpv3", "ip", "fc00:1::1",
                                           1280, 600)
    run("ip", "l2tp", "add", "tunnel", "tunnel_id", lease.tunnel_id, "peer_tunnel_id", 7,
        "encap", "ip", "local", "fc00:1::1", "remote", "fc00:1::9", ns=ex)
    with inside(ex), pytest.raises(dataplane.IdInUse) as e:
        exit_net.dp.up(lease, svc)
    assert (e.value.tunnel_id, e.value.session_id) == (lease.tunnel_id, 0)
    assert "Peer tunnel 7" in run("ip", "l2tp", "show", "tunnel", "tunnel_id",
                                  lease.tunnel_id, ns=ex)
    assert lease.ifname not in run("ip", "link", ns=ex)
    run("ip", "l2tp", "del", "tunnel", "tunnel_id", lease.tunnel_id, ns=ex)
    # Its session id, in another tunnel.
    run("ip", "l2tp", "add", "tunnel", "tunnel_id", 190, "peer_tunnel_id", 190, "encap", "ip",
        "local", "fc00:1::1", "remote", "fc00:1::9", ns=ex)
    run("ip", "l2tp", "add", "session", "tunnel_id", 190, "session_id", lease.session_id,
        "peer_session_id", 1, "name", "other0", ns=ex)
    assert wait_for(lambda: "Tunnel %d," % lease.tunnel_id not in
                    run("ip", "l2tp", "show", "tunnel", ns=ex))
    with inside(ex), pytest.raises(dataplane.IdInUse) as e:
        exit_net.dp.up(lease, svc)
    assert (e.value.tunnel_id, e.value.session_id) == (0, lease.session_id)
    assert wait_for(lambda: "Tunnel %d," % lease.tunnel_id not in
                    run("ip", "l2tp", "show", "tunnel", ns=ex))
    assert "other0" in run("ip", "link", ns=ex)
    # Other ids: it builds.
    lease = lease.replace(session_id=lease.session_id + 1)
    with inside(ex):
        exit_net.dp.up(lease, svc)
    assert "master br-exit" in run("ip", "link", "show", lease.ifname, ns=ex)


def nft_map(ns, family="bridge"):
    """{ifname: verdict} from `nft list map`, the independent oracle."""
    out = run("nft", "list", "map", family, "microbroker", "restrict", ns=ns)
    body = out.partition("elements = {")[2].partition("}")[0]
    return {k.strip().strip('"'): v.strip() for k, _s, v in
            (e.partition(":") for e in body.replace("\n", " ").split(",")) if k.strip()}


def test_restrict_map_elements_by_netlink_as_nft_lists_them(exit_net, monkeypatch):
    """Elements added, re-pointed, listed and removed by our netlink code,
    checked with nft; tables written by nft once, then only checked."""
    exit_net.cfg.filter = "nft"
    from microbroker import filters
    calls = []
    real = filters.Nft._apply
    monkeypatch.setattr(filters.Nft, "_apply",
                        lambda self, script, check=True: calls.append(script) or
                        real(self, script, check))
    svc = service("web", restrict="dns+web", ports=(80, 443))
    leases = [lease_for(exit_net, 1, svc), lease_for(exit_net, 2, svc)]
    ex = exit_net.ns
    assert nft_map(ex) == {l.ifname: "jump r_web" for l in leases}
    assert len(calls) == 2              # bridge table, inet isolation: once each
    with inside(ex):
        f = exit_net.dp.filters()
        assert f.ports() == {l.ifname for l in leases}
        f.add_port(leases[0].ifname, "web")          # again: no change, no error
        run("nft", "add", "chain", "bridge", "microbroker", "r_other", ns=ex)
        f.add_port(leases[0].ifname, "other")        # re-pointed in one transaction
        assert nft_map(ex)[leases[0].ifname] == "jump r_other"
        changed, problems = f.sync_ports({leases[0].ifname: ("web", [80]), "stray0":
                                          ("web", [80])})
        assert changed == sorted([leases[0].ifname, leases[1].ifname, "stray0"])
        assert not problems
        assert nft_map(ex) == {leases[0].ifname: "jump r_web", "stray0": "jump r_web"}
        f.remove_port("stray0")
        f.remove_port("stray0")
        assert set(nft_map(ex)) == {leases[0].ifname}
        # A fresh process (a CGI) checks the tables by netlink: no nft run...
        fresh = dataplane.Dataplane(exit_net.cfg)
        fresh.ensure_service(svc)
        assert len(calls) == 2
        # ...unless they lost rules.
        run("nft", "flush", "chain", "bridge", "microbroker", "forward", ns=ex)
        dataplane.Dataplane(exit_net.cfg).ensure_service(svc)
        assert len(calls) == 3
    assert 'oifname "mb*" ether type 0xfc00 drop' in run("nft", "list", "chain", "bridge",
                                                         "microbroker", "forward", ns=ex)


def test_our_bridge_is_made_without_multicast_snooping_as_netifd_makes_one(exit_net,
                                                                           monkeypatch):
    """netifd makes a bridge with igmp_snooping 0 unless told otherwise;
    ours is the same (with snooping on, a port's up walks every port's
    multicast state: bench/bridge_ports.py). An operator's bridge keeps
    what they set."""
    ex = exit_net.ns

    def snooping(br):
        out = run("ip", "-d", "link", "show", br, ns=ex)
        assert "mcast_snooping " in out, out
        return out.split("mcast_snooping ")[1].split()[0]
    run("ip", "link", "add", "br-op", "type", "bridge", "mcast_snooping", "1", ns=ex)
    op = service("op")
    op.bridge = "br-op"
    with inside(ex):
        exit_net.dp.ensure_service(service())
        exit_net.dp.ensure_service(op)
    assert snooping("br-exit") == "0"
    assert snooping("br-op") == "1"
    # Ours as it is: read from the link, not set again (a CGI asks each time)...
    sets = []
    real = rtnl.Rtnl.set_mcast_snooping
    monkeypatch.setattr(rtnl.Rtnl, "set_mcast_snooping",
                        lambda self, *a: sets.append(a) or real(self, *a))
    with inside(ex):
        dataplane.Dataplane(exit_net.cfg).ensure_service(service())
    assert sets == []
    # ...and as an older version left it (snooping on): off again.
    run("ip", "link", "set", "br-exit", "type", "bridge", "mcast_snooping", "1", ns=ex)
    with inside(ex):
        dataplane.Dataplane(exit_net.cfg).ensure_service(service())
    assert sets == [("br-exit", False)]
    assert snooping("br-exit") == "0"


def test_our_bridge_keeps_a_stable_mac_as_ports_come_and_go(exit_net):
    """A bridge takes its lowest port's MAC unless it was given one: ours
    gets bridge_mac(), also when it existed without it (made by hand or an
    older version), and keeps it through leases."""
    ex = exit_net.ns
    run("ip", "link", "add", "br-exit", "type", "bridge", ns=ex)
    mac = dataplane.bridge_mac("br-exit")
    svc = service()
    leases = [lease_for(exit_net, 1, svc), lease_for(exit_net, 2, svc)]

    def bridge_mac():
        return run("ip", "link", "show", "br-exit", ns=ex).split("link/ether ")[1].split()[0]
    assert bridge_mac() == mac
    with inside(ex):
        for lease in leases:
            exit_net.dp.down(lease)
            assert bridge_mac() == mac
    # A bridge the operator configured is theirs: left as it is.
    run("ip", "link", "add", "br-op", "type", "bridge", ns=ex)
    before = run("ip", "link", "show", "br-op", ns=ex).split("link/ether ")[1].split()[0]
    op = service("op")
    op.bridge = "br-op"
    with inside(ex):
        exit_net.dp.ensure_service(op)
    assert before in run("ip", "link", "show", "br-op", ns=ex)
