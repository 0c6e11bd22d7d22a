"""The kernel layer against a real kernel, with iproute2 as the independent oracle."""

import errno
import os
import re
import subprocess
import sys

import pytest

from microbroker import l2tp, rtnl
from nsutil import A6, B6, inside, ping, run, wait_for

pytestmark = pytest.mark.kernel

def tunnels_by_ip(ns):
    return run("ip", "l2tp", "show", "tunnel", ns=ns)


def sessions_by_ip(ns):
    return run("ip", "l2tp", "show", "session", ns=ns)


def test_tunnel_and_session_created_by_us_are_seen_by_iproute2(pair):
    a, _b = pair
    with inside(a), l2tp.L2TP() as l2:
        l2.create_tunnel(100, 200, A6, B6, encap="ip")
        l2.create_session(100, 1000, 2000, ifname="mbt100")
    out = tunnels_by_ip(a)
    assert "Tunnel 100, encap IP" in out
    assert "From %s to %s" % (A6, B6) in out
    assert "Peer tunnel 200" in out
    out = sessions_by_ip(a)
    assert "Session 1000 in tunnel 100" in out
    assert "Peer session 2000, tunnel 200" in out
    assert "interface name: mbt100" in out
    # l2tpeth has no rtnl_link_ops, so `ip -d link` shows no kind; the MTU is the
    # kernel's guess (1500 - 62 with no route cached), too big for cjdns: set it.
    assert "mbt100: <BROADCAST,MULTICAST> mtu 1438" in run("ip", "-d", "link", "show",
                                                           "mbt100", ns=a)


def test_tunnel_created_by_iproute2_is_read_by_us(pair):
    a, _b = pair
    run("ip", "l2tp", "add", "tunnel", "tunnel_id", 7, "peer_tunnel_id", 8, "encap", "ip",
        "local", A6, "remote", B6, ns=a)
    run("ip", "l2tp", "add", "session", "name", "mbs7", "tunnel_id", 7, "session_id", 70,
        "peer_session_id", 80, ns=a)
    with inside(a), l2tp.L2TP() as l2:
        (t,) = l2.tunnels()
        assert (t.tunnel_id, t.peer_tunnel_id, t.encap, t.local, t.remote) == \
            (7, 8, "ip", A6, B6)
        assert l2.get_tunnel(7) == t
        (s,) = l2.sessions()
        assert (s.tunnel_id, s.session_id, s.peer_tunnel_id, s.peer_session_id, s.ifname,
                s.pw_type) == (7, 70, 8, 80, "mbs7", l2tp.L2TP_PWTYPE_ETH)
        assert l2.get_session(7, 70).ifname == "mbs7"
        # Reconcile's reads of the same dumps.
        assert l2.tunnel_remotes() == {7: B6}
        assert l2.session_ids() == {(7, 70)}


def test_delete_by_us_is_gone_for_iproute2(pair):
    a, _b = pair
    with inside(a), l2tp.L2TP() as l2:
        l2.create_tunnel(101, 201, A6, B6)
        l2.create_session(101, 1011, 2011, ifname="mbt101")
        l2.create_tunnel(102, 202, A6, B6)
        l2.create_session(102, 1021, 2021, ifname="mbt102")
        l2.delete_session(102, 1021)
        l2.delete_tunnel(101)
    # Deletes run on a workqueue: poll.
    assert wait_for(lambda: "Tunnel 101" not in tunnels_by_ip(a))
    assert wait_for(lambda: "mbt101" not in run("ip", "link", ns=a))
    assert "Tunnel 102" in tunnels_by_ip(a)
    assert wait_for(lambda: "Session 1021" not in sessions_by_ip(a))
    assert "mbt102" not in run("ip", "link", ns=a)


def test_errors_name_what_they_concern(pair):
    a, _b = pair
    with inside(a), l2tp.L2TP() as l2:
        l2.create_tunnel(110, 210, A6, B6)
        with pytest.raises(l2tp.Exists, match="tunnel 110 already exists"):
            l2.create_tunnel(110, 211, A6, B6)
        with pytest.raises(l2tp.NotFound, match="tunnel 999 not found") as ei:
            l2.delete_tunnel(999)
        assert ei.value.errno == errno.ENODEV
        with pytest.raises(l2tp.NotFound, match="tunnel 998"):
            l2.create_session(998, 1, 2)
        with pytest.raises(l2tp.NotFound):
            l2.get_session(110, 12345)
        with pytest.raises(l2tp.L2TPError, match="local address not configured"):
            l2.create_tunnel(111, 211, "fc00::99", B6)
        l2.create_session(110, 1100, 2100, ifname="mbt110")
        # IP encap: a session id must be unique across the whole netns.
        l2.create_tunnel(112, 212, A6, B6)
        with pytest.raises(l2tp.Exists):
            l2.create_session(112, 1100, 2200)
        with pytest.raises(ValueError):
            l2.create_tunnel(0, 1, A6, B6)
        with pytest.raises(ValueError):
            l2.create_session(110, 1101, 2101, ifname="x" * 16)


def test_l2tpeth_is_not_deletable_by_rtm_dellink(pair):
    a, _b = pair
    with inside(a), l2tp.L2TP() as l2, rtnl.Rtnl() as rt:
        l2.create_tunnel(120, 220, A6, B6)
        l2.create_session(120, 1200, 2200, ifname="mbt120")
        with pytest.raises(rtnl.LinkError) as ei:
            rt.delete_link("mbt120")
        assert ei.value.errno == errno.EOPNOTSUPP
        l2.delete_session_by_ifname("mbt120")
    assert wait_for(lambda: "mbt120" not in run("ip", "link", ns=a))


def test_udp_encap_ipv4_tunnel(netns):
    a, b = netns.add("x"), netns.add("c")
    netns.link(a, b, "192.0.2.1/24", "192.0.2.2/24")
    with inside(a), l2tp.L2TP() as l2:
        l2.create_tunnel(130, 230, "192.0.2.1", "192.0.2.2", encap="udp", udp_sport=5000,
                         udp_dport=6000)
        (t,) = l2.tunnels()
        assert (t.encap, t.local, t.remote, t.udp_sport, t.udp_dport) == \
            ("udp", "192.0.2.1", "192.0.2.2", 5000, 6000)
    out = tunnels_by_ip(a)
    assert "encap UDP" in out and "From 192.0.2.1 to 192.0.2.2" in out
    assert "UDP source / dest ports: 5000/6000" in out


def test_rtnl_links_bridge_isolation_mtu_mac(netns):
    a = netns.add("x")
    with inside(a), rtnl.Rtnl() as rt:
        rt.add_bridge("mbbr0")
        with pytest.raises(rtnl.LinkExists):
            rt.add_bridge("mbbr0")
        rt.add_veth("mbp0", "mbq0")
        rt.set_mtu("mbp0", 1280)
        rt.set_mac("mbp0", "02:00:00:00:00:01")
        rt.set_master("mbp0", "mbbr0")
        rt.set_isolated("mbp0", True)
        rt.set_up("mbp0")
        assert rt.port_isolated("mbp0") is True
        link = rt.link("mbp0")
        assert (link.mtu, link.address, link.master) == (1280, "02:00:00:00:00:01",
                                                          rt.ifindex("mbbr0"))
        assert link.flags & rtnl.IFF_UP
        assert rt.link("mbbr0").kind == "bridge"
        assert {"mbbr0", "mbp0", "mbq0", "lo"} <= {l.name for l in rt.links()}
    out = run("bridge", "-d", "link", "show", "dev", "mbp0", ns=a)
    assert re.search(r"isolated on", out), out
    out = run("ip", "-d", "link", "show", "mbp0", ns=a)
    assert "mtu 1280" in out and "master mbbr0" in out and "02:00:00:00:00:01" in out
    with inside(a), rtnl.Rtnl() as rt:
        rt.set_isolated("mbp0", False)
        rt.set_master("mbp0", None)
        assert rt.port_isolated("mbp0") is None
        rt.set_up("mbp0", False)
        assert not rt.link("mbp0").flags & rtnl.IFF_UP
        rt.delete_link("mbp0")
        rt.delete_link("mbbr0")
        with pytest.raises(rtnl.NoSuchLink, match="mbbr0"):
            rt.delete_link("mbbr0")
        with pytest.raises(rtnl.NoSuchLink):
            rt.ifindex("mbq0")
    assert "mbbr0" not in run("ip", "link", ns=a)


def build_end(ns, tid, ptid, sid, psid, local, remote, ifname, mtu, bridge=None):
    with inside(ns), l2tp.L2TP() as l2, rtnl.Rtnl() as rt:
        l2.create_tunnel(tid, ptid, local, remote, encap="ip")
        l2.create_session(tid, sid, psid, ifname=ifname)
        if bridge:
            rt.setup_port(ifname, bridge, mtu=mtu)
        else:
            rt.set_mtu(ifname, mtu)
            rt.set_up(ifname)


def test_end_to_end_pseudowire_over_ipv6_bridged_and_pinged(pair):
    exit_ns, client = pair
    with inside(exit_ns), rtnl.Rtnl() as rt:
        rt.add_bridge("mbbr0")
        rt.set_mtu("mbbr0", 1280)
        rt.set_up("mbbr0")
        rt.add_address("mbbr0", "10.99.0.1/24")
    build_end(exit_ns, 300, 400, 3000, 4000, A6, B6, "mbt300", 1280, bridge="mbbr0")
    build_end(client, 400, 300, 4000, 3000, B6, A6, "mbc0", 1280)
    with inside(client), rtnl.Rtnl() as rt:
        rt.add_address("mbc0", "10.99.0.2/24")
    with inside(exit_ns), rtnl.Rtnl() as rt:
        rt.set_isolated("mbt300", True)
        assert rt.link("mbt300").mtu == 1280
    assert ping(client, "10.99.0.1")
    with inside(exit_ns), l2tp.L2TP() as l2:
        s = l2.get_session(300, 3000)
        assert s.stats.rx_packets >= 1 and s.stats.tx_packets >= 1
        assert l2.get_tunnel(300).stats.rx_packets >= s.stats.rx_packets
    assert "master mbbr0" in run("ip", "link", "show", "mbt300", ns=exit_ns)
    # Teardown, then nothing of ours is left on either side.
    for ns, tid in ((exit_ns, 300), (client, 400)):
        with inside(ns), l2tp.L2TP() as l2:
            l2.delete_tunnel(tid)
    for ns in (exit_ns, client):
        assert wait_for(lambda: tunnels_by_ip(ns).strip() == "")
        assert wait_for(lambda: "l2tp" not in run("ip", "-d", "link", ns=ns))
    assert not ping(client, "10.99.0.1", count=1, timeout=1)


def test_available_answers_in_one_round_trip_and_names_missing_permission():
    assert l2tp.available() == (True, "")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-c",
                        "from microbroker import l2tp; print(l2tp.available())"],
                       cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("(False,") and "permission denied" in p.stdout, p.stdout
