"""The exit's side of ip6gretap and ip6tnl leases in a real kernel, with
iproute2 building the client ends and `ip -d link` as the oracle."""

import re
from types import SimpleNamespace

import pytest

from microbroker import dataplane
from nsutil import inside, ping, run, wait_for
from test_kernel_dataplane import (EXIT_BR, exit_net, frame, listen, raw_socket,  # noqa: F401
                                   reaches, seen, udp_arrives)

pytestmark = pytest.mark.kernel

BEHIND4, BEHIND6 = "10.97.0.1", "fd00:97::1"     # addresses behind the exit


def service(kind, restrict="none", isolate=True):
    return SimpleNamespace(name="exit", kind=kind, bridge="", isolate=isolate,
                           restrict=restrict, ports=[80, 443] if restrict != "none" else [],
                           mtu=1280)


def lease_for(net, i, svc, **kw):
    lease, _secret, _ = net.store.allocate("fc00:%d::2" % i, svc.name, svc.kind, "ip",
                                           "fc00:%d::1" % i, 1280, 600, **kw)
    with inside(net.ns):
        net.dp.up(lease, svc)
    return lease


def gre_client(net, i, lease, addr):
    ns = net.clients[i - 1]
    run("ip", "link", "add", "gt0", "type", "ip6gretap", "local", lease.remote, "remote",
        lease.local, "ikey", lease.peer_tunnel_id, "okey", lease.tunnel_id, "encaplimit",
        "none", ns=ns)
    run("ip", "link", "set", "gt0", "mtu", lease.mtu, "up", ns=ns)
    run("ip", "addr", "add", addr + "/24", "dev", "gt0", ns=ns)


def tnl_client(net, i, lease):
    ns = net.clients[i - 1]
    run("ip", "link", "add", "tn0", "type", "ip6tnl", "mode", "any", "local", lease.remote,
        "remote", lease.local, "encaplimit", "none", ns=ns)
    run("ip", "link", "set", "tn0", "mtu", lease.mtu, "up", ns=ns)
    run("ip", "addr", "add", lease.extra["ipv4"] + "/32", "dev", "tn0", ns=ns)
    own6 = lease.extra["prefix"].split("/")[0] + "1"
    run("ip", "addr", "add", own6 + "/128", "dev", "tn0", ns=ns)
    run("ip", "route", "add", "default", "dev", "tn0", ns=ns)
    run("ip", "-6", "route", "add", "default", "dev", "tn0", ns=ns)


def routed_exit(net):
    ex = net.ns
    run("ip", "addr", "add", BEHIND4 + "/32", "dev", "lo", ns=ex)
    run("ip", "addr", "add", BEHIND6 + "/128", "dev", "lo", ns=ex)
    run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", ns=ex)


def link_gone(ns, ifname):
    return wait_for(lambda: ifname not in run("ip", "-o", "link", ns=ns))


def test_ip6gretap_port_is_bridged_keyed_isolated_and_beacon_free(exit_net):
    svc = service("ip6gretap")
    l1 = lease_for(exit_net, 1, svc, peer_tunnel_id=501)
    l2 = lease_for(exit_net, 2, svc, peer_tunnel_id=502)
    ex = exit_net.ns
    run("ip", "addr", "add", EXIT_BR + "/24", "dev", "br-exit", ns=ex)
    out = run("ip", "-d", "link", "show", l1.ifname, ns=ex)
    assert "ip6gretap remote fc00:1::2 local fc00:1::1" in out, out
    assert "ikey 0.0.0.%d okey 0.0.1.245" % l1.tunnel_id in out      # 501 = 0.0.1.245
    assert "encaplimit none" in out and "master br-exit" in out and "mtu 1280" in out
    assert "isolated on" in run("bridge", "-d", "link", "show", "dev", l1.ifname, ns=ex)
    gre_client(exit_net, 1, l1, "10.99.0.11")
    gre_client(exit_net, 2, l2, "10.99.0.12")
    c1, c2 = exit_net.clients
    assert ping(c1, EXIT_BR) and ping(c2, EXIT_BR)
    assert not ping(c1, "10.99.0.12", count=2, timeout=1)
    # The exit's counters are the link's.
    with inside(ex):
        assert exit_net.dp.counters(l1)["rx_packets"] > 0
    # cjdns beacons stop at the port, other ethertypes pass.
    watch, send = raw_socket(ex, "br-exit"), raw_socket(c1, "gt0")
    try:
        send.send(frame(0x88B5, b"control-in"))
        assert seen(watch, b"control-in")
        send.send(frame(0xFC00, b"beacon-in"))
        assert not seen(watch, b"beacon-in")
    finally:
        watch.close()
        send.close()
    with inside(ex):
        exit_net.dp.down(l1)
    assert link_gone(ex, l1.ifname)
    assert ping(c2, EXIT_BR)


def test_ip6tnl_is_routed_to_the_leased_addresses_and_isolated(exit_net):
    svc = service("ip6tnl")
    routed_exit(exit_net)
    l1 = lease_for(exit_net, 1, svc, extra={"ipv4": "10.98.0.1", "prefix": "fd00:98:1::/64"})
    l2 = lease_for(exit_net, 2, svc, extra={"ipv4": "10.98.0.2", "prefix": "fd00:98:2::/64"})
    ex = exit_net.ns
    out = run("ip", "-d", "link", "show", l1.ifname, ns=ex)
    assert "ip6tnl any remote fc00:1::2 local fc00:1::1" in out and "encaplimit none" in out
    assert "mtu 1280" in out and "master" not in out
    assert re.search(r"^10\.98\.0\.1 dev %s " % l1.ifname, run("ip", "route", ns=ex), re.M)
    assert "fd00:98:1::/64 dev %s " % l1.ifname in run("ip", "-6", "route", ns=ex)
    tnl_client(exit_net, 1, l1)
    tnl_client(exit_net, 2, l2)
    c1, c2 = exit_net.clients
    assert ping(c1, BEHIND4) and ping(c1, BEHIND6) and ping(c2, BEHIND4)
    # Isolated: the exit does not route one client's tunnel into another's...
    assert not ping(c1, "10.98.0.2", count=2, timeout=1)
    assert not ping(c1, "fd00:98:2::1", count=2, timeout=1)
    # ...because of our rule: without it the same packets get through.
    run("nft", "flush", "chain", "inet", "microbroker", "isolate", ns=ex)
    assert ping(c1, "10.98.0.2") and ping(c1, "fd00:98:2::1")
    # A tunnel sends only from what the exit routes into it: c1 with c2's
    # addresses gets nothing through...
    run("ip", "addr", "add", "10.98.0.2/32", "dev", "tn0", ns=c1)
    run("ip", "addr", "add", "fd00:98:2::1/128", "dev", "tn0", "nodad", ns=c1)
    assert udp_arrives(ex, c1, "10.98.0.1", BEHIND4) and \
        udp_arrives(ex, c1, "fd00:98:1::1", BEHIND6)
    assert not udp_arrives(ex, c1, "10.98.0.2", BEHIND4)
    assert not udp_arrives(ex, c1, "fd00:98:2::1", BEHIND6)
    # ...because of our source check: the kernel alone lets them in.
    run("nft", "flush", "chain", "inet", "microbroker", "spoof", ns=ex)
    assert udp_arrives(ex, c1, "10.98.0.2", BEHIND4) and \
        udp_arrives(ex, c1, "fd00:98:2::1", BEHIND6)
    with inside(ex):
        exit_net.dp.down(l1)
    assert link_gone(ex, l1.ifname)
    assert "10.98.0.1 " not in run("ip", "route", ns=ex)
    assert "fd00:98:1::" not in run("ip", "-6", "route", ns=ex)


def test_restricted_ip6gretap_reaches_dns_and_web_only(exit_net):
    """A GRE port gets the same bridge-family profile as an L2TPv3 one."""
    svc = service("ip6gretap", restrict="dns+web")
    srv = exit_net.netns.add("s")
    exit_net.netns.link(exit_net.ns, srv, "10.98.0.1/24", "10.98.0.2/24", name_a="srv0")
    run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=exit_net.ns)
    run("ip", "route", "add", "default", "via", "10.98.0.1", ns=srv)
    lease = lease_for(exit_net, 1, svc, peer_tunnel_id=501)
    run("ip", "addr", "add", EXIT_BR + "/24", "dev", "br-exit", ns=exit_net.ns)
    gre_client(exit_net, 1, lease, "10.99.0.11")
    c1 = exit_net.clients[0]
    run("ip", "route", "add", "default", "via", EXIT_BR, ns=c1)
    socks = listen(srv, "10.98.0.2", (53, 80, 22))
    try:
        assert reaches(c1, "10.98.0.2", 53) and reaches(c1, "10.98.0.2", 80)
        assert not reaches(c1, "10.98.0.2", 22)
        with inside(exit_net.ns):
            assert exit_net.dp.filters().ports() == {lease.ifname}
            exit_net.dp.filters().remove_port(lease.ifname)
        assert reaches(c1, "10.98.0.2", 22)         # the rule did it
    finally:
        for s in socks:
            s.close()


def test_restricted_ip6tnl_reaches_dns_and_web_only(exit_net):
    svc = service("ip6tnl", restrict="dns+web")
    routed_exit(exit_net)
    # A leftover of ours between the same two addresses (one ip6tnl per
    # pair in a netns) makes way for the lease.
    run("ip", "link", "add", "mb150", "type", "ip6tnl", "local", "fc00:1::1", "remote",
        "fc00:1::2", ns=exit_net.ns)
    lease = lease_for(exit_net, 1, svc, extra={"ipv4": "10.98.0.1", "prefix": "fd00:98:1::/64"})
    assert "mb150" not in run("ip", "-o", "link", ns=exit_net.ns)
    tnl_client(exit_net, 1, lease)
    c1 = exit_net.clients[0]
    socks = listen(exit_net.ns, BEHIND4, (53, 80, 22))
    try:
        assert reaches(c1, BEHIND4, 53) and reaches(c1, BEHIND4, 80)
        assert not reaches(c1, BEHIND4, 22)
        # After a flush, reconcile restores the restriction and source check.
        run("nft", "flush", "ruleset", ns=exit_net.ns)
        assert reaches(c1, BEHIND4, 22)
        with inside(exit_net.ns):
            report = exit_net.dp.reconcile(exit_net.store.leases(), [svc])
        assert report["filters_fixed"] == [lease.ifname] and not report["failed"], report
        assert not reaches(c1, BEHIND4, 22) and reaches(c1, BEHIND4, 80)
        assert "fib saddr . iif oif missing drop" in run("nft", "list", "chain", "inet",
                                                         "microbroker", "spoof",
                                                         ns=exit_net.ns)
        with inside(exit_net.ns):
            assert exit_net.dp.filters().ports("inet") == {lease.ifname}
            exit_net.dp.down(lease)
            assert exit_net.dp.filters().ports("inet") == set()
    finally:
        for s in socks:
            s.close()


def test_reconcile_rebuilds_and_removes_gre_and_ip6tnl_links(exit_net):
    gre, tnl = service("ip6gretap"), service("ip6tnl")
    tnl.name = "tnl"
    routed_exit(exit_net)
    lg = lease_for(exit_net, 1, gre, peer_tunnel_id=501)
    lt = lease_for(exit_net, 2, tnl, extra={"ipv4": "10.98.0.2", "prefix": "fd00:98:2::/64"})
    ex = exit_net.ns
    # While "the broker is down": one link lost, one changed, a stray in range.
    run("ip", "link", "del", lg.ifname, ns=ex)
    run("ip", "link", "set", lt.ifname, "mtu", "1400", ns=ex)
    run("ip", "link", "add", "mb150", "type", "ip6gretap", "local", "fc00:1::1", "remote",
        "fc00:1::9", "key", "9", ns=ex)
    run("ip", "link", "add", "mb5000", "type", "ip6tnl", "local", "fc00:1::1", "remote",
        "fc00:1::8", ns=ex)                     # out of our id range: not ours
    fresh = dataplane.Dataplane(exit_net.cfg)
    with inside(ex):
        report = fresh.reconcile(exit_net.store.leases(), [gre, tnl])
    assert sorted(report["rebuilt"]) == sorted([lg.lease_id, lt.lease_id])
    assert report["links_removed"] == ["mb150"] and not report["failed"]
    links = run("ip", "-o", "link", ns=ex)
    assert "mb150" not in links and "mb5000" in links
    assert "master br-exit" in run("ip", "link", "show", lg.ifname, ns=ex)
    assert "mtu 1280" in run("ip", "link", "show", lt.ifname, ns=ex)
    assert "fd00:98:2::/64 dev %s " % lt.ifname in run("ip", "-6", "route", ns=ex)
    with inside(ex):
        again = fresh.reconcile(exit_net.store.leases(), [gre, tnl])
    assert again["rebuilt"] == [] and again["links_removed"] == [] and \
        again["routes_added"] == [] and not again["failed"]


def test_status_per_kind():
    dp = dataplane.Dataplane(SimpleNamespace(tunnel_ids=(1, 2), filter=""))
    for kind in ("l2tpv3", "ip6gretap", "ip6tnl"):
        assert dp.status(kind) == (True, ""), kind
    assert dataplane.module_present("ip6_gre") and dataplane.module_present("ip6_tunnel")
    assert not dataplane.module_present("no_such_module_here")
