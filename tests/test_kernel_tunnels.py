"""GRE Ethernet and IP-in-IPv6 tunnel links made by rtnl, checked with `ip -d link`."""

import pytest

from microbroker import rtnl
from nsutil import A6, B6, inside, ping, run

pytestmark = pytest.mark.kernel

def test_ip6gretap_pseudowire_with_keys_both_ways(pair):
    a, b = pair
    with inside(a), rtnl.Rtnl() as rt:
        rt.add_ip6gretap("mbg1", A6, B6, ikey=100, okey=200)
        rt.set_mtu("mbg1", 1280)
        rt.set_up("mbg1")
        rt.add_address("mbg1", "10.97.0.1/24")
        assert rt.link("mbg1").kind == "ip6gretap"
    with inside(b), rtnl.Rtnl() as rt:
        rt.add_ip6gretap("mbg1", B6, A6, ikey=200, okey=100)
        rt.set_mtu("mbg1", 1280)
        rt.set_up("mbg1")
        rt.add_address("mbg1", "10.97.0.2/24")
    out = run("ip", "-d", "link", "show", "mbg1", ns=a)
    assert "ip6gretap remote %s local %s" % (B6, A6) in out
    assert "ikey 0.0.0.100" in out and "okey 0.0.0.200" in out
    assert "link/ether" in out            # layer 2: it can join a bridge
    assert ping(b, "10.97.0.1")
    with inside(a), rtnl.Rtnl() as rt:
        rt.delete_link("mbg1")
    assert "mbg1" not in run("ip", "link", ns=a)


def test_ip6tnl_carries_ipv4_and_ipv6(pair):
    a, b = pair
    for ns, local, remote, v4, v6 in ((a, A6, B6, "10.96.0.1/30", "fd00:96::1/64"),
                                      (b, B6, A6, "10.96.0.2/30", "fd00:96::2/64")):
        with inside(ns), rtnl.Rtnl() as rt:
            rt.add_ip6tnl("mbt1", local, remote)
            rt.set_up("mbt1")
            rt.add_address("mbt1", v4)
            rt.add_address("mbt1", v6)
    out = run("ip", "-d", "link", "show", "mbt1", ns=a)
    assert "ip6tnl any remote %s local %s" % (B6, A6) in out, out
    assert ping(b, "10.96.0.1")
    assert ping(b, "fd00:96::1")
    # A routed prefix behind the far end, through the tunnel.
    with inside(b), rtnl.Rtnl() as rt:
        rt.add_address("lo", "fd00:95::1/128")
    with inside(a), rtnl.Rtnl() as rt:
        rt.add_route("fd00:95::/64", dev="mbt1")
    assert "fd00:95::/64 dev mbt1" in run("ip", "-6", "route", ns=a)
    assert ping(a, "fd00:95::1")
    with inside(a), rtnl.Rtnl() as rt:
        rt.delete_route("fd00:95::/64", dev="mbt1")
        rt.delete_link("mbt1")
    assert "mbt1" not in run("ip", "link", ns=a)
