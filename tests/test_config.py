"""The UCI reader, the schema with its problems and line numbers, defaults,
overrides and the check-config command."""

import os
import subprocess
import sys

import pytest

from microbroker import config
from microbroker.config import (parse_uci, build, load, parse_addr,
                                norm_addr, parse_prefix, in_prefixes,
                                parse_listen, default_state_dir)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def opts(text, section=0):
    """{option: value} of one section, lines dropped."""
    secs, problems = parse_uci(text)
    assert problems == []
    return {k: [x for x, _ in v] if isinstance(v, list) else v
            for k, (v, _) in secs[section].options.items()}


def problem_line(text):
    secs, problems = parse_uci(text)
    assert secs == [] and len(problems) == 1, problems
    return problems[0][0]


# ---------------------------------------------------------------- reader
# The reader is libuci's parser ported (microbroker/uci.py);
# tests/test_uci_libuci.py holds it against the real uci.

def test_plain_statements_and_lines():
    secs, pr = parse_uci("config broker\n\toption name 'x'\n\n  list a b\n")
    assert pr == []
    assert secs[0].options == {"name": ("x", 2), "a": ([("b", 4)], 4)}


def test_quotes():
    assert opts("config a\noption a 'x\\y \\\"z'") == {"a": r'x\y \"z'}
    assert opts('config a\noption a "x\\"y\\\\z\\q"') == {"a": 'x"y\\zq'}
    assert opts("config a\noption a 'a'\"b\"c\noption b x'y z'") == {
        "a": "abc", "b": "xy z"}


def test_comments():
    assert opts("config a\n# all comment\noption a b # tail\n"
                "option c d#e\noption e '#no'\n") == {"a": "b", "c": "d",
                                                        "e": "#no"}


def test_semicolon_like_libuci():
    # after a quoted value ';' ends the statement; right after an unquoted
    # one it ends the line
    assert opts("config a\noption a 'b'; option c d\n") == {"a": "b",
                                                             "c": "d"}
    assert opts("config a\noption a b; option c d\n") == {"a": "b"}
    assert opts("config a\noption a b ; option c d\n") == {"a": "b",
                                                            "c": "d"}
    assert opts("config a\noption c 'd;e'\n") == {"c": "d;e"}


def test_backslash_newline_continues():
    assert opts("config a\noption c d\\\ne\n") == {"c": "de"}
    # a continued line that starts with a blank ends the word there
    assert problem_line("config a\noption a x\\\n  b\n") == 3
    assert opts('config a\noption a "x\\\ny"') == {"a": "xy"}
    assert opts("config a\noption a x\\ y") == {"a": "x y"}


def test_quotes_span_lines_and_lines_keep_counting():
    secs, _ = parse_uci("config a\noption a 'x\ny'\noption b c\n")
    assert secs[0].options == {"a": ("x\ny", 2), "b": ("c", 4)}


def test_unterminated_quote_reported_with_line():
    assert problem_line("config a\noption b 'open\nmore\n") == 3
    assert problem_line('config a\noption b "open') == 2


def test_empty_value_is_no_option():
    assert opts("config a\noption a ''\noption b\noption c \"\"\n") == {}
    # and does not remove one given before (libuci's uci_set)
    assert opts("config a\noption a x\noption a ''\n") == {"a": "x"}
    assert opts("config a\nlist a ''\n") == {"a": [""]}


def test_crlf_files():
    assert opts("config broker\r\noption a 'b'\r\n") == {"a": "b"}


def test_section_types_libuci_takes():
    secs, pr = parse_uci("config my-type 'x'\noption a b\nconfig a.b\n")
    assert pr == [] and [s.type for s in secs] == ["my-type", "a.b"]
    cfg = build(secs, pr)
    assert [m for _, m in cfg.problems][:2] == [
        "unknown section type 'my-type'", "unknown section type 'a.b'"]


def test_too_large_file_is_refused(tmp_path):
    p = tmp_path / "big"
    p.write_bytes(b"config broker\n" + b"# pad\n" * (1 << 18))
    cfg = load(str(p))
    assert cfg.problems[0][1].startswith("larger than")


def test_non_utf8_value_is_refused_at_its_line(tmp_path):
    p = tmp_path / "c"
    p.write_bytes(b"config broker\n\toption name 'a'\n\toption text "
                  b"'\xff'\n")
    cfg = load(str(p))
    assert cfg.problems[0][0] == "%s:3" % p


# ---------------------------------------------------------------- sections

def test_abbreviated_keywords():
    secs, pr = parse_uci("p microbroker\nc service 'x'\no mtu 1400\n"
                         "l provides ipv4-nat\n")
    assert pr == []
    assert secs[0].type == "service" and secs[0].name == "x"
    assert secs[0].options == {"mtu": ("1400", 3),
                               "provides": ([("ipv4-nat", 4)], 4)}


def test_bad_keyword_and_option_outside_section():
    assert problem_line("option a b\nconfig x\n") == 1
    assert problem_line("config x\nconfigure x\n") == 2
    assert problem_line("config x\n\nconf x\n") == 3


def test_option_then_list_becomes_list_like_libuci():
    secs, _ = parse_uci("config s 'n'\noption a x\nlist a y\n")
    assert secs[0].options["a"] == ([("x", 2), ("y", 3)], 2)


def test_named_sections_merge():
    secs, pr = parse_uci("config service 'a'\noption mtu 1\n"
                         "config service 'a'\noption lifetime 2\n")
    assert pr == [] and len(secs) == 1
    assert set(secs[0].options) == {"mtu", "lifetime"}
    assert problem_line("config service 'a'\nconfig broker 'a'\n") == 2


@pytest.mark.parametrize("text,line", [
    ("config 'ser vice'\n", 1), ("config x\nconfig service 'a-b'\n", 2),
    ("config x\noption 'a b' c\n", 2), ("config x\n\noption a b c\n", 3)])
def test_bad_names(text, line):
    assert problem_line(text) == line


# ---------------------------------------------------------------- schema

GOOD = """
config broker 'main'
	option name 'Test exit'
	list listen '[::]:9000'
	list listen '0.0.0.0:9000'
	option state_dir '/tmp/mb-state'
	option tunnel_ids '100-199'
	option session_ids '100-199'
	option max_leases '10'
	option max_per_client '2'
	list allow 'fc00::/8'
	list deny 'fc00::1'
	list token 'sesame-sesame'
	option log 'syslog'
	option dataplane 'none'
	option sweep_interval '15'

config location
	option country 'DE'
	option city 'Berlin'
	option latitude '52.52'
	option longitude '13.40'
	option text 'Exit via the Spree'

config service 'v6'
	option encap 'ip'
	option family '6'
	option endpoint 'fc00::2'
	list provides 'ipv4-nat'
	list provides 'ipv6-single'
	option restrict 'dns+web'
	option mtu '1400'
	option lifetime '300'
	option renew_interval '60'
	option capacity '5'
	option bridge 'br-exit'

config service 'v4'
	option encap 'udp'
	option family '4'
	option udp_port '1701'
	option enabled '0'
"""


def cfg_of(text, **kw):
    secs, pr = parse_uci(text)
    return build(secs, pr, "/etc/config/microbroker", **kw)


def test_good_config():
    c = cfg_of(GOOD)
    assert c.problems == []
    assert c.name == "Test exit"
    assert c.listen == ["[::]:9000", "0.0.0.0:9000"]
    assert c.tunnel_ids == (100, 199) and c.max_leases == 10
    assert c.allow == [parse_prefix("fc00::/8")]
    assert c.token == ["sesame-sesame"]
    assert c.lease_path == "/tmp/mb-state/leases"
    assert c.location.latitude == 52.52 and c.location.country == "DE"
    v6 = c.services["v6"]
    assert (v6.encap, v6.family, v6.endpoint, v6.mtu) == ("ip", 6, "fc00::2",
                                                          1400)
    assert v6.provides == ["ipv4-nat", "ipv6-single"]
    assert v6.ports == [53, 80, 443]          # dns+web default
    assert (v6.lifetime, v6.renew_interval, v6.capacity) == (300, 60, 5)
    assert [s.name for s in c.enabled_services()] == ["v6"]
    assert c.services["v4"].capacity == 10    # 0 means up to max_leases
    assert c.services["v4"].bridge == "br-v4"


def test_every_problem_with_its_line():
    text = """config broker
	option max_leases 'many'
	option dataplane 'magic'
	option colour 'blue'
	list allow 'fc00::1/8'
	option listen '[::]:99999'
config location
	option latitude '91'
	option country 'Germany'
	option text 'it''s'
config service 'v6'
	option family '5'
	option endpoint 'fe80::1'
	list provides 'everything'
	option renew_interval '400'
	option lifetime '600'
	option mtu '100'
config service
config gadget 'x'
config location
"""
    c = cfg_of(text)
    lines = sorted(int(w.rsplit(":", 1)[1]) for w, _ in c.problems
                   if w.count(":") == 1)
    # line 10 is fine: 'it''s' is two quoted pieces, "its"; line 11 is
    # where the service with the renew_interval/lifetime clash starts.
    assert lines == [2, 3, 4, 5, 6, 8, 9, 11, 12, 13, 14, 17, 18, 19, 20]
    assert c.location.text == "its"
    msgs = " | ".join(m for _, m in c.problems)
    assert "unknown option 'colour'" in msgs
    assert "host bits set" in msgs
    assert "link-local" in msgs
    # renew_interval 400 > lifetime/2 is a cross-option problem
    assert "renew_interval 400" in msgs
    for where, _ in c.problems:
        assert where.startswith("/etc/config/microbroker")


def test_text_values_must_be_shell_safe():
    c = cfg_of("config location\n\toption city \"Bad'City\"\n")
    assert c.problems and "quote" in c.problems[0][1]
    c = cfg_of("config location\n\toption text 'two\nlines'\n")
    assert c.problems and c.problems[0][0].endswith(":2")


def test_udp_ports_must_fit():
    c = cfg_of("config service 'u'\n option encap udp\n option family 4\n"
               " option udp_port 65530\n option capacity 10\n")
    assert any("udp_port" in m for _, m in c.problems)


def test_endpoint_family_mismatch():
    c = cfg_of("config service 'u'\n option family 4\n option endpoint "
               "fc00::1\n")
    assert any("not an IPv4" in m for _, m in c.problems)


def test_no_enabled_service_is_a_problem():
    c = cfg_of("config broker\n option name x\n")
    assert any("no enabled service" in m for _, m in c.problems)


def test_ifname_prefix_and_ids_fit():
    c = cfg_of("config broker\n option ifname_prefix 'abcdef'\n option "
               "tunnel_ids '1-4000000000'\nconfig service s\n")
    assert any("15 characters" in m for _, m in c.problems)


def test_list_items_report_their_own_line():
    c = cfg_of("config service s\n list provides ipv4-nat\n"
               " list provides ipv5\n list provides ipv6-single\n"
               " list provides nonsense\n")
    assert [w.rsplit(":", 1)[1] for w, _ in c.problems] == ["3", "5"]


def test_list_options_take_space_separated_option():
    c = cfg_of("config broker\n option listen '[::1]:1 127.0.0.1:1'\n"
               "config service s\n")
    assert c.problems == [] and c.listen == ["[::1]:1", "127.0.0.1:1"]


# ---------------------------------------------------------------- defaults

def test_no_file_gives_one_working_service(tmp_path):
    c = load(str(tmp_path / "missing"), must_exist=False, euid=1000,
             environ={"HOME": "/home/u"})
    assert c.problems == []
    assert list(c.services) == ["default"]
    s = c.services["default"]
    assert (s.kind, s.encap, s.family, s.mtu) == ("l2tpv3", "ip", 6, 1280)
    assert s.renew_interval < s.lifetime
    assert c.listen == ["[::]:8053", "0.0.0.0:8053"]
    assert c.state_dir == "/home/u/.local/state/microbroker"
    assert c.dataplane == "kernel"


def test_default_path_missing_is_fine_explicit_path_is_not(tmp_path):
    env = {"MICROBROKER_CONFIG": str(tmp_path / "nope"), "HOME": "/h"}
    c = load(environ=env, euid=1000)
    assert c.problems and "no such file" in c.problems[0][1]
    c = load(str(tmp_path / "nope"), euid=1000, environ={"HOME": "/h"})
    assert c.problems
    if not os.path.exists(config.DEFAULT_PATH):
        c = load(environ={"HOME": "/h"}, euid=1000)
        assert c.problems == [] and c.source == "defaults"


def test_state_dir_by_user():
    assert default_state_dir(0, {}) == "/var/lib/microbroker"
    assert default_state_dir(1000, {"XDG_STATE_HOME": "/x/state",
                                    "HOME": "/h"}) == "/x/state/microbroker"
    assert default_state_dir(1000, {"HOME": "/h/"}) == \
        "/h/.local/state/microbroker"
    assert default_state_dir(1000, {"XDG_STATE_HOME": "relative",
                                    "HOME": "/h"}) == \
        "/h/.local/state/microbroker"


def test_file_problems(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"config broker\noption name '\xff'\n")
    c = load(str(p))
    assert c.problems == [(str(p) + ":2", "value of name is not UTF-8")]


# ---------------------------------------------------------------- overrides

def test_overrides():
    c = cfg_of(GOOD, overrides=["broker.max_leases=20",
                                "broker.listen=[::1]:1 127.0.0.1:2",
                                "service.v6.mtu=1300",
                                "service.new.family=4",
                                "location.city=Potsdam"])
    assert c.problems == []
    assert c.max_leases == 20 and c.listen == ["[::1]:1", "127.0.0.1:2"]
    assert c.services["v6"].mtu == 1300
    assert c.services["new"].family == 4
    assert c.location.city == "Potsdam"


def test_bad_overrides_are_problems():
    c = cfg_of(GOOD, overrides=["broker.max_leases", "broker.nope=1",
                                "gadget.x=1", "service.v6.mtu=1"])
    assert len(c.problems) == 4
    assert all(w == "--set" for w, _ in c.problems)


def test_overrides_without_file_keep_default_service():
    c = build([], [], None, overrides=["broker.dataplane=none"], euid=1000,
              environ={"HOME": "/h"})
    assert c.problems == [] and list(c.services) == ["default"]


# ---------------------------------------------------------------- addresses

def test_addresses():
    assert parse_addr("::ffff:1.2.3.4") == (4, bytes([1, 2, 3, 4]))
    assert norm_addr("::FFFF:10.0.0.1") == "10.0.0.1"
    assert norm_addr("[FC00:0::1]") == "fc00::1"
    for bad in ("", "1.2.3", "01.2.3.4", "1.2.3.4.5", "fe80::1%eth0",
                "::g", "1.2.3.256", "a" * 60):
        with pytest.raises(ValueError):
            parse_addr(bad)


def test_address_text_agrees_with_libc_and_rfc5952():
    import ipaddress
    import random
    import socket
    rnd = random.Random(7)
    for _ in range(5000):
        words = [rnd.choice([0, 0, 0, 1, 0xFFFF, rnd.randrange(65536)])
                 for _ in range(8)]
        b = b"".join(w.to_bytes(2, "big") for w in words)
        if b[:12] == b"\0" * 10 + b"\xff\xff":
            continue
        for text in (socket.inet_ntop(socket.AF_INET6, b),
                     ipaddress.IPv6Address(b).exploded.upper()):
            assert parse_addr(text) == (6, b), text
        assert config.format_addr(6, b) == str(ipaddress.IPv6Address(b))
    for bad in ("1:2:3:4:5:6:7:8:9", "1::2::3", ":1:2:3:4:5:6:7",
                "1:2:3:4:5:6:7:", "12345::", "1:2:3:4:5:6:7:1.2.3.4",
                "::1.2.3", "1::2:3:4:5:6:7:8", ":::", "1.2.3.4::"):
        with pytest.raises(ValueError):
            parse_addr(bad)
        with pytest.raises(OSError):
            socket.inet_pton(socket.AF_INET6, bad)
    assert parse_addr("1:2:3:4:5:6:1.2.3.4")[1][-4:] == bytes([1, 2, 3, 4])


def test_prefixes():
    p = [parse_prefix("fc00::/8"), parse_prefix("10.0.0.0/8"),
         parse_prefix("::ffff:192.168.0.0/112")]
    assert p[2] == (4, int.from_bytes(bytes([192, 168, 0, 0]), "big"), 16)
    assert in_prefixes(*parse_addr("fc12::1"), p)
    assert in_prefixes(*parse_addr("10.1.2.3"), p)
    assert in_prefixes(*parse_addr("::ffff:192.168.5.5"), p)
    assert not in_prefixes(*parse_addr("fd00::1"), p)
    assert not in_prefixes(*parse_addr("11.0.0.1"), p)
    assert in_prefixes(*parse_addr("1.2.3.4"), [parse_prefix("0.0.0.0/0")])
    for bad in ("10.0.0.1/8", "fc00::/129", "10.0.0.0/x", "::ffff:1.0.0.0/8"):
        with pytest.raises(ValueError):
            parse_prefix(bad)


def test_listen():
    assert parse_listen("[::]:8053") == (6, "::", 8053)
    assert parse_listen("0.0.0.0:80") == (4, "0.0.0.0", 80)
    for bad in ("::1:80", "[::1]", "1.2.3.4", "[::1]:70000",
                "[::ffff:1.2.3.4]:80"):
        with pytest.raises(ValueError):
            parse_listen(bad)


# ---------------------------------------------------------------- the command

def run(*args, env=None):
    e = dict(os.environ)
    e.pop("MICROBROKER_CONFIG", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "microbroker"] + list(args),
                          cwd=ROOT, env=e, capture_output=True, text=True)


def test_check_config_command(tmp_path):
    good = tmp_path / "good"
    good.write_text(GOOD)
    r = run("check-config", str(good))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok: " + str(good))
    bad = tmp_path / "bad"
    bad.write_text("config broker\n option max_leases x\n"
                   "config service 'a'\n option mtu 1\n")
    r = run("-c", str(bad), "check-config")
    assert r.returncode == 1
    assert "%s:2: max_leases 'x'" % bad in r.stdout
    assert "%s:4: mtu '1'" % bad in r.stdout
    assert r.stdout.rstrip().endswith("2 problems")


def test_shipped_openwrt_config_is_clean():
    r = run("check-config", os.path.join(ROOT, "openwrt",
                                         "microbroker.config"))
    assert r.returncode == 0, r.stdout


def test_cli_usage_errors():
    assert run().returncode == 2
    assert run("frobnicate").returncode == 2
    assert run("serve", "--bogus").returncode == 2
    r = run("--help")
    assert r.returncode == 0 and "check-config" in r.stdout
    r = run("version")
    assert r.returncode == 0 and r.stdout.startswith("microbroker ")


def test_offer_command(tmp_path):
    r = run("offer", "--dataplane", "none", "--state-dir", str(tmp_path),
            "-f", "sh")
    assert r.returncode == 0, r.stderr
    assert "SERVICES='default'\n" in r.stdout
    assert "KERNEL='0'\n" in r.stdout


def test_serve_refuses_bad_config(tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("config broker\n option max_leases x\n")
    r = run("-c", str(bad), "serve")
    assert r.returncode == 1 and "max_leases" in r.stderr


def test_address_pools():
    c = cfg_of("config service 'p'\n option prefix_pool 'FD00:BEEF::/48'\n"
               " option prefix_length '56'\n option ipv4_pool '198.51.100.0/28'\n"
               " option ipv4_gateway '198.51.100.254'\n")
    assert c.problems == []
    s = c.services["p"]
    assert (s.prefix_pool, s.prefix_length) == ("fd00:beef::/48", 56)
    assert (s.ipv4_pool, s.ipv4_gateway) == ("198.51.100.0/28", "198.51.100.254")
    # A pool is what `provides` says, listed or not.
    assert "ipv6-prefix" in s.provides and "ipv4-public" in s.provides
    assert config.pool_size(s.prefix_pool, 56)[3] == 256


def test_address_pool_problems_with_their_lines():
    text = """config service 'p'
	option prefix_pool '10.0.0.0/8'
	option ipv4_pool 'fd00::/64'
	option ipv4_gateway 'fd00::1'
config service 'q'
	option prefix_pool 'fd00:beef::/48'
	option prefix_length '40'
	option ipv4_pool '198.51.100.0/28'
	option ipv4_gateway '198.51.100.3'
config service 'r'
	list provides 'ipv6-prefix'
	option ipv4_pool '198.51.100.0/28'
	option prefix_pool 'fd00::1/64'
"""
    c = cfg_of(text)
    where = {}
    for w, m in c.problems:
        where.setdefault(w.rsplit(":", 1)[1], []).append(m)
    assert "IPv6 prefix" in where["2"][0]
    assert "IPv4 prefix" in where["3"][0]
    assert "IPv4 address" in where["4"][0]
    assert "host bits set" in where["13"][0]
    q = " | ".join(where["5"])
    assert "prefix_length 40 is shorter" in q and "inside ipv4_pool" in q
    r = " | ".join(where["10"])
    assert "provides ipv6-prefix needs a prefix_pool" in r
    assert "ipv4_pool needs ipv4_gateway" in r


def test_bridge_backend_ovs_and_the_linux_bridge_port_limit():
    c = cfg_of("config broker\n option max_leases 5000\n option ovsdb "
               "/run/ovs/db.sock\nconfig service 'big'\n option capacity 1500\n"
               " option bridge_backend ovs\n")
    assert c.problems == []
    assert c.services["big"].bridge_backend == "ovs" and c.ovsdb == "/run/ovs/db.sock"
    assert cfg_of("config service 's'\n").services["s"].bridge_backend == "linux"
    c = cfg_of("config broker\n option max_leases 5000\nconfig service 'big'\n"
               " option capacity 1500\n")
    assert [m for _, m in c.problems] == [
        "bridge br-big: services big may put 1500 tunnels on it, but a Linux "
        "bridge holds at most 1023 ports; lower their capacity, give them "
        "bridges of their own, or use bridge_backend 'ovs'"]
    c = cfg_of("config service 'r'\n option kind ip6tnl\n option prefix_pool "
               "2001:db8::/48\n option bridge_backend ovs\n")
    assert any("bridge_backend does not apply" in m for _, m in c.problems)
    c = cfg_of("config service 's'\n option bridge_backend openflow\n")
    assert any("bridge_backend" in m for _, m in c.problems)
