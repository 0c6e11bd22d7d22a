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
    fake.unlink()
    nft.ensure("mb", {"web": [80, 443]}, isolate=True)
    calls = fake.read_text()
    # One call, no listing first: the base chains are flushed and refilled
    # in the same script, so running it again cannot stack rules.
    assert calls.count("/nft ") == 1 and " list " not in calls
    assert "add table bridge microbroker\n" in calls
    assert calls.index("flush chain bridge microbroker forward\n") < \
        calls.index("add rule bridge microbroker forward ")
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


def test_routed_table_checks_sources(fake):
    filters.Nft(str(fake.parent / "nft")).ensure_routed("mb", {})
    calls = fake.read_text()
    assert "add chain inet microbroker spoof { type filter hook prerouting" in calls
    assert 'add rule inet microbroker spoof iifname "mb*" fib saddr . iif oif missing drop' \
        in calls
    assert "oifname" not in calls          # isolation is its own call
    assert "add table inet microbroker\n" in calls
    rules = [l for l in calls.splitlines() if l.startswith(("add", "delete", "flush"))]
    assert rules and all(" inet microbroker" in l for l in rules)
    with pytest.raises(filters.FilterError, match="need nft"):
        filters.Ebtables(str(fake.parent / "ebtables")).ensure_routed("mb", {})


def test_isolation_between_client_sides_drops_every_pair(fake):
    nft = filters.Nft(str(fake.parent / "nft"))
    nft.ensure_isolation({"br-exit", "mb*"})
    rules = [l.split(" isolate ", 1)[1] for l in fake.read_text().splitlines()
             if l.startswith("add rule inet microbroker isolate ")]
    assert sorted(rules) == sorted('iifname "%s" oifname "%s" drop' % (a, b)
                                   for a in ("br-exit", "mb*") for b in ("br-exit", "mb*"))
    assert "flush chain inet microbroker isolate" in fake.read_text()
    for bad in ({"br x"}, {"$(id)*"}, {"*"}):
        with pytest.raises(ValueError):
            nft.ensure_isolation(bad)


def test_nft_sync_ports_fixes_only_what_differs(tmp_path):
    """One nft call: the stray and the wrong-profile element out, the missing in."""
    log = tmp_path / "calls"
    nft = tmp_path / "nft"
    nft.write_text("#!/bin/sh\n"
                   "if [ \"$1\" = list ]; then cat <<'X'\n"
                   "table bridge microbroker {\n\tmap restrict {\n"
                   "\t\ttype ifname : verdict\n"
                   "\t\telements = { \"mb101\" : jump r_web, \"mb102\" : jump r_dns,\n"
                   "\t\t\t     \"mb900\" : jump r_web }\n\t}\n}\nX\nexit 0; fi\n"
                   "cat >> %s\n" % log)
    nft.chmod(0o755)
    f = filters.Nft(str(nft))
    assert f.ports() == {"mb101", "mb102", "mb900"}
    changed = f.sync_ports({"mb101": ("web", [80]), "mb102": ("web", [80]),
                            "mb103": ("web", [80])})
    assert changed == (["mb102", "mb103", "mb900"], [])
    assert log.read_text().splitlines() == [
        "delete element bridge microbroker restrict { mb102 }",
        "add element bridge microbroker restrict { mb102 : jump r_web }",
        "add element bridge microbroker restrict { mb103 : jump r_web }",
        "delete element bridge microbroker restrict { mb900 }"]
    log.unlink()
    assert f.sync_ports({"mb101": ("web", []), "mb102": ("dns", []),
                         "mb900": ("web", [])}) == ([], [])
    assert not log.exists()         # nothing to change: no second call
    # A lease of a service gone from the config keeps its rule (mb900);
    # a name no rule may hold is reported, the rest still done.
    changed, problems = f.sync_ports({"mb 1": ("web", [80]), "mb104": ("web", [80])},
                                     keep={"mb900"})
    assert changed == ["mb101", "mb102", "mb104"] and len(problems) == 1
    assert "mb900" not in log.read_text() and "mb 1" not in log.read_text()


def test_nft_sync_ports_falls_back_to_one_call_per_element(tmp_path):
    """One element the kernel refuses (its profile chain is missing) must not
    keep the others out, as one all-or-nothing batch would."""
    log = tmp_path / "calls"
    nft = tmp_path / "nft"
    nft.write_text("#!/bin/sh\n[ \"$1\" = list ] && exit 1\n"
                   "s=$(cat); case $s in *r_gone*) echo 'No such file' >&2; exit 1 ;; esac\n"
                   "echo \"$s\" >> %s\n" % log)
    nft.chmod(0o755)
    changed, problems = filters.Nft(str(nft)).sync_ports(
        {"mb1": ("web", [80]), "mb2": ("gone", [80]), "mb3": ("web", [80])})
    assert changed == ["mb1", "mb3"] and len(problems) == 1 and "mb2" in problems[0]
    assert log.read_text().splitlines() == [
        "add element bridge microbroker restrict { mb1 : jump r_web }",
        "add element bridge microbroker restrict { mb3 : jump r_web }"]


def test_ebtables_sync_ports_redoes_duplicated_or_half_rules(tmp_path):
    """ebtables obeys the first of two rules: a stale duplicate ahead of the
    right one is not "in place"."""
    web = filters.Ebtables.profile_chain("web", [80])
    dns = filters.Ebtables.profile_chain("dns", [80])
    log = tmp_path / "calls"
    eb = tmp_path / "ebtables"
    eb.write_text("#!/bin/sh\n"
                  "if [ \"$3\" = -L ]; then cat <<X\n"
                  "Bridge table: filter\n\n"
                  "Bridge chain: MB-IN, entries: 4, policy: RETURN\n"
                  "-i mb1 -j %(dns)s\n-i mb1 -j %(web)s\n-i mb2 -j %(web)s\n"
                  "-i mb3 -j %(web)s\n\n"
                  "Bridge chain: MB-FWD, entries: 3, policy: RETURN\n"
                  "-i mb1 -j %(web)s\n-i mb2 -j %(web)s\n-i mb4 -j %(web)s\n"
                  "X\nexit 0; fi\necho \"$*\" >> %(log)s\n"
                  % {"dns": dns, "web": web, "log": log})
    eb.chmod(0o755)
    f = filters.Ebtables(str(eb))
    assert f.ports() == {"mb1", "mb2", "mb3", "mb4"}
    want = {n: ("web", [80]) for n in ("mb1", "mb2", "mb3")}
    changed, problems = f.sync_ports(want)
    # mb2 is whole; mb1 has a stale rule first, mb3 lacks its FORWARD
    # rule, mb4 is nobody's.
    assert changed == ["mb1", "mb3", "mb4"] and problems == []
    calls = log.read_text()
    assert "-A MB-IN -i mb1 -j %s" % web in calls and "-A MB-FWD -i mb3 -j %s" % web in calls
    assert "-D MB-IN -i mb1 -j %s" % dns in calls
    assert "mb2" not in calls
    assert "-A MB-IN -i mb4" not in calls and "-D MB-FWD -i mb4 -j %s" % web in calls
