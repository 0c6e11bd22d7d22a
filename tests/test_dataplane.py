"""The dataplane's pure decisions, on the host: which routes a lease needs
by kind, the names and MACs it derives, and what the kernel version allows.
What they do in a kernel is tested in the VM (test_kernel_*)."""

import time
from types import SimpleNamespace

import pytest

from microbroker import dataplane, reconcile
from microbroker.leases import Lease


def lease(kind, extra, mac="02:6d:62:00:00:64"):
    return Lease("0123456789abcdef", "h", "fc00::2", "svc", kind, "ip", "fc00::1", "fc00::2",
                 100, 5, 100, 5, "mb100", 1280, mac=mac, extra=extra)


SVC = SimpleNamespace(name="svc", bridge="", kind="l2tpv3")


def test_bridged_leases_are_routed_on_the_bridge_via_the_link_local_address():
    extra = {"prefix": "fd00:1::/64", "ipv4": "198.51.100.7"}
    for kind in ("l2tpv3", "ip6gretap"):
        assert dataplane.lease_routes(lease(kind, extra), SVC) == [
            ("fd00:1::/64", "fe80::6d:62ff:fe00:64", "br-svc"),
            ("198.51.100.7/32", None, "br-svc")]
    # Without a MAC the exit cannot know the client's link-local address.
    assert dataplane.lease_routes(lease("l2tpv3", extra, mac=""), SVC) == [
        ("198.51.100.7/32", None, "br-svc")]


def test_routed_leases_are_routed_into_their_link():
    l = lease("ip6tnl", {"prefix": "fd00:1::/64", "ipv4": "10.98.0.1"}, mac="")
    assert dataplane.lease_routes(l, SVC) == [("fd00:1::/64", None, "mb100"),
                                              ("10.98.0.1/32", None, "mb100")]
    assert dataplane.lease_routes(lease("ip6tnl", {}, mac=""), SVC) == []


def test_bridge_mac_is_stable_and_locally_administered():
    a, b = dataplane.bridge_mac("br-exit"), dataplane.bridge_mac("br-other")
    assert a == dataplane.bridge_mac("br-exit") and a != b
    first = int(a.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01


def test_port_isolation_by_kernel_version():
    port_isolation = dataplane.port_isolation
    assert port_isolation("6.1.0-56-amd64") and port_isolation("4.18.0")
    assert port_isolation("5.15.150") and not port_isolation("4.14.336")
    assert not port_isolation("4.9.0-openwrt") and port_isolation("weird")


def test_routed_kinds_are_offered_only_where_nft_is(tmp_path, monkeypatch):
    monkeypatch.setattr(dataplane, "module_present", lambda name: True)
    monkeypatch.setattr(dataplane.posix, "geteuid", lambda: 0)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(dataplane.posix, "access", lambda p, mode: p == str(tmp_path / "nft"))
    cfg = SimpleNamespace(filter="")
    assert dataplane.Dataplane(cfg).status("ip6tnl") == (True, "")
    assert dataplane.Dataplane(cfg).status("ip6gretap") == (True, "")
    cfg.filter = "ebtables"
    ok, why = dataplane.Dataplane(cfg).status("ip6tnl")
    assert not ok and "routed (ip6tnl) tunnels need nft" in why
    assert dataplane.Dataplane(cfg).status("ip6gretap") == (True, "")
    monkeypatch.setattr(dataplane.posix, "access", lambda p, mode: False)
    assert not dataplane.Dataplane(SimpleNamespace(filter="")).status("ip6tnl")[0]


def test_isolated_sides_are_every_isolated_bridge_and_the_routed_links(monkeypatch):
    monkeypatch.setattr(dataplane, "_br_netfilter", lambda: False)
    svcs = {"a": SimpleNamespace(name="a", kind="l2tpv3", bridge="", isolate=True),
            "b": SimpleNamespace(name="b", kind="ip6gretap", bridge="br-lan", isolate=False),
            "t": SimpleNamespace(name="t", kind="ip6tnl", bridge="", isolate=True),
            "off": SimpleNamespace(name="off", kind="l2tpv3", bridge="", isolate=True,
                                   enabled=False)}
    dp = dataplane.Dataplane(SimpleNamespace(services=svcs, ifname_prefix="tn"))
    assert dp._sides(svcs["b"]) == {"br-a", "tn*"}
    svcs["t"].isolate = False
    assert dp._sides(svcs["a"]) == {"br-a"}


def test_no_bridge_rule_where_br_netfilter_passes_bridged_packets(monkeypatch):
    # With it, bridged IP reaches inet forward as bridge -> bridge: the rule
    # would cut clients off the bridge's uplink ports.
    svcs = {"a": SimpleNamespace(name="a", kind="l2tpv3", bridge="", isolate=True),
            "t": SimpleNamespace(name="t", kind="ip6tnl", bridge="", isolate=True)}
    dp = dataplane.Dataplane(SimpleNamespace(services=svcs))
    monkeypatch.setattr(dataplane, "_br_netfilter", lambda: True)
    assert dp._sides(svcs["a"]) == {"mb*"}
    assert len(dp.warnings) == 1 and "br_netfilter" in dp.warnings[0]
    dp._sides(svcs["a"])
    assert len(dp.warnings) == 1


def test_reconcile_keeps_as_foreign_what_no_lease_holds_and_it_did_not_remove():
    live = [lease("l2tpv3", {})]                       # tunnel 100, session 100
    tunnels = {100: None, 7: None, 8: None, 9: None}
    sessions = {(100, 100): None, (100, 3): None, (7, 1): None, (9, 2): None}
    # 8 is a bare tunnel of someone else's; 9 was removed (in our range, no lease).
    foreign = reconcile.foreign(live, tunnels, sessions, removed=[9])
    assert foreign == {(100, 3), (7, 1), (8, 0)}


def test_a_stale_status_is_answered_at_once_and_asked_again_aside(monkeypatch):
    """Offers ask status(): once it is known, none waits for the kernel
    (whose netlink requests queue behind every lease being built)."""
    import threading
    answers = [(True, ""), (False, "l2tp gone")]
    asked, let_go = threading.Event(), threading.Event()

    def available():
        if len(answers) == 1:        # the second ask: as slow as the kernel
            asked.set()
            assert let_go.wait(10)
        return answers.pop(0)
    monkeypatch.setattr(dataplane.l2tp, "available", available)
    monkeypatch.setattr(dataplane.posix, "geteuid", lambda: 0)
    dp = dataplane.Dataplane(SimpleNamespace(filter=""))
    assert dp.status() == (True, "")            # the first: asked now
    when, got = dp._status["l2tpv3"]
    dp._status["l2tpv3"] = (when - dataplane.STATUS_TTL, got)
    assert dp.status() == (True, "")            # stale: answered from cache
    assert asked.wait(10)
    assert dp.status() == (True, "")            # one ask at a time
    let_go.set()
    for _ in range(1000):
        if dp.status() != (True, ""):
            break
        time.sleep(0.01)
    assert dp.status() == (False, "l2tp gone")


def test_disable_ipv6_takes_only_an_interface_name_and_skips_what_is_absent():
    from microbroker import procsys
    for bad in ("../../../vm/drop_caches", "all/../x", "", "a" * 16):
        with pytest.raises(ValueError):
            procsys.disable_ipv6(bad)
    # No such interface (or no IPv6): nothing to turn off, and no error.
    assert procsys.disable_ipv6("mbnosuch0") is False


class _Rt:
    """rtnl.Rtnl as up() drives it, each call recorded in `calls`."""

    def __init__(self, calls):
        self.calls = calls

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def setup_port(self, name, master, mtu=None):
        self.calls.append(("setup_port", name, master))

    def set_isolated(self, name, on):
        self.calls.append(("set_isolated", name))

    def add_route(self, dst, dev=None, via=None):
        self.calls.append(("add_route", dst, dev))


def _up_harness(monkeypatch, disable):
    from microbroker import procsys
    calls = []
    monkeypatch.setattr(dataplane.rtnl, "Rtnl", lambda: _Rt(calls))
    monkeypatch.setattr(procsys, "disable_ipv6", disable(calls))
    monkeypatch.setattr(dataplane, "port_isolation", lambda: True)
    monkeypatch.setattr(dataplane.Dataplane, "ensure_service", lambda self, svc, rt: None)
    monkeypatch.setattr(dataplane.Dataplane, "_link",
                        lambda self, rt, l: calls.append(("link", l.ifname)))
    monkeypatch.setattr(dataplane.Dataplane, "_down",
                        lambda self, l, rt=None: calls.append(("down", l.ifname)))
    return dataplane.Dataplane(SimpleNamespace(filter="", ifname_prefix="mb")), calls


def test_a_bridged_port_loses_its_ipv6_before_it_is_up_and_a_routed_link_keeps_it(
        monkeypatch):
    """A routed (ip6tnl) link carries the client's IPv6: turned off there,
    the kernel would drop every packet forwarded into it."""
    def disable(calls):
        return lambda ifname: calls.append(("disable_ipv6", ifname)) or True
    dp, calls = _up_harness(monkeypatch, disable)
    svc = SimpleNamespace(name="svc", bridge="", kind="l2tpv3", isolate=True,
                          restrict="none")
    for kind in ("l2tpv3", "ip6gretap"):
        del calls[:]
        dp.up(lease(kind, {}), svc)
        assert calls[:3] == [("link", "mb100"), ("disable_ipv6", "mb100"),
                             ("setup_port", "mb100", "br-svc")], kind
    del calls[:]
    dp.up(lease("ip6tnl", {"prefix": "fd00:1::/64"}, mac=""), svc)
    assert ("disable_ipv6", "mb100") not in calls
    assert ("setup_port", "mb100", None) in calls
    assert ("add_route", "fd00:1::/64", "mb100") in calls


def test_a_port_whose_ipv6_cannot_be_turned_off_for_an_odd_reason_is_undone(monkeypatch):
    import errno

    def disable(calls):
        def fail(ifname):
            calls.append(("disable_ipv6", ifname))
            raise OSError(errno.EIO, "I/O error")
        return fail
    dp, calls = _up_harness(monkeypatch, disable)
    svc = SimpleNamespace(name="svc", bridge="", kind="l2tpv3", isolate=True,
                          restrict="none")
    with pytest.raises(OSError):
        dp.up(lease("l2tpv3", {}), svc)
    assert calls == [("link", "mb100"), ("disable_ipv6", "mb100"), ("down", "mb100")]


def test_disable_ipv6_never_writes_the_settings_of_every_interface(monkeypatch):
    """conf/all and conf/default are no interface's: `all` would take IPv6
    off every interface of the exit, its uplink too, at once."""
    from microbroker import procsys
    opened = []
    monkeypatch.setattr(procsys, "open", lambda *a, **k: opened.append(a) or 1 / 0,
                        raising=False)
    for name in ("all", "default"):
        with pytest.raises(ValueError):
            procsys.disable_ipv6(name)
    assert opened == []
