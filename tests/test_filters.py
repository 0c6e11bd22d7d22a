"""Filter commands: argv only, checked names, our own table (kernel effect is tested in the VM)."""

import errno
import os
import stat

import pytest

from microbroker import filters, netlink as nl, nftables


class FakeKernel:
    """nf_tables state of one netns: our maps, chains and rules."""

    def __init__(self):
        self.maps = {}          # family -> {key: chain}; no entry: no table
        self.chains = {}        # family -> set of chain names
        self.rules = {}         # family -> [(chain, userdata)]
        self.gen = 1
        self.commits = 0

    def load(self, script):
        """What `nft -f` does with our scripts: tables, chains, the map and
        rules (a comment goes into the rule's userdata as libnftnl's
        NFTNL_UDATA_RULE_COMMENT TLV)."""
        for line in script.splitlines():
            w = line.split(" ")
            if line.startswith("add table "):
                self.maps.setdefault(w[2], {})
                self.chains.setdefault(w[2], set())
                self.rules.setdefault(w[2], [])
            elif line.startswith("add chain "):
                self.chains[w[2]].add(w[4])
            elif line.startswith("flush chain "):
                self.rules[w[2]] = [r for r in self.rules[w[2]] if r[0] != w[4]]
            elif line.startswith("add rule "):
                text = line.partition(' comment "')[2].rstrip('"').encode()
                self.rules[w[2]].append(
                    (w[4], bytes([0, len(text) + 1]) + text + b"\0" if text else b""))
        self.gen += 1


class FakeNftables(nftables.Nftables):
    """Stands in for the kernel side of nftables.Nftables, as
    net/netfilter/nf_tables_api.c answers: nft_add_set_elem (EEXIST for a
    key mapped elsewhere, ENOENT for a missing jump chain), nft_del_setelem
    (ENOENT for an absent key), nfnetlink.c nfnetlink_rcv_batch (ERESTART
    for a stale generation, nothing applied when any message fails)."""

    def __init__(self, kernel):
        self.k = kernel

    def close(self):
        pass

    def genid(self):
        return self.k.gen

    def commit(self, messages, genid=0, what=""):
        k = self.k
        if genid and genid != k.gen:
            raise nl.NetlinkError(errno.ERESTART, "", what)
        maps = {f: dict(m) for f, m in k.maps.items()}
        first = None
        for msg, _flags, body in messages:
            fam = {1: "inet", 7: "bridge"}[body[0]]
            err = 0
            for key, chain in nftables.parse_elements(body).items():
                m = maps.get(fam)
                if m is None:
                    err = errno.ENOENT
                elif msg == nftables.NFT_MSG_NEWSETELEM:
                    if chain not in k.chains[fam]:
                        err = errno.ENOENT
                    elif m.get(key, chain) != chain:
                        err = errno.EEXIST
                    else:
                        m[key] = chain
                elif key not in m:
                    err = errno.ENOENT
                else:
                    del m[key]
            if err and first is None:
                first = nl.NetlinkError(err, "", what)
        if first is not None:
            raise first
        if maps != k.maps:
            k.maps = maps
            k.gen += 1
        k.commits += 1

    def _dump(self, msg, family, attrs, what):
        k = self.k
        if msg == nftables.NFT_MSG_GETRULE:
            for chain, udata in k.rules.get(family, []):
                yield (nftables.nfgenmsg(0) + nl.attr_str(nftables.NFTA_RULE_CHAIN, chain) +
                       nl.attr(nftables.NFTA_RULE_USERDATA, udata)), k.gen & 0xFFFF
            return
        if family not in k.maps:
            raise nl.NetlinkError(errno.ENOENT, "", what)
        items = sorted(k.maps[family].items())
        if items:
            yield nftables.setelem_payload(family, "microbroker", "restrict", items), k.gen
        yield nftables.nfgenmsg(0), k.gen


@pytest.fixture
def kernel(monkeypatch):
    k = FakeKernel()
    monkeypatch.setattr(filters.nftables, "Nftables", lambda: FakeNftables(k))
    return k


def key(name):
    return nftables.ifname_key(name)


@pytest.fixture
def fake(tmp_path, monkeypatch, kernel):
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


def test_nft_rules_go_into_our_table_only(fake, kernel):
    nft = filters.Nft(str(fake.parent / "nft"))
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
    # The element of a restricted port goes by netlink, into our map.
    kernel.load(calls)
    nft.add_port("mb101", "web", [80])
    assert kernel.maps["bridge"] == {key("mb101"): "r_web"}
    assert fake.read_text() == calls            # no process for it


def test_nft_tables_are_rewritten_only_when_they_differ(fake, kernel):
    """A CGI lease checks the rules by one netlink dump; nft runs only when
    the table is missing, a chain lost rules, or this config writes others."""
    nft = filters.Nft(str(fake.parent / "nft"))

    def runs(*args, **kw):
        n = fake.read_text().count("/nft ") if fake.exists() else 0
        nft.ensure(*args, **kw)
        script = fake.read_text()
        kernel.load(script.split("/nft -f - \n")[-1])
        return script.count("/nft ") - n

    assert runs("mb", {"web": [80, 443]}) == 1
    assert runs("mb", {"web": [80, 443]}) == 0
    assert runs("mb", {"web": [80, 8080]}) == 1         # other ports, same count of rules
    assert runs("mb", {"web": [80, 8080]}, isolate=True) == 1
    kernel.rules["bridge"] = [r for r in kernel.rules["bridge"] if r[0] != "output"]
    assert runs("mb", {"web": [80, 8080]}, isolate=True) == 1
    del kernel.rules["bridge"]                          # nft flush ruleset
    assert runs("mb", {"web": [80, 8080]}, isolate=True) == 1
    assert runs("mb", {"web": [80, 8080]}, isolate=True) == 0
    nft.ensure_isolation({"br-exit"})
    kernel.load(fake.read_text().split("/nft -f - \n")[-1])
    assert runs("mb", {"web": [80, 8080]}, isolate=True) == 0
    n = fake.read_text().count("/nft ")
    nft.ensure_isolation({"br-exit"})
    assert fake.read_text().count("/nft ") == n


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
    rules = [l.split(" isolate ", 1)[1].split(" comment ")[0]
             for l in fake.read_text().splitlines()
             if l.startswith("add rule inet microbroker isolate ")]
    assert sorted(rules) == sorted('iifname "%s" oifname "%s" drop' % (a, b)
                                   for a in ("br-exit", "mb*") for b in ("br-exit", "mb*"))
    assert "flush chain inet microbroker isolate" in fake.read_text()
    for bad in ({"br x"}, {"$(id)*"}, {"*"}):
        with pytest.raises(ValueError):
            nft.ensure_isolation(bad)


def test_nft_sync_ports_fixes_only_what_differs(kernel):
    """One transaction: the stray and the wrong-profile element out, the missing in."""
    kernel.load("add table bridge microbroker\nadd chain bridge microbroker r_web\n"
                "add chain bridge microbroker r_dns\n")
    kernel.maps["bridge"] = {key("mb101"): "r_web", key("mb102"): "r_dns",
                             key("mb900"): "r_web"}
    f = filters.Nft("nft")
    assert f.ports() == {"mb101", "mb102", "mb900"}
    changed = f.sync_ports({"mb101": ("web", [80]), "mb102": ("web", [80]),
                            "mb103": ("web", [80])})
    assert changed == (["mb102", "mb103", "mb900"], [])
    assert kernel.maps["bridge"] == {key("mb101"): "r_web", key("mb102"): "r_web",
                                     key("mb103"): "r_web"}
    assert kernel.commits == 1
    assert f.sync_ports({"mb101": ("web", []), "mb102": ("web", []),
                         "mb103": ("web", [])}) == ([], [])
    assert kernel.commits == 1          # nothing to change: no transaction
    # A lease of a service gone from the config keeps its rule (mb103);
    # a name no rule may hold is reported, the rest still done.
    changed, problems = f.sync_ports({"mb 1": ("web", [80]), "mb104": ("web", [80])},
                                     keep={"mb103"})
    assert changed == ["mb101", "mb102", "mb104"] and len(problems) == 1
    assert kernel.maps["bridge"] == {key("mb103"): "r_web", key("mb104"): "r_web"}
    # No table (yet): nothing mapped, and the add says why.
    assert f.ports("inet") == set()
    assert f.sync_ports({"mb1": ("web", [80])}, "inet")[0] == []


def test_nft_sync_ports_falls_back_to_one_transaction_per_element(kernel):
    """One element the kernel refuses (its profile chain is missing) must not
    keep the others out, as one all-or-nothing batch would."""
    kernel.load("add table bridge microbroker\nadd chain bridge microbroker r_web\n")
    changed, problems = filters.Nft("nft").sync_ports(
        {"mb1": ("web", [80]), "mb2": ("gone", [80]), "mb3": ("web", [80])})
    assert changed == ["mb1", "mb3"] and len(problems) == 1 and "mb2" in problems[0]
    assert kernel.maps["bridge"] == {key("mb1"): "r_web", key("mb3"): "r_web"}


def test_nft_sync_reads_again_when_another_process_changed_the_map(kernel, monkeypatch):
    kernel.load("add table bridge microbroker\nadd chain bridge microbroker r_web\n")
    kernel.maps["bridge"] = {key("mb1"): "r_web"}
    real = FakeNftables.elements
    moved = []

    def elements(self, *a, **kw):
        out = real(self, *a, **kw)
        if not moved:               # a CGI removes mb1 right after our read
            moved.append(1)
            del kernel.maps["bridge"][key("mb1")]
            kernel.gen += 1
        return out
    monkeypatch.setattr(FakeNftables, "elements", elements)
    assert filters.Nft("nft").sync_ports({"mb2": ("web", [80])}) == (["mb2"], [])
    assert kernel.maps["bridge"] == {key("mb2"): "r_web"}


def test_nft_add_port_repoints_an_element_and_remove_is_idempotent(kernel):
    kernel.load("add table inet microbroker\nadd chain inet microbroker r_a\n"
                "add chain inet microbroker r_b\n")
    f = filters.Nft("nft")
    f.add_port("mb7", "a", family="inet")
    f.add_port("mb7", "a", family="inet")
    f.add_port("mb7", "b", family="inet")       # EEXIST, then delete + add at once
    assert kernel.maps["inet"] == {key("mb7"): "r_b"}
    f.remove_port("mb7", family="inet")
    f.remove_port("mb7", family="inet")
    assert kernel.maps["inet"] == {}
    with pytest.raises(filters.FilterError, match="No such file"):
        f.add_port("mb7", "nochain", family="inet")


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
