"""Tunnel kinds beside L2TPv3 (kinds.py): what check-config accepts, what
the broker hands out for each kind, and how requests choose a kind."""

import json

import pytest

from microbroker import addresses, wiring
from microbroker import broker as mb
from microbroker import config as mbconfig
from microbroker import web
from microbroker.config import build, parse_uci
from microbroker.kinds import KINDS, auto_mtu
from test_broker import FakeDataplane

CONFIG = """
config broker
	option dataplane 'kernel'
	option state_dir '%(state)s'
	option max_leases '20'
	option max_per_client '5'
config service 'l2'
	option endpoint 'fc00::1'
config service 'gre'
	option kind 'ip6gretap'
	option endpoint 'fc00::1'
	option prefix_pool 'fd00:6::/48'
config service 'tnl'
	option kind 'ip6tnl'
	option endpoint 'fc00::1'
	option ipv4_pool '10.98.0.0/24'
	option prefix_pool 'fd00:98::/48'
	option prefix_length '64'
config service 'tnl1'
	option kind 'ip6tnl'
	option endpoint 'fc00::1'
	option prefix_pool 'fd00:97::/64'
	option prefix_length '128'
"""


def cfg_of(text):
    secs, pr = parse_uci(text)
    return build(secs, pr, "/etc/config/microbroker")


def problems(text):
    return [m for _, m in cfg_of(text).problems]


@pytest.fixture
def broker(tmp_path):
    path = tmp_path / "microbroker"
    path.write_text(CONFIG % {"state": tmp_path / "state"})
    cfg = mbconfig.load(str(path))
    assert cfg.problems == []
    dp = FakeDataplane()
    return wiring.make_broker(cfg, dataplane=dp), dp


# -- check-config

def test_every_kind_has_an_mtu_for_its_overhead():
    # Over a 1500-byte path: the kernel's own defaults for these links
    # (l2tpeth 1438 with the default sublayer, ip6gre and ip6tnl without
    # the encapsulation-limit option).
    assert {(k, e): auto_mtu(k, e, 1500) for k in KINDS for e in KINDS[k].encaps} == {
        ("l2tpv3", "ip"): 1438, ("l2tpv3", "udp"): 1426,
        ("ip6gretap", "ip"): 1438, ("ip6tnl", "ip"): 1460}
    c = cfg_of("config service g\n option kind ip6gretap\n option path_mtu 1500\n"
               "config service t\n option kind ip6tnl\n option path_mtu 1500\n"
               " option ipv4_pool 10.9.0.0/24\n"
               "config service x\n option kind ip6tnl\n option mtu 1300\n"
               " option ipv4_pool 10.8.0.0/24\n")
    assert c.problems == []
    assert [s.mtu for s in c.services.values()] == [1438, 1460, 1300]
    # cjdns's 1304-byte tun: never below what IPv6 needs.
    assert cfg_of("config service d\n").services["d"].mtu == 1280


def test_kind_specific_problems():
    assert any("kind ip6gretap has no encap udp" in m for m in
               problems("config service g\n option kind ip6gretap\n option encap udp\n"))
    assert any("runs over IPv6 only" in m for m in
               problems("config service t\n option kind ip6tnl\n option family 4\n"
                        " option ipv4_pool 10.0.0.0/24\n"))
    assert any("routed, bridge does not apply" in m for m in
               problems("config service t\n option kind ip6tnl\n option bridge br-lan\n"
                        " option ipv4_pool 10.0.0.0/24\n"))
    assert any("ipv4_pool and/or prefix_pool" in m for m in
               problems("config service t\n option kind ip6tnl\n"))
    assert any("ipv4_gateway does not apply" in m for m in
               problems("config service t\n option kind ip6tnl\n"
                        " option ipv4_pool 10.0.0.0/24\n option ipv4_gateway 10.1.0.1\n"))
    assert any("isolate must be the same" in m for m in
               problems("config service a\n option kind ip6tnl\n option ipv4_pool 10.0.0.0/24\n"
                        "config service b\n option kind ip6tnl\n option ipv4_pool 10.1.0.0/24\n"
                        " option isolate 0\n"))
    assert any("needs one of: l2tpv3, ip6gretap, ip6tnl" in m for m in
               problems("config service t\n option kind vxlan\n"))


def test_routed_provides_follow_the_pools():
    c = cfg_of("config service nat\n option kind ip6tnl\n option ipv4_pool 100.64.1.0/24\n"
               "config service pub\n option kind ip6tnl\n option ipv4_pool 198.51.100.0/24\n"
               " option prefix_pool fd00::/48\n"
               "config service one\n option kind ip6tnl\n option prefix_pool fd00:1::/64\n"
               " option prefix_length 128\n")
    assert c.problems == []
    s = c.services
    assert s["nat"].provides == ["ipv4-nat"]
    assert s["pub"].provides == ["ipv4-public", "ipv6-prefix"]
    assert s["one"].provides == ["ipv6-single"]
    assert s["one"].bridge == ""
    assert any("provides ipv6-prefix needs a prefix_pool with prefix_length below 128" in m
               for m in problems("config service t\n option kind ip6tnl\n"
                                 " option prefix_pool fd00::/64\n option prefix_length 128\n"
                                 " list provides ipv6-prefix\n"))


# -- leases per kind

def test_ip6gretap_lease_carries_keys_not_l2tp_ids(broker):
    b, dp = broker
    v = b.lease("fc00::99", "gre", tunnel_id=777)
    lease = b.store.get(v["lease_id"])
    assert v["kind"] == "ip6gretap" and v["ikey"] == 777 and v["okey"] == lease.tunnel_id
    assert lease.peer_tunnel_id == 777
    assert not {"tunnel_id", "session_id", "peer_tunnel_id", "peer_session_id"} & set(v)
    assert v["mac"] == addresses.lease_mac(lease.tunnel_id)     # a bridge port like L2TP
    assert v["prefix"] == "fd00:6:0:1::/64" and "ipv6" not in v
    with pytest.raises(mb.BrokerError) as e:
        b.lease("fc00::98", "gre", session_id=5)
    assert e.value.code == "bad_request" and "session_id does not apply to kind ip6gretap" \
        in e.value.message


def test_ip6tnl_lease_carries_its_addresses(broker):
    b, dp = broker
    v = b.lease("fc00::99", "tnl")
    assert v["kind"] == "ip6tnl" and v["mac"] == "" and v["ipv4_gateway"] == ""
    assert v["ipv4"] == "10.98.0.1" and v["prefix"] == "fd00:98:0:1::/64"
    assert v["ipv6"] == "fd00:98:0:1::1"
    assert not {"tunnel_id", "session_id", "ikey", "okey"} & set(v)
    v2 = b.lease("fc00::98", "tnl")
    assert (v2["ipv4"], v2["prefix"], v2["ipv6"]) == ("10.98.0.2", "fd00:98:0:2::/64",
                                                      "fd00:98:0:2::1")
    # prefix_length 128: one address, nothing routed behind it.
    v3 = b.lease("fc00::97", "tnl1")
    assert (v3["ipv6"], v3["prefix"], v3["ipv4"]) == ("fd00:97::1", "", "")
    with pytest.raises(mb.BrokerError) as e:
        b.lease("fc00::96", "tnl", tunnel_id=5)
    assert e.value.code == "bad_request" and "tunnel_id does not apply" in e.value.message


def test_one_ip6tnl_per_client_and_exit_address(broker):
    # The kernel tells ip6tnl links apart by their two addresses alone.
    b, dp = broker
    v = b.lease("fc00::99", "tnl")
    with pytest.raises(mb.BrokerError) as e:
        b.lease("fc00::99", "tnl1")
    assert e.value.code == "id_conflict" and v["lease_id"] in e.value.message
    assert b.store.count(client="fc00::99") == 1
    b.lease("fc00::99", "gre")                     # other kinds are fine
    assert b.lease("fc00::99", "tnl")["lease_id"] == v["lease_id"]   # re-issue
    b.release("fc00::99", v["lease_id"], b.lease("fc00::99", "tnl")["secret"])
    assert b.lease("fc00::99", "tnl1")["kind"] == "ip6tnl"


def test_kind_alone_picks_the_first_service_of_that_kind(broker):
    b, dp = broker
    assert b.lease("fc00::99", kind="ip6tnl")["service"] == "tnl"
    assert b.lease("fc00::98", kind="ip6gretap")["service"] == "gre"
    assert b.lease("fc00::97", "gre", kind="ip6gretap")["service"] == "gre"


def test_unknown_or_mismatched_kind_names_what_is_offered(broker):
    b, dp = broker
    offered = ("l2tpv3 (service l2), ip6gretap (service gre), ip6tnl (service tnl), "
               "ip6tnl (service tnl1)")
    for kw, code, text in (
            (dict(kind="vxlan"), "unknown_kind", "kind vxlan is not offered here (microbroker "
             "knows l2tpv3, ip6gretap, ip6tnl)"),
            (dict(service="gre", kind="ip6tnl"), "unknown_kind",
             "service gre is kind ip6gretap, not ip6tnl"),
            (dict(service="nope"), "unknown_service", "no service nope here"),
            (dict(), "bad_request", "missing field service (or kind)")):
        with pytest.raises(mb.BrokerError) as e:
            b.lease("fc00::99", **kw)
        assert e.value.code == code and text in e.value.message
        assert e.value.message.endswith("this exit offers " + offered)
    assert b.store.count() == 0 and dp.calls == []
    b.config.services["gre"].enabled = False     # disabled: as if not there
    with pytest.raises(mb.BrokerError) as e:
        b.lease("fc00::99", kind="ip6gretap")
    assert e.value.code == "unknown_kind" and "(service gre)" not in e.value.message


def test_offer_tells_layer_and_kernel_per_kind(broker):
    b, dp = broker

    def status(kind=None):
        return (kind != "ip6gretap", "no ip6_gre" if kind == "ip6gretap" else "")
    dp.status = status
    o = b.offer()
    s = o["services"]
    assert [(n, s[n]["kind"], s[n]["layer"], s[n]["kernel"]) for n in s] == [
        ("l2", "l2tpv3", 2, True), ("gre", "ip6gretap", 2, False),
        ("tnl", "ip6tnl", 3, True), ("tnl1", "ip6tnl", 3, True)]
    assert o["kernel"] is False and o["kernel_reason"] == "no ip6_gre"
    with pytest.raises(mb.BrokerError) as e:
        b.lease("fc00::99", "gre")
    assert e.value.code == "unavailable" and "no ip6_gre" in e.value.message
    assert b.lease("fc00::99", "tnl")["kind"] == "ip6tnl"


# -- the front door

def test_kind_field_through_the_front_door(broker):
    b, dp = broker
    app = web.App(b.config, broker=b)

    def post(body):
        return app.handle("POST", "/lease", "", {
            "content-type": "application/x-www-form-urlencoded"}, body.encode(),
            remote="fc00::99", local="fc00::1")

    status, _h, body = post("kind=ip6gretap&tunnel_id=42&format=sh")
    text = body.decode()
    assert status == 200 and "KIND='ip6gretap'" in text and "IKEY='42'" in text
    assert "OKEY=" in text and "SESSION_ID" not in text
    status, _h, body = post("kind=ip6tnl")
    v = json.loads(body)
    assert status == 200 and v["ipv6"] == "fd00:98:0:1::1"
    status, _h, body = post("kind=ip6tnl%3Brm")
    assert status == 400 and "kind names are 1-16 letters" in json.loads(body)["error"]["message"]
    status, _h, body = post("kind=gre")
    assert status == 404 and json.loads(body)["error"]["code"] == "unknown_kind"



def test_a_lease_of_a_service_whose_kind_changed_ends(broker):
    # The operator turns service l2 into GRE and restarts: the client's old
    # L2TPv3 lease must not come back as its GRE lease, nor be rebuilt.
    b, dp = broker
    old = b.lease("fc00::99", "l2")
    other = b.lease("fc00::98", "l2")
    svc = b.config.services["l2"]
    svc.kind, svc.mtu = "ip6gretap", auto_mtu("ip6gretap", "ip", svc.path_mtu)
    v = b.lease("fc00::99", "l2", kind="ip6gretap")
    assert v["kind"] == "ip6gretap" and v["lease_id"] != old["lease_id"]
    assert ("down", old["lease_id"]) in dp.calls
    assert {l.lease_id for l in b.store.leases()} == {v["lease_id"], other["lease_id"]}
    # The other client's: at the next reconcile (a restart), before the kernel.
    dp.calls.clear()
    b.reconcile()
    assert dp.calls == [("down", other["lease_id"]), ("reconcile", ["l2", "gre", "tnl",
                                                                   "tnl1"])]
    assert [l.lease_id for l in b.store.leases()] == [v["lease_id"]]


def test_pools_shared_only_whole():
    base = "config service a\n option kind ip6tnl\n option prefix_pool fd00:98::/48\n" \
           " option prefix_length 64\n option ipv4_pool 10.98.0.0/24\n"
    # The very same pool and length: one pool, items told apart by text.
    assert problems(base + base.replace("service a", "service b")) == []
    clash = problems(base + "config service b\n option kind ip6tnl\n"
                     " option prefix_pool fd00:98::/64\n option prefix_length 128\n")
    assert clash == ["services a and b: pools fd00:98::/48 and fd00:98::/64 overlap (share "
                     "a pool only with the same pool and prefix_length)"]
    assert any("pools 10.98.0.0/24 and 10.98.0.128/25 overlap" in m for m in problems(
        base + "config service b\n option ipv4_pool 10.98.0.128/25\n"
        " option ipv4_gateway 10.98.1.1\n"))
    # Apart is fine, in either family.
    assert problems(base + "config service b\n option kind ip6tnl\n"
                    " option prefix_pool fd00:99::/48\n option ipv4_pool 10.99.0.0/24\n") == []


def test_routed_checks_that_need_the_kernel_rules():
    assert any("mtu 1200 is below 1280" in m for m in
               problems("config service t\n option kind ip6tnl\n option mtu 1200\n"
                        " option prefix_pool fd00::/48\n"))
    assert problems("config service t\n option kind ip6tnl\n option mtu 1200\n"
                    " option ipv4_pool 10.0.0.0/24\n") == []
    assert any("routed tunnels need nft" in m for m in
               problems("config broker\n option filter ebtables\n"
                        "config service t\n option kind ip6tnl\n option ipv4_pool 10.0.0.0/24\n"))
