"""One rule for interface names and prefixes (names.py), and the
check-config rules that keep a config within what the kernel and the
client can do: bridge ports, renew margin."""

import os

import pytest

from microbroker import filters, l2tp, leases, names, rtnl
from microbroker.config import build, parse_uci


def cfg_of(text):
    secs, pr = parse_uci(text)
    return build(secs, pr, "/etc/config/microbroker", euid=0)


def problems(text):
    return [m for _, m in cfg_of(text).problems]


GOOD_NAMES = ["br-lan", "br-exit", "eth0.2", "mb65535", "a", "_x", "1abc",
              "a" * 15]
BAD_NAMES = ["", "a" * 16, "a/b", "a b", "x:y", ".", "..", "a\nb", "-x",
             ".x", "é", "a*", "a\"b", "a'b", "a;b", None, 5]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_every_layer_takes_the_same_good_names(name):
    assert names.check_ifname(name) == name
    assert rtnl.check_ifname(name) == name
    l2tp.session_attrs(1, 1, 1, ifname=name)
    assert filters.check_ifname(name) == name   # what filters.py writes
    cfg = cfg_of("config service s\n option bridge '%s'\n" % name)
    assert not [m for _, m in cfg.problems if "bridge" in m]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_every_layer_refuses_the_same_bad_names(name):
    assert names.ifname_problem(name)
    with pytest.raises(ValueError):
        names.check_ifname(name)
    with pytest.raises(ValueError):
        rtnl.check_ifname(name)
    if isinstance(name, str) and name:
        with pytest.raises(ValueError):
            l2tp.session_attrs(1, 1, 1, ifname=name)
        assert problems("config service s\n option bridge '%s'\n"
                        % name.replace("'", "")) or "'" in name


@pytest.mark.parametrize("prefix", ["9x", "-mb", "_mb", "m b", "mb.",
                                    "m*"])
def test_a_prefix_refused_anywhere_is_refused_by_check_config(tmp_path,
                                                              prefix):
    # issue 14 item 7: '9x' passed check-config and the store, then
    # filters.py refused every lease's name.
    assert any("ifname_prefix" in m for m in problems(
        "config broker\n option ifname_prefix '%s'\nconfig service s\n"
        % prefix))
    with pytest.raises(ValueError):
        leases.LeaseStore(str(tmp_path / "l"), ifname_prefix=prefix)
    with pytest.raises(ValueError):
        names.check_prefix(prefix)


@pytest.mark.parametrize("prefix", ["mb", "l2tp", "x", "exit_", "mb-"])
def test_a_prefix_check_config_takes_makes_names_every_layer_takes(
        tmp_path, prefix):
    assert not problems("config broker\n option ifname_prefix '%s'\n"
                        "config service s\n" % prefix)
    st = leases.LeaseStore(str(tmp_path / "l"), ifname_prefix=prefix,
                           backend="dumb")
    lease, _, _ = st.allocate("fc00::1", "s", "l2tpv3", "ip", "fc00::2",
                              1280, 600)
    assert lease.ifname.startswith(prefix)
    assert names.check_ifname(lease.ifname) == lease.ifname
    assert filters.check_prefix(prefix) == prefix
    l2tp.session_attrs(1, 1, 1, ifname=lease.ifname)


def test_prefix_and_the_largest_id_must_fit_ifnamsiz():
    assert names.prefix_problem("abcde", 4294967295) == ""
    assert "15" in names.prefix_problem("abcdef", 4294967295)
    assert any("15" in m for m in problems(
        "config broker\n option ifname_prefix 'abcdef'\n"
        " option tunnel_ids '1-4000000000'\nconfig service s\n"))


# ---------------------------------------------------------------- bridge ports

def test_capacity_a_bridge_cannot_hold_is_refused():
    # issue 17 item 5: two services of 5,000 on one bridge were accepted.
    msgs = problems("config broker\n option max_leases '20000'\n"
                    "config service a\n option capacity '5000'\n"
                    " option bridge 'br-exit'\n"
                    "config service b\n option capacity '5000'\n"
                    " option bridge 'br-exit'\n")
    assert any("br-exit" in m and "1023" in m and "a, b" in m for m in msgs)


def test_services_sharing_a_bridge_add_up():
    base = ("config broker\n option max_leases '5000'\n"
            "config service a\n option capacity '600'\n"
            " option bridge '%s'\n"
            "config service b\n option capacity '600'\n"
            " option bridge 'br-exit'\n")
    assert any("1023" in m for m in problems(base % "br-exit"))
    # on bridges of their own they fit
    assert not problems(base % "br-other")


def test_max_leases_bounds_what_a_bridge_gets():
    # capacities add up to 2,000 but max_leases lets 1,000 in at most
    assert not problems("config broker\n option max_leases '1000'\n"
                        "config service a\n option capacity '1000'\n"
                        "config service b\n option capacity '1000'\n"
                        " option bridge 'br-a'\n")
    assert not problems("config broker\n option max_leases '1023'\n"
                        "config service a\n")
    assert any("1023" in m for m in problems(
        "config broker\n option max_leases '1024'\nconfig service a\n"))


def test_routed_services_have_no_bridge_limit():
    assert not problems("config broker\n option max_leases '5000'\n"
                        "config service r\n option kind 'ip6tnl'\n"
                        " option ipv4_pool '10.0.0.0/16'\n"
                        " option capacity '4000'\n")


# ---------------------------------------------------------------- renew margin

@pytest.mark.parametrize("lifetime, renew", [(30, 10), (40, 11), (60, 21),
                                             (600, 300)])
def test_lifetime_renew_pairs_without_margin_are_refused(lifetime, renew):
    # issue 17 item 6: at 30/10 every lease of a loaded run expired before
    # its first renew.
    msgs = problems("config service s\n option lifetime '%d'\n"
                    " option renew_interval '%d'\n" % (lifetime, renew))
    assert any("renew_interval" in m or "lifetime" in m for m in msgs), msgs


@pytest.mark.parametrize("lifetime, renew", [(40, 10), (60, 20), (600, 120),
                                             (600, 290)])
def test_pairs_with_two_renews_and_the_margin_pass(lifetime, renew):
    assert not problems("config service s\n option lifetime '%d'\n"
                        " option renew_interval '%d'\n" % (lifetime, renew))


@pytest.mark.parametrize("lifetime", [40, 41, 60, 100, 600, 86400])
def test_the_default_renew_interval_always_has_the_margin(lifetime):
    cfg = cfg_of("config service s\n option lifetime '%d'\n" % lifetime)
    assert not cfg.problems
    svc = cfg.services["s"]
    assert svc.renew_interval >= 10
    assert 2 * svc.renew_interval + 20 <= svc.lifetime


def test_example_configs_pass_check_config():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in ("openwrt/microbroker.config", "debian/microbroker.config"):
        full = os.path.join(root, path)
        if not os.path.exists(full):
            continue
        with open(full) as f:
            secs, pr = parse_uci(f.read())
        cfg = build(secs, pr, full, euid=0)
        assert cfg.problems == [], (path, cfg.problems)


def test_no_shell_or_wildcard_characters_in_names():
    # names go unquoted into nft wildcards and ebtables argv
    for c in "*?[]{}\"'\\$;&|<> \t":
        assert names.ifname_problem("a" + c)
