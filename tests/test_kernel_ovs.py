"""The exit on an Open vSwitch bridge in a real kernel: L2TP pseudo-wires as
OVS ports, isolation, beacons, a restricted profile, reconcile after
ovs-vswitchd restarts, 1,500 leases on one service.

Debian's ovsdb-server and ovs-vswitchd run privately (tests/ovsutil.py),
vswitchd in the exit's namespace, on the kernel datapath (module
openvswitch); where the module is missing, on the userspace one.
"""

import socket
import struct
from types import SimpleNamespace

import pytest

import ovsutil
from microbroker import dataplane, l2tp, ovs, ovsdb, rtnl
from microbroker.leases import LeaseStore
from microbroker.leases.record import Lease
from nsutil import inside, ping, run, wait_for
from test_kernel_dataplane import client_end

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(bool(ovsutil.missing()), reason=ovsutil.missing() or "ok")]

EXIT_BR = "10.99.0.1"
ETH_P_BEACON = 0xFC00


def service(restrict="none"):
    return SimpleNamespace(name="exit", kind="l2tpv3", bridge="", isolate=True,
                           restrict=restrict, ports=[80, 443] if restrict != "none" else [],
                           mtu=1280, bridge_backend="ovs")


@pytest.fixture
def exit_net(netns, tmp_path):
    """An exit with two clients on veths, a private OVS in the exit's netns."""
    ex, clients = netns.exit_with_clients(2)
    o = ovsutil.Ovs(tmp_path / "ovs", ns=ex)
    (tmp_path / "ovs").mkdir()
    o.start()
    dp = "" if ovsutil.kernel_datapath() else "netdev"
    cfg = SimpleNamespace(tunnel_ids=(100, 199), filter="", ovsdb=o.socket, ovs_datapath=dp,
                          services={})
    store = LeaseStore(str(tmp_path / "leases"), tunnel_ids=(100, 199),
                       session_ids=(100, 199))
    net = SimpleNamespace(ns=ex, clients=clients, dp=dataplane.Dataplane(cfg), store=store,
                          cfg=cfg, ovs=o, datapath=dp or "system", secrets={})
    yield net
    o.stop()


def lease_for(net, i, svc):
    net.cfg.services[svc.name] = svc
    lease, secret, _ = net.store.allocate("fc00:%d::2" % i, svc.name, "l2tpv3", "ip",
                                          "fc00:%d::1" % i, 1280, 600)
    net.secrets[lease.lease_id] = secret
    with inside(net.ns):
        net.dp.up(lease, svc)
        try:
            rtnl.Rtnl().add_address(dataplane.bridge_name(svc), EXIT_BR + "/24")
        except rtnl.LinkExists:
            pass
    return lease


def two_clients(net, svc):
    leases = [lease_for(net, 1, svc), lease_for(net, 2, svc)]
    client_end(net, 1, leases[0], "10.99.0.11")
    client_end(net, 2, leases[1], "10.99.0.12")
    return leases


def udp_arrives(ns_to, ns_from, src, dst, port):
    with inside(ns_to):
        r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with inside(ns_from):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        r.bind((dst, port))
        r.settimeout(1.5)
        s.bind((src, 0))
        s.sendto(b"hi", (dst, port))
        try:
            return r.recv(64) == b"hi"
        except socket.timeout:
            return False
    finally:
        r.close()
        s.close()


def beacon_flow_packets(net):
    for f in net.ovs.ofctl("dump-flows", net.ovs.mgmt("br-exit")).splitlines():
        if "dl_type=0xfc00" in f:
            return int(f.split("n_packets=")[1].split(",")[0])
    return None


def test_clients_reach_the_exit_not_each_other_and_beacons_stop(exit_net):
    svc = service()
    l1, l2_ = two_clients(exit_net, svc)
    c1, c2 = exit_net.clients
    print("datapath:", exit_net.datapath)
    assert ping(c1, EXIT_BR) and ping(c2, EXIT_BR)
    assert not ping(c1, "10.99.0.12", count=2, timeout=1)
    assert not ping(c2, "10.99.0.11", count=2, timeout=1)
    with ovsdb.Ovsdb(exit_net.ovs.socket) as db:
        ports = db.ports("br-exit")
    assert ports[l1.ifname].protected and ports[l2_.ifname].protected
    if exit_net.datapath == "system":
        # The kernel datapath holds the port: its master is ovs-system.
        assert "master ovs-system" in run("ip", "link", "show", l1.ifname, ns=exit_net.ns)
    # A beacon from client 1 reaches neither the exit nor client 2.
    with inside(exit_net.ns):
        rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_BEACON))
    with inside(c2):
        rx2 = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_BEACON))
    with inside(c1):
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    try:
        rx.bind(("br-exit", 0))
        rx2.bind(("pw0", 0))
        rx.settimeout(1.0)
        rx2.settimeout(0.2)
        tx.bind(("pw0", 0))
        before = beacon_flow_packets(exit_net)
        frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x0b" + struct.pack("!H", ETH_P_BEACON) \
            + b"beacon".ljust(46, b"\0")
        for _ in range(3):
            tx.send(frame)
        for r in (rx, rx2):
            with pytest.raises(socket.timeout):
                r.recv(2048)
        assert wait_for(lambda: beacon_flow_packets(exit_net) >= before + 3)
    finally:
        rx.close()
        rx2.close()
        tx.close()
    # Teardown takes the ports and tunnels away.
    with inside(exit_net.ns):
        exit_net.dp.down(l1)
        exit_net.dp.down(l2_)
    with ovsdb.Ovsdb(exit_net.ovs.socket) as db:
        assert sorted(db.ports("br-exit")) == ["br-exit"]
    assert wait_for(lambda: run("ip", "l2tp", "show", "tunnel", ns=exit_net.ns).strip() == "")


def test_restricted_client_reaches_dns_only(exit_net):
    svc = service("dns+web")
    two_clients(exit_net, svc)
    c1 = exit_net.clients[0]
    assert udp_arrives(exit_net.ns, c1, "10.99.0.11", EXIT_BR, 53)
    assert not udp_arrives(exit_net.ns, c1, "10.99.0.11", EXIT_BR, 5353)
    assert ping(c1, EXIT_BR)


def test_reconcile_after_vswitchd_restarts(exit_net):
    svc = service("dns+web")
    l1, l2_ = two_clients(exit_net, svc)
    c1, c2 = exit_net.clients
    assert udp_arrives(exit_net.ns, c1, "10.99.0.11", EXIT_BR, 53)
    flows = exit_net.ovs.dump_flows("br-exit")
    # A crash: flows are in ovs-vswitchd's memory only.
    exit_net.ovs.kill("ovs-vswitchd")
    exit_net.ovs.start_vswitchd()
    with ovsdb.Ovsdb(exit_net.ovs.socket) as db:
        db.ofport("br-exit")
    assert exit_net.ovs.dump_flows("br-exit") == []
    # fail_mode secure: the new vswitchd passes nothing, not even restricted
    # traffic unfiltered.
    assert not udp_arrives(exit_net.ns, c1, "10.99.0.11", EXIT_BR, 5353)
    assert not ping(c1, EXIT_BR, count=1, timeout=1)
    # Client 2's lease ends while the broker is down: store only.
    exit_net.store.release(l2_.lease_id, exit_net.secrets[l2_.lease_id], l2_.remote)
    with inside(exit_net.ns):
        report = exit_net.dp.reconcile(exit_net.store.leases(), [svc])
    assert report["failed"] == []
    assert report["removed"] == [l2_.tunnel_id]
    with ovsdb.Ovsdb(exit_net.ovs.socket) as db:
        ports = db.ports("br-exit")
        # A stale port row of a device that is gone is dropped too.
        assert sorted(ports) == ["br-exit", l1.ifname]
    got = exit_net.ovs.dump_flows("br-exit")
    n = len(ovs.profile_flows(1, svc.ports))
    assert len(got) == len(ovs.base_flows(True)) + n
    assert set(got) <= set(flows)
    assert ping(c1, EXIT_BR)
    assert udp_arrives(exit_net.ns, c1, "10.99.0.11", EXIT_BR, 53)
    assert not udp_arrives(exit_net.ns, c1, "10.99.0.11", EXIT_BR, 5353)
    # Nothing to do the second time.
    with inside(exit_net.ns):
        report = exit_net.dp.reconcile(exit_net.store.leases(), [svc])
    assert not report.get("rebuilt") and not report.get("ports_added") and \
        not report.get("ports_removed"), report


def outputs(net, flow):
    """How many ports ovs-vswitchd would send this frame to."""
    out = net.ovs.appctl("ofproto/trace", "br-exit", flow)
    acts = [l for l in out.splitlines() if l.startswith("Datapath actions:")][-1]
    acts = acts.split(":", 1)[1].strip()
    return 0 if acts == "drop" else len(acts.split(","))


def test_1500_leases_on_one_service_past_a_linux_bridge(exit_net):
    """More ports than a Linux bridge takes (1,023): 1,500 live leases on
    one service, each port protected once ovs-vswitchd has taken it up; a
    client's broadcast reaches the exit only, the exit's reaches them all."""
    n = 1500
    svc = service()
    cfg = SimpleNamespace(tunnel_ids=(1000, 2999), filter="", ovsdb=exit_net.ovs.socket,
                          ovs_datapath=exit_net.cfg.ovs_datapath, services={svc.name: svc})
    dp = dataplane.Dataplane(cfg)
    # Leases as the store would make them (its allocations alone would
    # take a minute under emulation, and are not what is tested here).
    leases = [Lease("%016x" % t, "", "fc00:1::%x" % t, svc.name, "l2tpv3", "ip", "fc00:1::1",
                    "fc00:1::%x" % t, t, t, t, t, "mb%d" % t, 1280, state="up")
              for t in range(1000, 1000 + n)]
    with inside(exit_net.ns):
        for lease in leases:
            dp.up(lease, svc)
    try:
        with ovsdb.Ovsdb(exit_net.ovs.socket) as db:
            db.wait_applied(900)
            ports = db.ports("br-exit")
        mine = [ports[l.ifname] for l in leases]
        assert all(p.protected and p.ofport > 0 and not p.error for p in mine)
        bcast = "dl_dst=ff:ff:ff:ff:ff:ff,dl_type=0x0806"
        for p in (mine[0], mine[n // 2], mine[-1]):
            assert outputs(exit_net, "in_port=%d,dl_src=02:00:00:00:00:01,%s"
                           % (p.ofport, bcast)) == 1
        assert outputs(exit_net, "in_port=LOCAL," + bcast) == n
        with inside(exit_net.ns):
            report = dp.reconcile(leases, [svc])
        assert report["failed"] == [] and not report.get("rebuilt")
        assert "ports_added" not in report and "ports_removed" not in report
    finally:
        # Without a vswitchd to reconfigure 1,500 times, and the kernel's
        # deletions done before the next test starts.
        exit_net.ovs.kill("ovs-vswitchd")
        with inside(exit_net.ns), l2tp.L2TP() as l2:
            for t in l2.tunnels(stats=False):
                l2.delete_tunnel(t.tunnel_id)
        assert wait_for(lambda: run("ip", "l2tp", "show", "tunnel", ns=exit_net.ns).strip() == "",
                        600, 1.0)
