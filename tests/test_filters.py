"""Filter commands: argv only, checked names, our own table (kernel effect is tested in the VM)."""

import os
import stat

import pytest

from microbroker import filters


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """nft/ebtables stand-ins that log their argv and stdin, one line per call."""
    log = tmp_path / "calls"
    for name in ("nft", "ebtables"):
        p = tmp_path / name
        p.write_text("#!/bin/sh\nprintf '%%s ' \"$0\" \"$@\" >> %s\necho >> %s\n"
                     "[ \"$1\" = -f ] && cat >> %s\n[ \"$1\" = list ] && exit 1\nexit 0\n" % (log, log, log))
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ["PATH"])
    return log


@pytest.mark.parametrize("bad", ["", "a b", "x;rm", "a" * 16, "$(id)", "-j", "a\nb"])
def test_names_from_anywhere_are_checked_before_any_command(fake, bad):
    for f in (filters.Nft(str(fake.parent / "nft")),
              filters.Ebtables(str(fake.parent / "ebtables"))):
        with pytest.raises(ValueError):
            f.add_port(bad, "web", [80])
        with pytest.raises(ValueError):
            f.remove_port(bad)
        with pytest.raises(ValueError):
            f.ensure(bad if bad != "a" * 16 else "a*", {})
    assert not fake.exists()


def test_bad_profile_name_and_ports_rejected(fake):
    nft = filters.Nft(str(fake.parent / "nft"))
    with pytest.raises(ValueError):
        nft.ensure("mb", {"web; flush ruleset": [80]})
    with pytest.raises(ValueError):
        nft.ensure("mb", {"web": [0]})


def test_nft_rules_go_into_our_table_only(fake):
    nft = filters.Nft(str(fake.parent / "nft"))
    nft.add_port("mb101", "web", [80])
    calls = fake.read_text()
    assert "add element bridge microbroker restrict { mb101 : jump r_web }" in calls
    nft.ensure("mb", {"web": [80, 443]}, isolate=True)
    calls = fake.read_text()
    assert 'iifname "mb*" ether type 0xfc00 drop' in calls
    assert 'oifname "mb*" ether type 0xfc00 drop' in calls
    assert 'isolate iifname "mb*" oifname "mb*" drop' in calls
    assert "tcp dport { 53, 80, 443 } accept" in calls
    rules = [l for l in calls.splitlines() if l.startswith(("add", "delete", "flush"))]
    assert rules and all(" bridge microbroker" in l for l in rules)


def test_ebtables_profile_chain_names_fit_and_change_with_ports():
    a = filters.Ebtables.profile_chain("a" * 24, [80, 443])
    b = filters.Ebtables.profile_chain("a" * 24, [80, 8080])
    assert a != b and len(a) <= 31 and len(b) <= 31
    assert filters.Ebtables.profile_chain("web", [443, 80]) == \
        filters.Ebtables.profile_chain("web", [80, 443])


def test_probe_prefers_nft(fake):
    assert filters.probe().name == "nft"
    assert filters.probe("ebtables").name == "ebtables"
