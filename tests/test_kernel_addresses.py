"""Address services in a real kernel: a leased prefix and IPv4 address are
routed to the client through its pseudo-wire, and reconcile keeps exactly
the routes of live leases in the pools."""

import socket

import pytest

from microbroker import config as mbconfig, dataplane, l2tp, rtnl, wiring
from nsutil import inside, ping, run, wait_for

pytestmark = pytest.mark.kernel

EXIT6, CLIENT6 = "fc00:1::1", "fc00:1::2"
FAR_NET6, FAR6, FAR_GW6 = "fc00:9::/64", "fc00:9::2", "fc00:9::1"
FAR_NET4, FAR4, FAR_GW4 = "10.9.0.0/24", "10.9.0.2", "10.9.0.1"
GATEWAY4 = "192.0.2.1"

CONFIG = """
config broker 'main'
	option state_dir '%(state)s'
	option tunnel_ids '100-199'
	option session_ids '100-199'
config service 'exit'
	option endpoint '%(exit)s'
	option prefix_pool 'fd00:beef::/48'
	option prefix_length '64'
	option ipv4_pool '198.51.100.16/28'
	option ipv4_gateway '%(gw)s'
"""


def sysctl(ns, *settings):
    run("sysctl", "-q", "-w", *settings, ns=ns)


@pytest.fixture
def net(netns, tmp_path):
    """client -- exit -- far: far reaches the client's addresses only
    through the exit's routes into the pseudo-wire."""
    ex, cl, far = netns.add("x"), netns.add("c"), netns.add("f")
    for ns in (ex, cl, far):
        # No DAD: link-local addresses usable at once (no waiting in tests).
        sysctl(ns, "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0")
    sysctl(ex, "net.ipv6.conf.all.forwarding=1", "net.ipv4.ip_forward=1")
    netns.link(ex, cl, EXIT6 + "/64", CLIENT6 + "/64")
    netns.link(ex, far, FAR_GW6 + "/64", FAR6 + "/64", name_a="far0")
    run("ip", "addr", "add", FAR_GW4 + "/24", "dev", "far0", ns=ex)
    run("ip", "addr", "add", FAR4 + "/24", "dev", "veth0", ns=far)
    cfg = tmp_path / "microbroker"
    cfg.write_text(CONFIG % {"state": tmp_path / "state", "exit": EXIT6, "gw": GATEWAY4})
    config = mbconfig.load(str(cfg))
    assert config.problems == []
    with inside(ex):
        b = wiring.make_broker(config)
    return ex, cl, far, b


def client_end(ns, v):
    """The client's side as the shell client builds it: the lease's MAC
    on the pseudo-wire, the IPv4 address with its gateway."""
    with inside(ns), l2tp.L2TP() as l2, rtnl.Rtnl() as rt:
        l2.create_tunnel(v["tunnel_id"], v["peer_tunnel_id"], v["local"], v["remote"])
        l2.create_session(v["tunnel_id"], v["session_id"], v["peer_session_id"],
                          ifname="pw0")
        rt.set_mac("pw0", v["mac"])
        rt.set_mtu("pw0", v["mtu"])
        rt.set_up("pw0")
        rt.add_address("pw0", v["ipv4"] + "/32")
        rt.add_route(v["ipv4_gateway"] + "/32", dev="pw0")
        rt.add_route(FAR_NET4, via=v["ipv4_gateway"], dev="pw0")


def bridge_link_local(ex):
    def get():
        return run("ip", "-6", "-o", "addr", "show", "dev", "br-exit", "scope", "link",
                   ns=ex).split()
    words = wait_for(get)
    assert words, "br-exit has no link-local address"
    return words[3].split("/")[0]


def routes(ns, family="-6"):
    return run("ip", family, "route", "show", "dev", "br-exit", ns=ns)


def test_leased_prefix_and_address_are_reachable_through_the_client(net):
    ex, cl, far, b = net
    with inside(ex):
        v = b.lease(CLIENT6, "exit")
    t = v["peer_tunnel_id"]
    assert v["mac"] == "02:6d:62:00:00:%02x" % t
    assert (v["prefix"], v["ipv4"], v["ipv4_gateway"]) == \
        ("fd00:beef:0:1::/64", "198.51.100.17", GATEWAY4)
    ll = dataplane.link_local(v["mac"])
    assert ll == "fe80::6d:62ff:fe00:%x" % t
    assert "fd00:beef:0:1::/64 via %s" % ll in routes(ex)
    assert any(line.startswith("198.51.100.17 ") and "scope link" in line
               for line in routes(ex, "-4").splitlines())
    run("ip", "addr", "add", GATEWAY4 + "/24", "dev", "br-exit", ns=ex)
    client_end(cl, v)
    # The client's link-local address is the one the exit routes to.
    assert ll in run("ip", "-6", "addr", "show", "dev", "pw0", ns=cl)
    run("ip", "-6", "addr", "add", "fd00:beef:0:1::1/128", "dev", "pw0", "nodad", ns=cl)
    run("ip", "-6", "route", "add", FAR_NET6, "via", bridge_link_local(ex), "dev", "pw0",
        ns=cl)
    run("ip", "-6", "route", "add", "default", "via", FAR_GW6, ns=far)
    run("ip", "-4", "route", "add", "default", "via", FAR_GW4, ns=far)
    assert ping(far, "fd00:beef:0:1::1")
    assert ping(far, "198.51.100.17")
    # Release: the routes go with the tunnel, the bridge stays.
    with inside(ex):
        b.release(CLIENT6, v["lease_id"], v["secret"])
    assert "fd00:beef" not in routes(ex)
    assert "198.51.100.17" not in routes(ex, "-4")


def test_reconcile_restores_lease_routes_and_removes_strays(net):
    ex, cl, far, b = net
    with inside(ex):
        v1 = b.lease(CLIENT6, "exit")
        v2 = b.lease("fc00:1::3", "exit")
    assert v2["prefix"] == "fd00:beef:0:2::/64" and v2["ipv4"] == "198.51.100.18"
    # Lost by hand: one lease's prefix route, the other's IPv4 route.
    run("ip", "-6", "route", "del", v1["prefix"], ns=ex)
    run("ip", "-4", "route", "del", v2["ipv4"] + "/32", ns=ex)
    # Strays in the pools (no live lease owns them), and routes that are not
    # ours: the pool's covering route and one outside every pool.
    run("ip", "-6", "route", "add", "fd00:beef:0:7::/64", "dev", "br-exit", ns=ex)
    run("ip", "-4", "route", "add", "198.51.100.20/32", "dev", "br-exit", ns=ex)
    run("ip", "-6", "route", "add", "unreachable", "fd00:beef::/48", ns=ex)
    run("ip", "-6", "route", "add", "fd00:cafe::/64", "dev", "br-exit", ns=ex)
    with inside(ex):
        report = b.reconcile()
    assert sorted(report["routes_added"]) == sorted([v1["prefix"], v2["ipv4"] + "/32"])
    assert sorted(report["routes_removed"]) == ["198.51.100.20/32", "fd00:beef:0:7::/64"]
    six, four = routes(ex), routes(ex, "-4")
    assert "%s via %s" % (v1["prefix"], dataplane.link_local(v1["mac"])) in six
    assert "%s via %s" % (v2["prefix"], dataplane.link_local(v2["mac"])) in six
    assert "fd00:beef:0:7::" not in six and "fd00:cafe::/64" in six
    assert v1["ipv4"] in four and v2["ipv4"] in four and "198.51.100.20" not in four
    assert "unreachable fd00:beef::/48" in run("ip", "-6", "route", ns=ex)
    # Idempotent: nothing more to do.
    with inside(ex):
        again = b.reconcile()
    assert again["routes_added"] == [] and again["routes_removed"] == []


def test_routes_dump(net):
    ex, _cl, _far, _b = net
    run("ip", "-6", "route", "add", "fd00:1234::/64", "via", "fc00:1::9", ns=ex)
    with inside(ex), rtnl.Rtnl() as rt:
        found = [r for r in rt.routes(socket.AF_INET6) if r.dst == "fd00:1234::"]
        idx = rt.ifindex("veth0")
    assert len(found) == 1
    r = found[0]
    assert (r.dst_len, r.gateway, r.oif, r.table, r.type) == \
        (64, "fc00:1::9", idx, rtnl.RT_TABLE_MAIN, rtnl.RTN_UNICAST)
