"""Policy in broker.py with the real LeaseStore and recording fake data
planes: a lease is only answered when the kernel side is built, failures
roll back, and a host that cannot build tunnels says so."""

import os
import stat

import pytest

from microbroker import addresses, nulldataplane, wiring
from microbroker import broker as mb
from microbroker import config as mbconfig
from microbroker import web
from microbroker.leases import LeaseStore

CONFIG = """
config broker 'main'
	option dataplane 'kernel'
	option state_dir '%(state)s'
	option max_leases '10'
	option max_per_client '3'
config service 'v6'
	option endpoint 'fc00::1'
config service 'u4'
	option family '4'
	option encap 'udp'
	option udp_port '4000'
	option endpoint '10.0.0.254'
	option capacity '2'
"""


class FakeDataplane:
    """Records calls; `fail` makes up() raise, `ok` drives status()."""

    dry_run = False

    def __init__(self, ok=True, reason="", fail=None):
        self.ok, self.reason, self.fail = ok, reason, fail
        self.calls = []
        self.kernel = set()
        self.stats = {}

    def status(self, kind=None):
        return self.ok, self.reason

    def up(self, lease, service):
        self.calls.append(("up", lease.lease_id, lease.tunnel_id,
                           service.name))
        if self.fail:
            raise self.fail
        if (lease.tunnel_id, lease.session_id) in self.kernel:
            # as dataplane.up does on EEXIST, after removing what it built
            raise IdInUse("File exists", lease.tunnel_id, lease.session_id)

    def down(self, lease):
        self.calls.append(("down", lease.lease_id))

    def counters(self, lease):
        return self.stats

    def reconcile(self, live, services):
        self.calls.append(("reconcile", [s.name for s in services]))
        self.foreign_ids = set(self.kernel) - {(l.tunnel_id, l.session_id) for l in live}
        return {"rebuilt": []}


from microbroker.dataplane import IdInUse, KernelUnavailable  # noqa: E402


@pytest.fixture
def setup(tmp_path):
    def make(dp=None, extra=""):
        path = tmp_path / "microbroker"
        path.write_text(CONFIG % {"state": tmp_path / "state"} + extra)
        cfg = mbconfig.load(str(path))
        assert cfg.problems == []
        dp = dp or FakeDataplane()
        b = wiring.make_broker(cfg, dataplane=dp)
        assert isinstance(b.store, LeaseStore)
        return b, dp
    return make


def test_lease_builds_then_answers(setup):
    b, dp = setup()
    v = b.lease("fc00::99", "v6", tunnel_id=5, session_id=6)
    assert dp.calls == [("up", v["lease_id"], v["peer_tunnel_id"], "v6")]
    assert (v["tunnel_id"], v["session_id"]) == (5, 6)
    assert v["remote"] == "fc00::1" and v["local"] == "fc00::99"
    assert b.store.get(v["lease_id"]).state == "up"
    # The same client again: same lease, no second build.
    v2 = b.lease("fc00::99", "v6")
    assert v2["lease_id"] == v["lease_id"] and v2["secret"] != v["secret"]
    assert len(dp.calls) == 1


def test_kernel_failure_rolls_back(setup):
    b, dp = setup(FakeDataplane(fail=OSError(17, "File exists")))
    with pytest.raises(mb.BrokerError) as e:
        b.lease("fc00::99", "v6")
    assert e.value.code == "kernel" and web.STATUS[e.value.code] == 500
    assert "rolled back" in e.value.message and "File exists" in \
        e.value.message
    assert b.store.count() == 0
    assert [c[0] for c in dp.calls] == ["up", "down"]


def test_kernel_unavailable_during_up_is_503(setup):
    b, dp = setup(FakeDataplane(fail=KernelUnavailable("no nft")))
    with pytest.raises(mb.BrokerError) as e:
        b.lease("fc00::99", "v6")
    assert e.value.code == "unavailable" and e.value.retry_after
    assert b.store.count() == 0


def test_host_that_cannot_build_tunnels(setup):
    b, dp = setup(FakeDataplane(ok=False, reason="running as uid 1000"))
    with pytest.raises(mb.BrokerError) as e:
        b.lease("fc00::99", "v6")
    assert e.value.code == "unavailable" and "uid 1000" in e.value.message
    assert e.value.retry_after
    assert dp.calls == [] and b.store.count() == 0
    o = b.offer()
    assert o["kernel"] is False and o["kernel_reason"] == "running as uid 1000"


def test_missing_dataplane_module_is_reported_not_fatal(setup, monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "microbroker" and fromlist and "dataplane" in fromlist:
            raise ImportError("no dataplane here")
        return real(name, globals, locals, fromlist, level)
    monkeypatch.setattr(builtins, "__import__", fake)
    b, _ = setup()
    dp = wiring.make_dataplane(b.config)
    assert isinstance(dp, nulldataplane.BrokenDataplane)
    ok, why = dp.status()
    assert not ok and "no dataplane here" in why


def test_ids_in_the_kernel_are_skipped(setup):
    # A CGI knows nothing of the kernel: it learns from IdInUse, and asks
    # again with those ids left out.
    dp = FakeDataplane()
    dp.kernel = {(1, 1), (2, 2)}
    b, _ = setup(dp)
    v = b.lease("fc00::99", "v6")
    assert v["peer_tunnel_id"] == 3
    assert [c[2] for c in dp.calls if c[0] == "up"] == [1, 2, 3]
    assert b.store.count() == 1 and b.store.check()["ok"]


def test_a_server_keeps_the_kernels_ids_from_its_reconcile(setup):
    dp = FakeDataplane()
    dp.kernel = {(1, 1), (2, 2)}
    b, _ = setup(dp)
    b.hold_leases()
    with pytest.raises(mb.BrokerError) as e:     # while it reconciles
        b.lease("fc00::98", "v6")
    assert e.value.code == "busy" and web.STATUS["busy"] == 503
    assert e.value.retry_after <= 5
    assert b.offer()["services"]["v6"]["free"] > 0   # offers meanwhile
    b.reconcile()
    assert b.foreign_ids == {(1, 1), (2, 2)}
    v = b.lease("fc00::99", "v6")
    assert v["peer_tunnel_id"] == 3
    assert [c[2] for c in dp.calls if c[0] == "up"] == [3]


def test_ids_the_kernel_keeps_refusing_end_in_ids_exhausted(setup):
    dp = FakeDataplane()
    dp.kernel = {(t, t) for t in range(1, 100)}
    b, _ = setup(dp)
    with pytest.raises(mb.BrokerError) as e:
        b.lease("fc00::99", "v6")
    assert e.value.code == "ids_exhausted" and b.store.count() == 0


def test_udp_ports_one_per_tunnel(setup):
    b, dp = setup()
    a = b.lease("10.0.0.1", "u4")
    c = b.lease("10.0.0.2", "u4", udp_sport=5555)
    assert (a["udp_dport"], a["udp_sport"]) == (4000, 4000)
    assert (c["udp_dport"], c["udp_sport"]) == (4001, 5555)
    with pytest.raises(mb.BrokerError) as e:
        b.lease("10.0.0.3", "u4")      # capacity 2
    assert e.value.code == "full"
    b.release("10.0.0.1", a["lease_id"], a["secret"])
    d = b.lease("10.0.0.3", "u4")
    assert d["udp_dport"] == 4000


def test_release_and_sweep_take_tunnels_down(setup):
    t = [1000.0]
    b, dp = setup()
    b.clock = lambda: t[0]
    a = b.lease("fc00::1:1", "v6")
    c = b.lease("fc00::1:2", "v6")
    b.release("fc00::1:1", a["lease_id"], a["secret"])
    assert ("down", a["lease_id"]) in dp.calls
    t[0] += 10000
    gone = b.sweep()
    assert [l.lease_id for l in gone] == [c["lease_id"]]
    assert ("down", c["lease_id"]) in dp.calls
    assert b.sweep() == []


def test_traffic_keeps_a_lease_alive_until_it_falls_silent(setup):
    t = [1000.0]
    b, dp = setup(extra="config broker 'main'\n\toption traffic_keepalive '1'\n")
    b.clock = lambda: t[0]
    a = b.lease("fc00::1:1", "v6")
    lifetime = b.config.services["v6"].lifetime
    dp.stats = {"rx_packets": 5, "rx_bytes": 500, "tx_packets": 1, "tx_bytes": 100}
    t[0] += lifetime + 1
    assert b.sweep() == []                      # packets came in: still alive
    lease = b.store.get(a["lease_id"])
    assert lease.expires == t[0] + lifetime and lease.rx_packets == 5
    t[0] += lifetime + 1
    gone = b.sweep()                            # no new packet for a lifetime
    assert [l.lease_id for l in gone] == [a["lease_id"]]
    assert ("down", a["lease_id"]) in dp.calls


def test_traffic_keepalive_is_off_by_default(setup):
    t = [1000.0]
    b, dp = setup()
    b.clock = lambda: t[0]
    a = b.lease("fc00::1:1", "v6")
    dp.stats = {"rx_packets": 5}
    t[0] += b.config.services["v6"].lifetime + 1
    assert [l.lease_id for l in b.sweep()] == [a["lease_id"]]


def test_renew_and_errors(setup):
    b, dp = setup()
    a = b.lease("fc00::1:1", "v6")
    r = b.renew("fc00::1:1", a["lease_id"], a["secret"])
    assert r["lease_id"] == a["lease_id"] and "secret" not in r
    for client, secret, code in (("fc00::1:2", a["secret"], "forbidden"),
                                 ("fc00::1:1", "0" * 32, "forbidden")):
        with pytest.raises(mb.BrokerError) as e:
            b.renew(client, a["lease_id"], secret)
        assert e.value.code == code
    with pytest.raises(mb.BrokerError) as e:
        b.renew("fc00::1:1", "ab" * 8, a["secret"])
    assert e.value.code == "not_found"


def test_renew_rebuilds_a_lease_gone_from_the_kernel(setup):
    b, dp = setup()
    v = b.lease("fc00::99", "v6")
    dp.present = lambda lease: True
    b.renew("fc00::99", v["lease_id"], v["secret"])
    assert [c[0] for c in dp.calls] == ["up"]             # there: nothing to do
    dp.present = lambda lease: False
    b.renew("fc00::99", v["lease_id"], v["secret"])
    assert dp.calls[1] == ("up", v["lease_id"], v["peer_tunnel_id"], "v6")
    # A failed rebuild is the exit's problem: the renew still counts.
    dp.fail = OSError(19, "No such device")
    r = b.renew("fc00::99", v["lease_id"], v["secret"])
    assert r["lease_id"] == v["lease_id"] and len(dp.calls) == 3


def test_renew_of_a_withdrawn_service(setup):
    b, dp = setup()
    a = b.lease("fc00::1:1", "v6")
    b.config.services["v6"].enabled = False
    with pytest.raises(mb.BrokerError) as e:
        b.renew("fc00::1:2", a["lease_id"], a["secret"])
    assert e.value.code == "forbidden"     # no hint to strangers
    with pytest.raises(mb.BrokerError) as e:
        b.renew("fc00::1:1", a["lease_id"], a["secret"])
    assert e.value.code == "unknown_service"


def test_status_refreshes_counters(setup):
    b, dp = setup()
    a = b.lease("fc00::1:1", "v6")
    dp.stats = {"rx_packets": 5, "rx_bytes": 500, "tx_packets": 2,
                "tx_bytes": 200}
    s = b.status("fc00::1:1", a["lease_id"], a["secret"])
    assert s["counters"] == dp.stats
    stored = b.store.get(a["lease_id"])
    assert stored.rx_packets == 5 and stored.seen > 0


def test_tokens(setup):
    b, _ = setup(extra="config broker 'main'\n\tlist token 'broker-wide-1'\n")
    b.config.services["u4"].token = ["service-only-1"]
    with pytest.raises(mb.BrokerError):
        b.lease("fc00::1:1", "v6")
    with pytest.raises(mb.BrokerError):
        b.lease("fc00::1:1", "v6", token="service-only-1")
    assert b.lease("fc00::1:1", "v6", token="broker-wide-1")
    with pytest.raises(mb.BrokerError):
        b.lease("10.0.0.1", "u4", token="broker-wide-1")
    assert b.lease("10.0.0.1", "u4", token="service-only-1")


def test_hook_runs_and_failing_up_hook_rolls_back(setup, tmp_path):
    log = tmp_path / "hook.log"
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\necho \"$@\" >> %s\n[ \"$1\" = up ] && "
                    "[ \"$4\" = u4 ] && { echo no bridge >&2; exit 3; }\n"
                    "exit 0\n" % log)
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    b, dp = setup(extra="config broker 'main'\n\toption hook '%s'\n" % hook)
    a = b.lease("fc00::1:1", "v6")
    with pytest.raises(mb.BrokerError) as e:
        b.lease("10.0.0.1", "u4")
    assert e.value.code == "kernel" and "no bridge" in e.value.message
    assert b.store.count() == 1
    b.release("fc00::1:1", a["lease_id"], a["secret"])
    lines = log.read_text().splitlines()
    assert lines[0].startswith("up mb") and lines[0].endswith(
        a["lease_id"] + " v6 fc00::1:1")
    assert lines[1].startswith("up ") and lines[1].split()[3] == "u4"
    assert lines[2].startswith("down ")   # the rollback
    assert lines[3].startswith("down ") and a["lease_id"] in lines[3]


def test_null_dataplane_grants_and_says_so(setup):
    b, _ = setup(nulldataplane.NullDataplane())
    assert b.lease("fc00::1:1", "v6")["state"] == "up"
    o = b.offer()
    assert o["kernel"] is False and "dry run" in o["kernel_reason"]


# ---------------------------------------------------------------- via web

def ask(app, method, path, body=b"", remote="fc00::99", query=""):
    headers = {"content-type": "application/x-www-form-urlencoded"} \
        if body else {}
    status, hdrs, out = app.handle(method, path, query, headers, body,
                                   remote, "fc00::1")
    return status, dict(hdrs), out


def test_web_kernel_unavailable_offer_and_lease(setup):
    b, _ = setup(FakeDataplane(ok=False, reason="l2tp_ip6 missing"))
    app = web.App(b.config, broker=b)
    st, h, out = ask(app, "GET", "/offer", query="format=sh")
    assert b"KERNEL='0'\nKERNEL_REASON='l2tp_ip6 missing'\n" in out
    st, h, out = ask(app, "POST", "/lease", b"service=v6")
    assert st == 503 and h["Retry-After"] and b'"unavailable"' in out
    assert b"l2tp_ip6 missing" in out


def test_web_kernel_error_answer(setup):
    b, _ = setup(FakeDataplane(fail=OSError(101, "Network is unreachable")))
    app = web.App(b.config, broker=b)
    st, h, out = ask(app, "POST", "/lease", b"service=v6&format=sh")
    assert st == 200
    assert out.startswith(b"STATUS='500'\nERROR='kernel'\nMESSAGE='the "
                          b"kernel refused the tunnel")


def test_web_link_local_and_odd_clients(setup):
    b, _ = setup()
    app = web.App(b.config, broker=b)
    for remote in ("fe80::1", "::", "ff02::1"):
        st, _, out = ask(app, "POST", "/lease", b"service=v6", remote=remote)
        assert st == 400, remote
    st, _, out = ask(app, "GET", "/offer", remote="not-an-address")
    assert st == 400


def test_web_internal_error_is_answered(setup):
    b, _ = setup()

    def boom(*a, **kw):
        raise ZeroDivisionError("oops")
    b.offer = boom
    app = web.App(b.config, broker=b)
    st, _, out = ask(app, "GET", "/offer")
    assert st == 500 and b'"internal"' in out and b"oops" not in out
    st, _, out = ask(app, "GET", "/offer", query="format=sh")
    assert st == 200 and out.startswith(b"STATUS='500'\nERROR='internal'")


def test_web_sweeps_on_request_at_most_once_per_interval(setup):
    b, dp = setup()
    t = [1000.0]
    b.clock = lambda: t[0]
    a = b.lease("fc00::1:1", "v6")
    t[0] += 100000
    app = web.App(b.config, broker=b, sweep_on_request=True)
    ask(app, "GET", "/offer")
    assert ("down", a["lease_id"]) in dp.calls
    c = b.lease("fc00::1:2", "v6")
    t[0] += 100000
    ask(app, "GET", "/offer")     # within sweep_interval of the last sweep
    assert ("down", c["lease_id"]) not in dp.calls
    stamp = os.path.join(b.config.state_dir, "sweep.stamp")
    os.utime(stamp, (0, 0))
    ask(app, "GET", "/offer")
    assert ("down", c["lease_id"]) in dp.calls


def test_sh_values_are_single_quote_safe():
    pairs = [("A", "it's\nnot\x00ok\r"), ("B", ["x", "y'z"]), ("C", None),
             ("D", True), ("SVC_name_X", 1.5)]
    out = web.to_sh(pairs)
    assert out == "A='itsnotok'\nB='x yz'\nC=''\nD='1'\nSVC_name_X='1.5'\n"
    for bad in ("a", "1A", "A-B", "A'", ""):
        with pytest.raises(ValueError):
            web.to_sh([(bad, "v")])


def test_json_encoder_matches_json_module():
    import json
    obj = {"a": [1, 2.5, None, True, False], "b": "q\"\\\n\u00e9\U0001f600",
           "c": {"d": -3}}
    assert json.loads(web.to_json(obj)) == obj


def test_form_decoder():
    assert web.parse_form(b"a=1&b=x+y&c=%41%42&&d=&e") == [
        ("a", "1"), ("b", "x y"), ("c", "AB"), ("d", ""), ("e", "")]
    for bad in (b"a=%4", b"a=%zz", b"a=%ff"):
        with pytest.raises(mb.BrokerError):
            web.parse_form(bad)


# ---------------------------------------------------------------- commands

def test_sweep_and_reconcile_commands(setup, tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    b, _ = setup(nulldataplane.NullDataplane())
    b.clock = lambda: 1000.0
    old = b.lease("fc00::1:1", "v6")
    b.clock = __import__("time").time
    new = b.lease("fc00::1:2", "v6")
    cfgpath = str(tmp_path / "microbroker")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "microbroker", "-c",
                               cfgpath, "--dataplane", "none"] + list(args),
                              cwd=root, capture_output=True, text=True)
    r = run("sweep")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "expired %s v6 fc00::1:1\n" % old["lease_id"]
    assert run("sweep").stdout == ""
    assert b.store.get(new["lease_id"])
    r = run("reconcile")
    assert r.returncode == 0 and r.stdout == "{}\n"


def test_a_lease_being_built_elsewhere_is_not_built_twice(setup):
    t = [1000.0]
    b, dp = setup()
    b.clock = lambda: t[0]
    # A lease left pending, as by a CGI process that is still building it
    # (or that died before it could finish).
    lease, _, _ = b.store.allocate("fc00::1:1", "v6", "l2tpv3", "ip",
                                   "fc00::1", 1280, 600, now=t[0])
    with pytest.raises(mb.BrokerError) as e:
        b.lease("fc00::1:1", "v6")
    assert e.value.code == "unavailable" and e.value.retry_after == 2
    assert dp.calls == []
    t[0] += 60          # long dead: build it now
    v = b.lease("fc00::1:1", "v6")
    assert v["lease_id"] == lease.lease_id and v["state"] == "up"
    assert dp.calls == [("up", lease.lease_id, lease.tunnel_id, "v6")]


POOLS = """
config service 'pool'
	option endpoint 'fc00::1'
	option prefix_pool 'fd00:beef::/62'
	option prefix_length '64'
	option ipv4_pool '198.51.100.0/30'
	option ipv4_gateway '198.51.100.254'
"""


def test_every_lease_gets_a_mac_from_its_tunnel_id(setup):
    b, dp = setup()
    v = b.lease("fc00::99", "v6")
    t = v["peer_tunnel_id"]
    assert v["mac"] == "02:6d:62:%02x:%02x:%02x" % (t >> 16, (t >> 8) & 255, t & 255)
    assert b.store.get(v["lease_id"]).mac == v["mac"]
    assert (v["prefix"], v["ipv4"], v["ipv4_gateway"]) == ("", "", "")
    assert addresses.lease_mac(0x1234567) == "02:6d:62:23:45:67"


def test_pools_hand_out_the_first_free_item_and_run_dry(setup):
    b, dp = setup(extra=POOLS)
    offer = b.offer()["services"]
    assert "ipv6-prefix" in offer["pool"]["provides"]
    assert "ipv4-public" in offer["pool"]["provides"]
    assert offer["v6"]["provides"] == []
    v1 = b.lease("fc00::91", "pool")
    v2 = b.lease("fc00::92", "pool")
    # Item 0 (the pool's network address) and IPv4's broadcast never.
    assert (v1["prefix"], v1["ipv4"], v1["ipv4_gateway"]) == \
        ("fd00:beef:0:1::/64", "198.51.100.1", "198.51.100.254")
    assert (v2["prefix"], v2["ipv4"]) == ("fd00:beef:0:2::/64", "198.51.100.2")
    lease = b.store.get(v1["lease_id"])
    assert lease.extra == {"prefix": "fd00:beef:0:1::/64", "ipv4": "198.51.100.1"}
    # Re-issued: the same items.
    again = b.lease("fc00::91", "pool")
    assert (again["prefix"], again["ipv4"]) == (v1["prefix"], v1["ipv4"])
    # Only two IPv4 addresses: the third lease is refused, and rolled back.
    with pytest.raises(mb.BrokerError) as e:
        b.lease("fc00::93", "pool")
    assert e.value.code == "pool_exhausted" and web.STATUS[e.value.code] == 503
    assert "pool 198.51.100.0/30" in e.value.message and e.value.retry_after
    assert b.store.count(service="pool") == 2
    # Released items are handed out again.
    b.release("fc00::91", v1["lease_id"], again["secret"])
    v3 = b.lease("fc00::93", "pool")
    assert (v3["prefix"], v3["ipv4"]) == (v1["prefix"], v1["ipv4"])


def test_pool_items_are_picked_with_the_ids_in_one_transaction(setup):
    b, dp = setup(extra=POOLS)
    v1 = b.lease("fc00::91", "pool")
    # No write after the allocation may change what it picked.
    with pytest.raises(ValueError):
        b.store.update(v1["lease_id"], extra={"prefix": "fd00:beef:0:2::/64"})
    v2 = b.lease("fc00::92", "pool")
    assert v2["prefix"] != v1["prefix"] and v2["ipv4"] != v1["ipv4"]
    assert b.store.check()["ok"]


def test_pool_answer_in_shell_format(setup):
    b, dp = setup(extra=POOLS)
    v = b.lease("fc00::91", "pool")
    text = web.to_sh(web.flatten(v))
    assert "PREFIX='fd00:beef:0:1::/64'" in text and "IPV4_GATEWAY='198.51.100.254'" in text


def test_offer_free_is_the_least_of_service_broker_and_bridge(setup):
    # Issue 13 item 6: max_leases taken by another service leaves none.
    b, dp = setup(extra="config service 'big'\n\toption endpoint 'fc00::1'\n"
                        "\toption capacity '10'\n")
    for i in range(9):
        b.lease("fc00::1:%x" % (i + 1), "v6")
    svcs = b.offer()["services"]
    assert svcs["big"]["free"] == 1 and svcs["u4"]["free"] == 1
    b.lease("10.0.0.9", "u4")
    svcs = b.offer()["services"]
    assert svcs["big"]["free"] == 0 and svcs["big"]["used"] == 0
    with pytest.raises(mb.BrokerError) as e:
        b.lease("fc00::2:1", "big")
    assert e.value.code == "full" and e.value.retry_after


def test_a_bridge_holds_at_most_its_port_cap(setup, monkeypatch):
    b, dp = setup(extra="config service 'w6'\n\toption endpoint 'fc00::1'\n"
                        "\toption bridge 'br-v6'\n")
    # After the config is loaded: check-config would refuse it too.
    from microbroker import config
    monkeypatch.setattr(config, "BR_MAX_PORTS", 4)
    b.lease("fc00::1:1", "v6")
    b.lease("fc00::1:2", "w6")
    assert b.offer()["services"]["v6"]["free"] == 1
    b.lease("fc00::1:3", "v6")
    assert b.offer()["services"]["w6"]["free"] == 0
    assert b.offer()["services"]["u4"]["free"] > 0        # routed elsewhere
    with pytest.raises(mb.BrokerError) as e:
        b.lease("fc00::1:4", "w6")
    assert e.value.code == "full" and "br-v6" in e.value.message
    assert b.store.count() == 3


def test_the_kernels_exfull_is_answered_full_not_500(setup):
    b, dp = setup(FakeDataplane(fail=OSError(54, "Exchange full")))
    with pytest.raises(mb.BrokerError) as e:
        b.lease("fc00::99", "v6")
    assert e.value.code == "full" and web.STATUS["full"] == 503
    assert b.store.count() == 0


def test_new_leases_are_rate_limited_broker_wide(setup):
    b, dp = setup(extra="config broker 'main'\n\toption lease_rate '1'\n"
                        "\toption lease_burst '2'\n")
    now = [1000.0]
    b.clock = lambda: now[0]
    b.lease("fc00::1:1", "v6")
    b.lease("fc00::1:2", "v6")
    b.lease("fc00::1:1", "v6")                  # a re-issue costs nothing
    with pytest.raises(mb.BrokerError) as e:
        b.lease("fc00::1:3", "v6")
    assert e.value.code == "too_many" and web.STATUS["too_many"] == 429
    assert 1 <= e.value.retry_after <= 61
    # Another process (a CGI) shares the bucket: it lives in the store.
    other = wiring.make_broker(b.config, dataplane=FakeDataplane())
    other.clock = b.clock
    with pytest.raises(mb.BrokerError):
        other.lease("fc00::1:4", "v6")
    now[0] += 60
    other.lease("fc00::1:4", "v6")


def test_a_lease_that_never_carried_traffic_makes_room_after_its_grace(setup):
    b, dp = setup(extra="config broker 'main'\n\toption idle_grace '300'\n"
                        "\toption lease_rate '0'\n")
    now = [1000.0]
    b.clock = lambda: now[0]
    for i in range(10):
        b.lease("fc00::1:%x" % (i + 1), "v6")
    busy = b.store.leases()[0]
    dp.stats = {}                                # nobody's counters rise
    b.store.update(busy.lease_id, rx_packets=5, seen=now[0])
    with pytest.raises(mb.BrokerError) as e:     # within the grace: full
        b.lease("fc00::2:1", "v6")
    assert e.value.code == "full"
    now[0] += 301
    v = b.lease("fc00::2:1", "v6")
    assert b.store.count() == 10
    left = {l.lease_id for l in b.store.leases()}
    assert busy.lease_id in left and v["lease_id"] in left
    gone = [c[1] for c in dp.calls if c[0] == "down"]
    assert len(gone) == 1 and gone[0] not in left
    # A lease whose exit counters show traffic stays.
    dp.stats = {"rx_packets": 3}
    with pytest.raises(mb.BrokerError):
        b.lease("fc00::2:2", "v6")


def test_check_config_refuses_a_short_idle_grace(tmp_path):
    path = tmp_path / "microbroker"
    path.write_text(CONFIG % {"state": tmp_path} + "config broker 'main'\n"
                    "\toption idle_grace '10'\n")
    assert any("idle_grace" in m for _w, m in mbconfig.load(str(path)).problems)


def test_a_stalled_store_lock_is_503_busy_and_offers_still_answer(setup):
    import fcntl
    b, dp = setup()
    b.lease("fc00::1:1", "v6")                  # the counts file exists now
    b.store.lock_timeout = 0.2
    app = web.App(b.config, broker=b)
    fd = os.open(b.store.lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)          # a SIGSTOPped process, say
        status, headers, body = app.handle("POST", "/lease", body=b"service=v6",
                                           headers={"content-type":
                                                    "application/x-www-form-urlencoded"},
                                           remote="fc00::1:2", local="fc00::1")
        assert status == 503 and b'"busy"' in body, body
        assert 1 <= int(dict(headers)["Retry-After"]) <= 5
        status, _h, body = app.handle("GET", "/offer", remote="fc00::1:2", local="fc00::1")
        assert status == 200 and b'"used":1' in body
    finally:
        os.close(fd)


def test_open_store_makes_the_state_dir_and_refuses_a_file_in_its_place(tmp_path):
    cfg = mbconfig.load(str(tmp_path / "none"), overrides=(
        "broker.state_dir=%s" % (tmp_path / "a" / "b"),), must_exist=False)
    store = wiring.open_store(cfg)
    assert os.path.isdir(tmp_path / "a" / "b")
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "b").st_mode) == 0o700
    assert store.count() == 0
    wiring.open_store(cfg)          # there already: nothing to make
    (tmp_path / "f").write_text("")
    cfg = mbconfig.load(str(tmp_path / "none"), overrides=(
        "broker.state_dir=%s" % (tmp_path / "f"),), must_exist=False)
    with pytest.raises(mb.BrokerError) as e:
        wiring.open_store(cfg)
    assert e.value.code == "store" and "File exists" in e.value.message
