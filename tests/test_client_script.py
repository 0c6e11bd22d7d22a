"""microbroker-client under BusyBox sh, on the host: canned broker answers
from a small HTTP server, a PATH of BusyBox applets only, and stand-ins for
`ip`, `nft`, `ebtables` and `ubus` that keep a fake kernel in files and log
every call. The real kernel is in tests/test_kernel_client.py (VM)."""

import os
import re
import signal
import subprocess
import sys

import pytest

from standins import netifd
from standins.clientutil import (BUSYBOX, CLIENT, ROOT, TNL_ADDRESSES,
                                 CannedBroker, Sandbox, error_answer,
                                 gre_lease_answer, lease_answer,
                                 offer_answer, sh_answer, standard_answers,
                                 tnl_lease_answer, wait_for)

KERNEL_SH = os.path.join(ROOT, "client", "kernel.sh")
SCRIPTS = [CLIENT, KERNEL_SH,
           os.path.join(ROOT, "client", "netifd", "microbroker.sh"),
           os.path.join(ROOT, "init.d", "microbroker"),
           os.path.join(ROOT, "init.d", "microbroker-client")]


@pytest.fixture
def broker():
    b = CannedBroker()
    standard_answers(b)
    yield b
    b.close()


@pytest.fixture
def box(tmp_path):
    return Sandbox(tmp_path)


def test_busybox_is_there():
    assert os.path.exists(BUSYBOX), "busybox-static is needed (tests/setup)"
    out = subprocess.run([BUSYBOX, "--list"], stdout=subprocess.PIPE,
                         text=True).stdout.split()
    assert "wget" in out and "sh" in out


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_scripts_parse_under_busybox_sh(path):
    p = subprocess.run([BUSYBOX, "sh", "-n", path], stderr=subprocess.PIPE,
                       text=True)
    assert p.returncode == 0, p.stderr


BASHISMS = [
    (r"\[\[", "[[ ]]"), (r"^\s*function\s", "function keyword"),
    (r"\$'", "$'...' quoting"), (r"\[ [^]]* == ", "== in test"),
    (r"echo -e", "echo -e"), (r"\$\{[A-Za-z_][A-Za-z0-9_]*:[0-9]", "${var:offset}"),
    (r"\$RANDOM", "$RANDOM"), (r"^\s*source\s", "source"),
    (r"<<<", "here-string"), (r"\bdeclare\b|\btypeset\b", "declare"),
    (r"(^\s*|[;&|(]\s*)timeout\s", "timeout (not in OpenWrt's BusyBox)"),
    (r"\bcurl\b", "curl"), (r"&>", "&> redirection"),
]


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_scripts_have_no_bashisms(path):
    bad = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            code = line.split("#")[0] if not line.lstrip().startswith("#") \
                else ""
            for rx, what in BASHISMS:
                if re.search(rx, code):
                    bad.append("%s:%d: %s: %s" % (os.path.basename(path), n,
                                                   what, line.strip()))
    assert not bad, "\n".join(bad)


def test_client_never_evaluates():
    code = []
    for path in (CLIENT, KERNEL_SH):
        with open(path) as f:
            code += [l for l in f if not l.lstrip().startswith("#")]
    assert not [l for l in code if re.search(r"\beval\b", l)]
    # and sources nothing but its kernel part and netifd's own library
    sources = [l.strip() for l in code if re.match(r"\s*\.\s", l)]
    assert sources == ['. "$KERNEL_SH"',
                       '. "${NETIFD_MAIN_DIR:-/lib/netifd}/netifd-proto.sh"']


def test_kernel_part_is_found_and_its_absence_said(box, tmp_path):
    # installed: beside no netifd/ directory, the package's path; or
    # $MICROBROKER_LIB
    p = box.run("down", check=False, env={"MICROBROKER_LIB": "/nonexistent"})
    assert p.returncode == 1
    assert "/nonexistent/kernel.sh is missing" in p.stderr
    copy = tmp_path / "microbroker-client"
    with open(CLIENT) as f:
        copy.write_text(f.read())
    p = subprocess.run([BUSYBOX, "sh", str(copy), "-h"], env=box.env,
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert "/usr/lib/microbroker-client/kernel.sh is missing" in p.stderr


def test_help_and_usage_errors(box):
    p = box.run("-h")
    assert "Usage:" in p.stdout and "ip-full" in p.stdout
    p = box.run("frobnicate", check=False)
    assert p.returncode == 2 and "Usage:" in p.stderr
    for args, msg in [(("-s", "ftp://x", "up"), "-s needs a URL"),
                      (("-s", "http://[::1]:1/ x", "up"), "-s needs a URL"),
                      (("-i", "a" * 16, "up"), "-i needs an interface"),
                      (("-i", "-x", "up"), "-i needs an interface"),
                      (("-S", "a b", "up"), "-S needs a service"),
                      (("-b", "br;x", "up"), "-b needs a bridge"),
                      (("-k", "a'b", "up"), "-k needs the absolute path"),
                      (("-T", "0", "up"), "-T needs seconds"),
                      (("-d", "rel", "up"), "-d needs an absolute path")]:
        p = box.run(*args, check=False)
        assert p.returncode == 1 and msg in p.stderr, (args, p.stderr)
    assert box.calls("ip") == []


def test_up_builds_the_tunnel_from_the_lease(box, broker):
    box.add_link("br-lan")
    broker.set("/lease", lambda f: lease_answer(f, MAC="02:00:5e:00:00:01"))
    box.run("-s", broker.url, "-S", "exit", "-b", "br-lan", "up")

    (req,) = broker.seen("/lease")
    assert req.method == "POST"
    assert req.ctype == "application/x-www-form-urlencoded"
    assert set(req.fields) == {"format", "service", "tunnel_id",
                               "session_id"}
    assert req.fields["format"] == "sh" and req.fields["service"] == "exit"
    # in the query: an error before the body is read still answers sh
    assert req.query == {"format": "sh"}
    tid = req.fields["tunnel_id"]
    assert re.fullmatch(r"[1-9][0-9]*", tid) and int(tid) <= 65535
    assert req.fields["session_id"] == tid
    assert not broker.seen("/offer"), "one exit and -S: no offer needed"

    changes = [c for c in box.calls("ip") if "show" not in c
               and "help" not in c]
    assert changes == [
        ("ip", "l2tp", "add", "tunnel", "tunnel_id", tid, "peer_tunnel_id",
         "7", "encap", "ip", "local", "fc00::2", "remote", "fc00::1"),
        ("ip", "l2tp", "add", "session", "name", "mb0", "tunnel_id", tid,
         "session_id", tid, "peer_session_id", "70"),
        ("ip", "link", "set", "dev", "mb0", "mtu", "1280"),
        ("ip", "link", "set", "dev", "mb0", "address", "02:00:5e:00:00:01"),
        ("ip", "link", "set", "dev", "mb0", "master", "br-lan"),
        ("ip", "link", "set", "dev", "mb0", "up"),
    ]
    # the beacon filter (by the interface's name) is there before the
    # link, let alone before it is up
    log = box.calls()
    assert log.index(("nft", "-f", "-")) < log.index(changes[0])
    k = box.kernel()
    assert k["tunnel." + tid].split() == [tid, "7", "ip", "fc00::2",
                                          "fc00::1"]
    table = k["nft.mbclient-mb0"]
    for rule in ('iifname "mb0" ether type 0xfc00 drop',
                 'oifname "mb0" ether type 0xfc00 drop'):
        assert rule in table
    for hook in ("hook input", "hook forward", "hook output"):
        assert hook in table
    st = box.read_state()
    assert st["LEASE_ID"] == "0123456789abcdef"
    assert st["SECRET"] == "0123456789abcdef0123456789abcdef"
    assert st["SERVER"] == broker.url and st["TUNNEL_ID"] == tid
    assert st["FILTER"] == "nft" and st["BRIDGE"] == "br-lan"
    assert oct(os.stat(os.path.join(box.state, "mb0.state")).st_mode
               & 0o777) == "0o600"


def test_down_releases_and_leaves_nothing(box, broker):
    box.add_link("br-lan")
    box.run("-s", broker.url, "-S", "exit", "-b", "br-lan", "up")
    before = set(box.kernel())
    box.run("down")
    (rel,) = broker.seen("/release")
    assert rel.method == "POST"
    assert rel.fields == {"format": "sh", "lease_id": "0123456789abcdef",
                          "secret": "0123456789abcdef0123456789abcdef"}
    assert set(box.kernel()) == {"link.br-lan"}, before
    assert box.state_files() == []
    # down again: nothing to do, no error
    box.run("down")
    assert len(broker.seen("/release")) == 1


@pytest.mark.parametrize("fetch", ["busybox", "gnu", "uclient"])
def test_each_http_client(tmp_path, broker, fetch):
    if fetch == "gnu" and not os.path.exists("/usr/bin/wget"):
        pytest.fail("GNU wget is expected on this machine")
    box = Sandbox(tmp_path, fetch=fetch)
    box.run("-s", broker.url, "-S", "exit", "up")
    box.run("status")
    box.run("down")
    assert [r.path for r in broker.seen()] == ["/lease", "/status",
                                              "/release"]
    # uclient-fetch sends a POST body chunked (uclient-http.c)
    assert [r.chunked for r in broker.seen()] == [fetch == "uclient"] * 3
    prog = "uclient-fetch" if fetch == "uclient" else "wget"
    used = [c for c in box.calls(prog) if "-O" in c]  # not the probes
    assert len(used) == 3
    for c in used:
        if fetch == "gnu":
            assert "-t" in c and "-T" in c  # one try, and a timeout
        elif fetch == "uclient":
            assert "-T" in c and "-t" not in c
        else:  # this BusyBox wget has no -T: the script's own watchdog
            assert "-T" not in c and "-t" not in c


def test_busybox_wget_without_timeout_is_stopped_by_the_watchdog(box, broker):
    broker.set("/offer", "hang")
    p = box.run("-s", broker.url, "-T", "1", "offers", timeout=25)
    assert "no answer" in p.stdout


def test_busybox_wget_of_the_shells_own_busybox_is_timed_out_too(tmp_path,
                                                                  broker):
    """wget a link to the BusyBox that runs the script (as bench/storm.py
    and a router without uclient-fetch have it): known without asking it
    (--help), and a request that hangs ends at the timeout."""
    box = Sandbox(tmp_path, fetch="busybox-link")
    box.run("-s", broker.url, "-S", "exit", "up")
    assert [r.path for r in broker.seen()] == ["/lease"]
    broker.set("/offer", "hang")
    p = box.run("-s", broker.url, "-T", "1", "offers", timeout=25)
    assert "no answer" in p.stdout


def test_status_shows_counters(box, broker):
    box.run("-s", broker.url, "-S", "exit", "up")
    p = box.run("status")
    assert "lease 0123456789abcdef (exit)" in p.stdout
    assert "rx 5 packets 500 bytes, tx 6 packets 600 bytes" in p.stdout
    assert "present" in p.stdout


def test_status_json_for_monitoring_agents(box, broker):
    import json
    box.run("-s", broker.url, "-S", "exit", "up")
    st = json.loads(box.run("status", "--json").stdout)
    assert st["lease_id"] == "0123456789abcdef" and st["service"] == "exit"
    assert st["exit"] == {"rx_packets": 5, "rx_bytes": 500,
                          "tx_packets": 6, "tx_bytes": 600}
    assert st["present"] is True and st["kind"] == "l2tpv3"
    assert isinstance(st["expires"], int) and isinstance(st["mtu"], int)
    assert box.run("status", "--yaml", check=False).returncode == 2


def test_hook_runs_on_up_and_down_with_the_lease(box, broker, tmp_path):
    log = tmp_path / "hook.log"
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\necho \"$1 $2 $MB_EVENT $MB_KIND $MB_MTU "
                    "$MB_LEASE_ID $MB_SERVER secret=$MB_SECRET\" >>%s\n" % log)
    hook.chmod(0o755)
    box.run("-s", broker.url, "-S", "exit", "-H", str(hook), "up")
    box.run("-H", str(hook), "down")
    lines = log.read_text().splitlines()
    assert [l.split()[:4] for l in lines] == [["up", "mb0", "up", "l2tpv3"],
                                              ["down", "mb0", "down", "l2tpv3"]]
    assert all("0123456789abcdef %s secret=" % broker.url in l and
               l.endswith("secret=") for l in lines), lines
    p = box.run("-H", "relative/hook", "status", check=False)
    assert p.returncode != 0 and "-H needs the absolute path" in p.stderr


HOSTILE = {
    "command in address": dict(LOCAL="fc00::2;touch PWNED"),
    "substitution in address": dict(LOCAL="$(touch PWNED)"),
    "backticks in remote": dict(REMOTE="`touch PWNED`"),
    "option as address": dict(REMOTE="-batch"),
    "two ids": dict(PEER_TUNNEL_ID="7 8"),
    "negative id": dict(PEER_SESSION_ID="-1"),
    "zero id": dict(PEER_TUNNEL_ID="0"),
    "id too big": dict(PEER_TUNNEL_ID="4294967296"),
    "mtu with more words": dict(MTU="1280 up"),
    "mac with more words": dict(MAC="02:00:00:00:00:01 up"),
    "prefix with more words": dict(PREFIX="fd00::/64 dev lo"),
    "prefix without length": dict(PREFIX="fd00::"),
    "ipv4 that is IPv6": dict(IPV4="fd00::1", IPV4_GATEWAY="192.0.2.1"),
    "ipv4 without gateway": dict(IPV4="198.51.100.16"),
    "gateway with more words": dict(IPV4="198.51.100.16",
                                    IPV4_GATEWAY="192.0.2.1 dev lo"),
    "other kind": dict(KIND="ip6gretap"),
    "encap injection": dict(ENCAP="ip local ::"),
    "udp without ports": dict(ENCAP="udp"),
    "lease id": dict(LEASE_ID="../../etc/passwd"),
    "service name": dict(SERVICE="x y"),
}


@pytest.mark.parametrize("over", HOSTILE.values(), ids=list(HOSTILE))
def test_hostile_lease_answers_never_reach_ip(box, broker, over):
    broker.set("/lease", lambda f: lease_answer(f, **over))
    p = box.run("-s", broker.url, "-S", "exit", "up", check=False)
    assert p.returncode == 1
    assert "unusable lease" in p.stderr
    assert box.ip_calls("l2tp", "add") == []
    assert box.ip_calls("link", "set") == []
    assert not os.path.exists(os.path.join(box.tmp, "PWNED"))
    assert box.state_files() == []
    if "LEASE_ID" not in over:
        # a lease we cannot use is given back at once
        assert [r.fields["lease_id"] for r in broker.seen("/release")] == \
            ["0123456789abcdef"]


def test_answer_lines_outside_the_format_are_ignored(box, broker):
    def answer(f):
        return ("# comment\n" + "LOCAL=fc00::66\n" + "lower='x'\n" +
                "REMOTE='fc00::66' ; touch PWNED\n" + "MTU=\"9000\"\n" +
                " TUNNEL_ID='1'\n" + "X-Y='1'\n" + lease_answer(f) +
                "PEER_TUNNEL_ID='7'x\n" + "SECRET_EXTRA='$(touch PWNED)'\n")
    broker.set("/lease", answer)
    box.run("-s", broker.url, "-S", "exit", "up")
    (add,) = box.ip_calls("l2tp", "add", "tunnel")
    assert add[-4:] == ("local", "fc00::2", "remote", "fc00::1")
    assert ("link", "set", "dev", "mb0", "mtu", "1280") in \
        box.ip_calls("link", "set")
    assert not os.path.exists(os.path.join(box.tmp, "PWNED"))


def test_error_answers_are_reported_not_run(box, broker):
    broker.set("/lease", error_answer("full", 503, "service exit is full "
                                      "$(touch PWNED)", retry_after=30))
    p = box.run("-s", broker.url, "-S", "exit", "up", check=False)
    assert p.returncode == 1
    assert "full: service exit is full $(touch PWNED)" in p.stderr
    assert box.ip_calls("l2tp", "add") == []
    assert not os.path.exists(os.path.join(box.tmp, "PWNED"))


def test_http_error_without_shell_answer(box, broker):
    broker.set("/lease", (500, "oops"))
    p = box.run("-s", broker.url, "-S", "exit", "up", check=False)
    assert p.returncode == 1 and "no answer from" in p.stderr
    broker.set("/lease", "<html>captive portal</html>\n")
    p = box.run("-s", broker.url, "-S", "exit", "up", check=False)
    assert p.returncode == 1 and "shell format" in p.stderr


def test_id_conflict_proposes_other_ids(box, broker):
    broker.set("/lease", error_answer("id_conflict", 409, "taken"),
               lambda f: lease_answer(f))
    box.run("-s", broker.url, "-S", "exit", "up")
    first, second = broker.seen("/lease")
    assert first.fields["tunnel_id"] != second.fields["tunnel_id"]
    tid = second.fields["tunnel_id"]
    assert box.ip_calls("l2tp", "add", "tunnel")[0][4] == tid


def test_tunnel_id_taken_here_meanwhile_asks_again(box, broker):
    """Another client took our random id between choosing and building
    ("File exists"): the lease goes back, other ids are asked for at once,
    no back-off and no blame on the modules."""
    open(os.path.join(box.fake, "race"), "w").close()
    p = box.run("-s", broker.url, "-S", "exit", "up")
    first, second = broker.seen("/lease")
    assert first.fields["tunnel_id"] != second.fields["tunnel_id"]
    assert [r.fields["lease_id"] for r in broker.seen("/release")] == \
        ["0123456789abcdef"]
    assert "is taken here now; asking again" in p.stderr
    assert "kmod" not in p.stderr
    assert box.read_state()["TUNNEL_ID"] == second.fields["tunnel_id"]
    assert box.ip_calls("l2tp", "add", "tunnel")[-1][4] == \
        second.fields["tunnel_id"]


def test_run_renews_within_the_lifetime_whatever_the_interval(box, broker):
    """The renew is due RENEW_INTERVAL after the request that got the
    lease, but never later than its lifetime less a margin: a renew
    interval longer than the lifetime (or one counted from the end of the
    last renew) would let the lease expire."""
    standard_answers(broker, RENEW_INTERVAL="600", LIFETIME="8")
    rc, out, err = run_until(box, lambda: len(broker.seen("/renew")) >= 2,
                             "-s", broker.url, "-S", "exit", "-T", "1")
    assert rc == 0, err
    asks = broker.seen("/lease") + broker.seen("/renew")
    asks.sort(key=lambda r: r.at)
    for granted, renew in zip(asks, asks[1:3]):
        assert renew.at - granted.at < 8, "renewed after the lease ended"


def test_proposed_ids_avoid_tunnels_already_here(box, broker):
    # every id but one is taken in the fake kernel: the client finds it
    with open(os.path.join(box.fake, "tunnel.1"), "w") as f:
        f.write("1 2 ip fc00::2 fc00::9\n")
    taken = set()
    for _ in range(3):
        box.run("-s", broker.url, "-S", "exit", "up")
        (req,) = broker.seen("/lease")[-1:]
        taken.add(req.fields["tunnel_id"])
        box.run("down")
    assert "1" not in taken


def test_missing_ip_full_is_said_clearly(box, broker):
    p = box.run("-s", broker.url, "-S", "exit", "up", check=False,
                env={"FAKE_IP_NO_L2TP": "1"})
    assert p.returncode == 1
    assert "ip-full" in p.stderr and "opkg install ip-full" in p.stderr
    assert broker.seen() == [], "no lease without a way to build it"


def test_kernel_refusal_gives_the_lease_back(box, broker):
    p = box.run("-s", broker.url, "-S", "exit", "up", check=False,
                env={"FAKE_IP_FAIL_TUNNEL": "1"})
    assert p.returncode == 1
    assert "is fc00::2 an address of this host" in p.stderr
    assert len(broker.seen("/release")) == 1
    assert box.state_files() == []
    assert [k for k in box.kernel() if not k.startswith("link.br")] == []


def test_offers_and_the_least_loaded_exit(tmp_path):
    busy, idle, other, broken = (CannedBroker() for _ in range(4))
    try:
        busy.set("/offer", offer_answer({"exit": (10, 9)}, name="busy"))
        idle.set("/offer", offer_answer({"exit": (10, 2), "extra": (5, 0)},
                                        name="idle"))
        other.set("/offer", offer_answer({"extra": (10, 0)}, name="other"))
        broken.set("/offer", (500, "down"))
        for b in (busy, idle):
            b.set("/lease", lambda f: lease_answer(f))
        box = Sandbox(tmp_path)
        urls = []
        for b in (broken, busy, other, idle):
            urls += ["-s", b.url]
        p = box.run(*urls, "-S", "exit", "pick")
        assert p.stdout.strip() == idle.url
        assert "does not offer service exit" in p.stderr
        p = box.run(*urls, "offers")
        out = p.stdout
        assert "%s: no answer" % broken.url in out
        assert "%s: busy (microbroker 0.1.0), ready, 9 of 256" % busy.url \
            in out
        assert "  exit: l2tpv3/ip over IPv6, mtu 1280, lease 600s, 1 of 10 " \
            "free" in out
        assert "  extra: l2tpv3/ip over IPv6" in out
        # without -S: each exit's first service; "other" offers extra only
        assert out.rstrip().endswith("least loaded for service extra: %s"
                                     % other.url)
        box.run(*urls, "-S", "exit", "up")
        assert [r.path for r in idle.seen()][-1] == "/lease"
        assert busy.seen("/lease") == [] and other.seen("/lease") == []
        assert box.read_state()["SERVER"] == idle.url
    finally:
        for b in (busy, idle, other, broken):
            b.close()


def test_next_exit_when_the_best_refuses(tmp_path):
    a, b = CannedBroker(), CannedBroker()
    try:
        for x in (a, b):
            standard_answers(x)
        a.set("/offer", offer_answer({"exit": (10, 0)}))
        b.set("/offer", offer_answer({"exit": (10, 5)}))
        a.set("/lease", error_answer("forbidden", 403, "not you"))
        box = Sandbox(tmp_path)
        box.run("-s", a.url, "-s", b.url, "up")
        assert len(a.seen("/lease")) == 1 and len(b.seen("/lease")) == 1
        assert box.read_state()["SERVER"] == b.url
    finally:
        a.close()
        b.close()


def test_service_defaults_to_the_first_offered(box, broker):
    broker.set("/offer", offer_answer({"fast": (4, 0), "slow": (4, 0)}))
    box.run("-s", broker.url, "up")
    (req,) = broker.seen("/lease")
    assert req.fields["service"] == "fast"
    (offer,) = broker.seen("/offer")
    assert offer.method == "GET" and offer.fields == {"format": "sh"}


def test_token_is_sent_urlencoded(box, broker):
    token = "a&b=c%d+e/f?g#h"
    box.run("-s", broker.url, "-S", "exit", "up",
            env={"MICROBROKER_TOKEN": token})
    (req,) = broker.seen("/lease")
    assert req.fields["token"] == token


def test_token_from_a_file_never_in_any_argv(box, broker):
    token = "tok-" + "x" * 20
    path = os.path.join(box.tmp, "token")
    with open(path, "w") as f:
        f.write(token + "\n")
    box.run("-s", broker.url, "-S", "exit", "-k", path, "up")
    box.run("renew")
    box.run("down")
    assert broker.seen("/lease")[0].fields["token"] == token
    secret = "0123456789abcdef0123456789abcdef"
    with open(box.logfile) as f:
        log = f.read()
    assert "wget" in log
    # neither the token nor the lease's secret was on a command line
    assert token not in log and secret not in log
    p = box.run("-k", "relative", "up", check=False)
    assert p.returncode == 1 and "-k needs the absolute path" in p.stderr
    p = box.run("-s", broker.url, "up", check=False,
                env={"MICROBROKER_TOKEN": "a b"})
    assert p.returncode == 1 and "token must be printable" in p.stderr


def test_udp_encap(box, broker):
    broker.set("/lease", lambda f: lease_answer(f, ENCAP="udp",
                                                UDP_SPORT="40000",
                                                UDP_DPORT="1701"))
    box.run("-s", broker.url, "-S", "exit", "up")
    (add,) = box.ip_calls("l2tp", "add", "tunnel")
    assert add[-4:] == ("udp_sport", "40000", "udp_dport", "1701")


def test_up_again_resumes_the_kept_lease(box, broker):
    box.run("-s", broker.url, "-S", "exit", "up")
    adds = len(box.ip_calls("l2tp", "add"))
    p = box.run("up")
    assert "resumed lease 0123456789abcdef" in p.stderr
    assert [r.path for r in broker.seen()] == ["/lease", "/renew"]
    assert broker.seen("/renew")[0].fields == {
        "format": "sh", "lease_id": "0123456789abcdef",
        "secret": "0123456789abcdef0123456789abcdef"}
    assert len(box.ip_calls("l2tp", "add")) == adds
    assert box.ip_calls("l2tp", "del") == []


def test_resume_rebuilds_a_tunnel_that_is_gone(box, broker):
    box.run("-s", broker.url, "-S", "exit", "up")
    for f in os.listdir(box.fake):
        os.unlink(os.path.join(box.fake, f))  # e.g. modules reloaded
    box.run("up")
    assert len(box.ip_calls("l2tp", "add", "tunnel")) == 2
    assert "link.mb0" in box.kernel()


def test_forgotten_lease_is_leased_again_keeping_the_tunnel(box, broker):
    box.run("-s", broker.url, "-S", "exit", "up")
    tid = box.read_state()["TUNNEL_ID"]
    broker.set("/renew", error_answer("not_found", 404, "no such lease"))
    broker.set("/lease", lambda f: lease_answer(
        f, LEASE_ID="fedcba9876543210",
        SECRET="fedcba9876543210fedcba9876543210"))
    p = box.run("up")
    assert "forgot lease 0123456789abcdef" in p.stderr
    second = broker.seen("/lease")[1]
    assert second.fields["tunnel_id"] == tid, "the same ids again"
    # nothing changed in the tunnel: it stays as it is
    assert box.ip_calls("l2tp", "del") == []
    assert len(box.ip_calls("l2tp", "add", "tunnel")) == 1
    st = box.read_state()
    assert st["LEASE_ID"] == "fedcba9876543210"
    assert st["SECRET"] == "fedcba9876543210fedcba9876543210"


def test_forgotten_lease_with_new_exit_ids_rebuilds(box, broker):
    box.run("-s", broker.url, "-S", "exit", "up")
    broker.set("/renew", error_answer("not_found", 404, "no such lease"))
    broker.set("/lease", lambda f: lease_answer(f, PEER_TUNNEL_ID="8",
                                                PEER_SESSION_ID="80"))
    box.run("up")
    assert len(box.ip_calls("l2tp", "del", "tunnel")) == 1
    add = box.ip_calls("l2tp", "add", "tunnel")[-1]
    assert add[6] == "8"
    assert box.ip_calls("l2tp", "add", "session")[-1][-1] == "80"


def test_renew_command(box, broker):
    box.run("-s", broker.url, "-S", "exit", "up")
    box.run("renew")
    assert len(broker.seen("/renew")) == 1
    broker.set("/renew", error_answer("forbidden", 403, "wrong secret"))
    p = box.run("renew", check=False)
    assert p.returncode == 1 and "forgot lease" in p.stderr


def test_down_without_state_cleans_up_by_interface_name(box, broker):
    box.run("-s", broker.url, "-S", "exit", "-f", "ebtables", "up")
    os.unlink(os.path.join(box.state, "mb0.state"))  # e.g. /var/run lost
    box.run("down")
    k = box.kernel()
    assert [n for n, v in k.items() if v] == [], k
    assert broker.seen("/release") == []


def test_ebtables_filter(box, broker):
    box.run("-s", broker.url, "-S", "exit", "-f", "ebtables", "up")
    k = box.kernel()
    assert k["ebchain.mbclient-mb0"] == "-p 0xfc00 -j DROP\n"
    assert k["eb.INPUT"] == "-i mb0 -j mbclient-mb0\n"
    assert sorted(k["eb.FORWARD"].splitlines()) == [
        "-i mb0 -j mbclient-mb0", "-o mb0 -j mbclient-mb0"]
    assert k["eb.OUTPUT"] == "-o mb0 -j mbclient-mb0\n"
    assert not [n for n in k if n.startswith("nft.")]
    assert box.read_state()["FILTER"] == "ebtables"
    box.run("down")
    k = box.kernel()
    assert not [n for n in k if n.startswith(("ebchain.", "tunnel.", "link."))]
    assert all(v == "" for n, v in k.items() if n.startswith("eb."))


def test_filter_falls_back_from_nft_to_ebtables(box, broker):
    box.run("-s", broker.url, "-S", "exit", "up",
            env={"FAKE_NFT_BROKEN": "1"})
    assert box.read_state()["FILTER"] == "ebtables"
    assert "ebchain.mbclient-mb0" in box.kernel()


def test_forced_filter_that_fails_fails_up(box, broker):
    p = box.run("-s", broker.url, "-S", "exit", "-f", "nft", "up",
                check=False, env={"FAKE_NFT_BROKEN": "1"})
    assert p.returncode == 1 and "kmod-nft-bridge" in p.stderr
    assert "tunnel." not in "".join(box.kernel())
    assert len(broker.seen("/release")) == 1


def test_no_filter_tool_warns(box, broker):
    os.unlink(os.path.join(box.bin, "nft"))
    os.unlink(os.path.join(box.bin, "ebtables"))
    p = box.run("-s", broker.url, "-S", "exit", "up")
    assert "no 0xfc00 beacon filter" in p.stderr
    box.run("down")
    p = box.run("-s", broker.url, "-S", "exit", "-f", "none", "up")
    assert "beacon" not in p.stderr


def test_bridge_of_a_netifd_interface(box, broker):
    box.run("-s", broker.url, "-S", "exit", "-b", "@lan", "up")
    assert box.calls("ubus") == [("ubus", "call", "network.interface.lan",
                                  "add_device", '{ "name": "mb0" }')]
    assert box.ip_calls("link", "set", "dev", "mb0", "master") == []
    box.run("down")
    assert box.calls("ubus")[-1] == ("ubus", "call", "network.interface.lan",
                                     "remove_device", '{ "name": "mb0" }')


def test_missing_bridge_fails_up(box, broker):
    p = box.run("-s", broker.url, "-S", "exit", "-b", "br-nope", "up",
                check=False)
    assert p.returncode == 1 and "no bridge br-nope" in p.stderr
    assert len(broker.seen("/release")) == 1
    assert box.kernel() == {}


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def run_until(box, until, *args):
    """The client's `run` with ARGS until until() holds, then stopped as
    netifd stops it (SIGTERM): (returncode, stdout, stderr)."""
    proc = box.start(*args, "run")
    try:
        reached = wait_for(until)
    finally:
        rc, out, err = stop(proc)
    assert reached, err
    return rc, out, err


ADDRESSES = dict(PREFIX="fd00:beef::/64", IPV4="198.51.100.16",
                 IPV4_GATEWAY="192.0.2.1")


def test_routed_lease_configures_its_ipv4_address(box, broker):
    broker.set("/lease", lambda f: lease_answer(f, MAC="02:6d:62:00:00:07",
                                                **ADDRESSES))
    p = box.run("-s", broker.url, "-S", "exit", "up")
    changes = [c for c in box.calls("ip") if c[1] in ("addr", "route")]
    assert changes == [
        ("ip", "addr", "add", "198.51.100.16/32", "dev", "mb0"),
        ("ip", "route", "replace", "192.0.2.1/32", "dev", "mb0"),
    ]
    assert "ipv4 198.51.100.16 via 192.0.2.1, prefix fd00:beef::/64" in p.stderr
    st = box.read_state()
    assert (st["PREFIX"], st["IPV4"], st["IPV4_GATEWAY"]) == \
        ("fd00:beef::/64", "198.51.100.16", "192.0.2.1")


def test_bridged_lease_leaves_addresses_to_the_bridge(box, broker):
    box.add_link("br-lan")
    broker.set("/lease", lambda f: lease_answer(f, **ADDRESSES))
    box.run("-s", broker.url, "-S", "exit", "-b", "br-lan", "up")
    assert [c for c in box.calls("ip") if c[1] in ("addr", "route")] == []


def test_netifd_gets_the_leased_addresses(box, broker):
    standard_answers(broker, RENEW_INTERVAL="1", **ADDRESSES)
    rc, out, err = run_until(box, lambda: len(broker.seen("/renew")) >= 1,
                             "-s", broker.url, "-S", "exit", "-N", "wan")
    assert rc == 0, err
    netifd = box.netifd_calls()
    assert netifd == [("proto_init_update", "mb0", "1"),
                      ("proto_add_ipv4_address", "198.51.100.16", "32"),
                      ("proto_add_ipv4_route", "192.0.2.1", "32"),
                      ("proto_add_ipv4_route", "0.0.0.0", "0", "192.0.2.1"),
                      ("proto_add_ipv6_prefix", "fd00:beef::/64"),
                      ("proto_send_update", "wan")]
    # netifd owns the addresses: the client adds none itself.
    assert [c for c in box.calls("ip") if c[1] in ("addr", "route")] == []


def test_run_renews_releases_again_and_stops_cleanly(box, broker):
    standard_answers(broker, RENEW_INTERVAL="1", LIFETIME="30")
    proc = box.start("-s", broker.url, "-S", "exit", "-N", "exitvpn", "run")
    try:
        assert wait_for(lambda: len(broker.seen("/renew")) >= 2), \
            proc.stderr.read() if proc.poll() is not None else "no renew"
        pid = open(os.path.join(box.state, "mb0.pid")).read().strip()
        assert pid == str(proc.pid)
        # the exit forgets the lease: the client leases again
        broker.set("/renew", error_answer("not_found", 404, "gone"),
                   lambda f: lease_answer(f, secret=False,
                                          RENEW_INTERVAL="1"))
        assert wait_for(lambda: len(broker.seen("/lease")) >= 2)
        # another client on the same interface is refused
        p = box.run("-s", broker.url, "run", check=False)
        assert p.returncode == 1 and "already running" in p.stderr
        p = box.run("-s", broker.url, "up", check=False)
        assert p.returncode == 1 and "keeps mb0" in p.stderr
    finally:
        rc, out, err = stop(proc)
    assert rc == 0, err
    assert "forgot lease" in err and "stopping" in err
    assert broker.seen()[-1].path == "/release", (broker.seen(), err)
    assert box.kernel() == {}
    assert box.state_files() == []
    # netifd heard of the link (once per lease and renew)
    log = box.calls()
    assert ("proto_init_update", "mb0", "1") in log
    assert ("proto_send_update", "exitvpn") in log


def test_sigusr1_renews_at_once_from_a_nap_and_after_a_request(box, broker):
    """netifd's renew (SIGUSR1) ends a nap of two minutes at once; one that
    comes while a request waits for its answer neither fails that request
    nor is lost: the next renew follows it."""
    import threading
    standard_answers(broker)    # RENEW_INTERVAL 120
    renew = broker.answers["/renew"][0]
    asked, signalled = threading.Event(), threading.Event()

    def slow_renew(fields):
        asked.set()
        signalled.wait(30)
        return renew(fields)
    proc = box.start("-s", broker.url, "-S", "exit", "run")
    try:
        assert wait_for(lambda: "mb0.state" in box.state_files() or
                        proc.poll() is not None)
        assert wait_for(lambda: nap_of(proc.pid))
        proc.send_signal(signal.SIGUSR1)
        assert wait_for(lambda: len(broker.seen("/renew")) == 1)
        broker.set("/renew", slow_renew, renew)
        assert wait_for(lambda: nap_of(proc.pid))
        proc.send_signal(signal.SIGUSR1)
        assert asked.wait(60)
        proc.send_signal(signal.SIGUSR1)    # during the request
        signalled.set()
        assert wait_for(lambda: len(broker.seen("/renew")) == 3)
    finally:
        signalled.set()
        rc, out, err = stop(proc)
    assert rc == 0, err
    assert "renew failed" not in err and "stopping" in err, err
    assert broker.seen()[-1].path == "/release"


def nap_of(pid):
    """Is the client's run loop (PID) in its nap: a `read -t` (a poll the
    kernel put to sleep) or a `sleep` of its own?"""
    try:
        with open("/proc/%d/wchan" % pid) as f:
            if "poll" in f.read():
                return True
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            kids = f.read().split()
    except OSError:
        return False
    for k in kids:
        try:
            with open("/proc/%s/cmdline" % k) as f:
                if f.read().split("\0")[:1] == ["sleep"]:
                    return True
        except OSError:
            pass
    return False


def test_netifd_hears_of_the_link_once_not_at_every_renew(box, broker):
    standard_answers(broker, RENEW_INTERVAL="1")
    rc, out, err = run_until(box, lambda: len(broker.seen("/renew")) >= 3,
                             "-s", broker.url, "-S", "exit", "-N", "wan6")
    assert rc == 0, err
    netifd = box.netifd_calls()
    assert netifd == [("proto_init_update", "mb0", "1"),
                      ("proto_send_update", "wan6")]


def test_stop_releases_first_inside_netifds_window(box, broker):
    """netifd SIGKILLs the command 5 s after teardown began: the release
    goes out first, while the tunnel still stands, bounded by its own
    short timeout (this exit never answers it), then the tunnel and the
    filter the client installed go."""
    box.add_link("br-lan")
    standard_answers(broker)
    kernel_at_release = []

    def release(fields):
        kernel_at_release.append(sorted(box.kernel()))
        return "hang"
    broker.set("/release", release)
    proc = box.start("-s", broker.url, "-S", "exit", "-b", "br-lan",
                     "-N", "exitvpn", "run")
    assert wait_for(lambda: box.state_files() == ["mb0.pid", "mb0.state"]
                    or proc.poll() is not None)
    tid = box.read_state()["TUNNEL_ID"]
    assert netifd.teardown(proc), "killed by netifd's teardown timeout"
    (before,) = kernel_at_release
    assert "tunnel." + tid in before and "nft.mbclient-mb0" in before
    assert set(box.kernel()) == {"link.br-lan"}
    assert box.state_files() == []
    # the filter it installed, and only that one
    assert box.calls("ebtables") == []
    assert "could not release" in proc.stderr.read()


def test_run_backs_off_on_errors_and_honours_retry_after(box, broker):
    broker.set("/lease", error_answer("full", 503, "full", retry_after=1),
               error_answer("too_many", 429, "slow down", retry_after=1),
               lambda f: lease_answer(f, RENEW_INTERVAL="30"))
    rc, out, err = run_until(box, lambda: "link.mb0" in box.kernel(),
                             "-s", broker.url, "-S", "exit")
    assert rc == 0
    assert len(broker.seen("/lease")) == 3
    assert "no lease: full: full; next try in 1s" in err
    assert box.kernel() == {}


def test_run_survives_an_unreachable_exit_until_the_lease_runs_out(box,
                                                                   broker):
    standard_answers(broker, RENEW_INTERVAL="1", LIFETIME="3")
    proc = box.start("-s", broker.url, "-S", "exit", "run")
    try:
        assert wait_for(lambda: broker.seen("/renew"))
        broker.set("/renew", (500, ""))  # like a broker being restarted
        broker.set("/lease", (500, ""))
        assert wait_for(lambda: box.kernel() == {}), \
            "the tunnel goes once its lease has run out"
        n = len(broker.seen("/lease"))
        standard_answers(broker, RENEW_INTERVAL="1", LIFETIME="3")
        assert wait_for(lambda: len(broker.seen("/lease")) > n and
                        "link.mb0" in box.kernel())
    finally:
        rc, out, err = stop(proc)
    assert rc == 0
    assert "renew failed: no answer" in err and "ran out" in err


def test_run_resumes_after_its_own_restart(box, broker):
    standard_answers(broker, RENEW_INTERVAL="1")
    proc = box.start("-s", broker.url, "-S", "exit", "run")
    assert wait_for(lambda: broker.seen("/renew"))
    proc.kill()  # no chance to clean up
    proc.wait()
    n = len(broker.seen("/lease"))
    rc, out, err = run_until(box, lambda: len(broker.seen("/renew")) >= 3,
                             "-s", broker.url, "-S", "exit")
    assert "resumed lease" in err
    assert len(broker.seen("/lease")) == n
    assert len(box.ip_calls("l2tp", "add", "tunnel")) == 1


def test_down_stops_a_run_loop(box, broker):
    proc = box.start("-s", broker.url, "-S", "exit", "run")
    try:
        assert wait_for(lambda: os.path.exists(os.path.join(box.state,
                                                            "mb0.state")))
        box.run("down")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert broker.seen()[-1].path == "/release"
    assert box.kernel() == {} and box.state_files() == []


def test_two_interfaces_side_by_side(box, broker):
    box.run("-s", broker.url, "-S", "exit", "-i", "mb0", "up")
    box.run("-s", broker.url, "-S", "exit", "-i", "mb1", "up")
    t0, t1 = (box.read_state(i)["TUNNEL_ID"] for i in ("mb0", "mb1"))
    assert t0 != t1
    box.run("-i", "mb0", "down")
    k = box.kernel()
    assert "link.mb1" in k and "nft.mbclient-mb1" in k
    assert "link.mb0" not in k and "nft.mbclient-mb0" not in k
    box.run("-i", "mb1", "down")
    assert box.kernel() == {}


def test_against_the_real_broker_without_a_dataplane(box, tmp_path):
    """The contract end to end: `microbroker serve --dataplane none`."""
    import socket
    s = socket.socket(socket.AF_INET6)
    s.bind(("::1", 0))
    port = s.getsockname()[1]
    s.close()
    cfg = tmp_path / "microbroker"
    cfg.write_text("config broker\n\toption dataplane 'none'\n"
                   "config service 'default'\n\toption lifetime '600'\n")
    srv = subprocess.Popen(
        [sys.executable, "-m", "microbroker", "-c", str(cfg), "serve",
         "--listen", "[::1]:%d" % port, "--state-dir", str(tmp_path / "exit")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = "http://[::1]:%d" % port
    try:
        assert wait_for(lambda: "leases used" in box.run(
            "-s", url, "offers", check=False).stdout or
            srv.poll() is not None, timeout=30)
        assert srv.poll() is None, srv.communicate()[1]
        p = box.run("-s", url, "offers")
        assert "default: l2tpv3/ip over IPv6, mtu 1280, lease 600s, 256 of " \
            "256 free" in p.stdout
        assert "cannot build tunnels now: dataplane none" in p.stdout
        box.run("-s", url, "up")
        st = box.read_state()
        assert st["LOCAL"] == "::1" and st["REMOTE"] == "::1"
        assert st["SERVICE"] == "default"
        add = box.ip_calls("l2tp", "add", "tunnel")[0]
        tid = add[4]
        assert add[5:] == ("peer_tunnel_id", st["PEER_TUNNEL_ID"], "encap",
                           "ip", "local", "::1", "remote", "::1")
        assert st["TUNNEL_ID"] == tid
        box.run("renew")
        assert "lease %s (default)" % st["LEASE_ID"] in \
            box.run("status").stdout
        p = box.run("down")
        assert "released lease %s" % st["LEASE_ID"] in p.stderr
        assert box.kernel() == {} and box.state_files() == []
        assert "0 of 256 leases used" in box.run("-s", url, "offers").stdout
    finally:
        srv.terminate()
        srv.communicate(timeout=30)


# ---------------------------------------------------------------- other kinds
# ip6gretap (Ethernet over GRE over IPv6, layer 2) and ip6tnl (IPv4 and IPv6
# in IPv6, routed, layer 3), next to l2tpv3.

@pytest.fixture
def exits():
    """exits(KIND, **lease_over): a canned broker offering one service of
    KIND (l2tpv3 "exit", ip6gretap "gre", ip6tnl "tnl")."""
    made = []

    def make(kind="l2tpv3", **over):
        b = CannedBroker()
        standard_answers(b, kind=kind, **over)
        made.append(b)
        return b
    yield make
    for b in made:
        b.close()


def ip_changes(box):
    """The `ip` calls that change something: not the probes and shows."""
    return [c[1:] for c in box.calls("ip")
            if "show" not in c and "help" not in c]


def gre_add(key, okey="7"):
    return ("link", "add", "mb0", "type", "ip6gretap", "local", "fc00::2",
            "remote", "fc00::1", "ikey", key, "okey", okey, "encaplimit",
            "none")


TNL_ADD = ("link", "add", "mb0", "type", "ip6tnl", "mode", "any", "local",
           "fc00::2", "remote", "fc00::1", "encaplimit", "none")


def test_kind_option_errors(box):
    p = box.run("-K", "gre", "up", check=False)
    assert p.returncode == 1 and "-K needs l2tpv3, ip6gretap or ip6tnl" in \
        p.stderr
    p = box.run("-s", "http://[::1]:9", "-K", "ip6tnl", "-b", "br-lan", "up",
                check=False)
    assert p.returncode == 1
    assert "ip6tnl is routed, -b does not apply" in p.stderr
    assert box.calls("ip") == [] and box.calls("wget") == []
    p = box.run("-h")
    for word in ("-K KIND", "-D ", "kmod-gre6", "kmod-ip6-tunnel",
                 "kmod-l2tp-eth", "kmod-l2tp-ip", "ip-full"):
        assert word in p.stdout, word


def test_gre_up_builds_the_link_and_down_removes_it(box, exits):
    gre = exits("ip6gretap")
    box.add_link("br-lan")
    p = box.run("-s", gre.url, "-K", "ip6gretap", "-b", "br-lan", "up")
    (req,) = gre.seen("/lease")
    # our key proposal in tunnel_id; no session id, no service: the exit
    # takes its first ip6gretap service
    assert set(req.fields) == {"format", "kind", "tunnel_id"}
    assert req.fields["kind"] == "ip6gretap"
    key = req.fields["tunnel_id"]
    assert re.fullmatch(r"[1-9][0-9]*", key) and int(key) <= 65535
    assert not gre.seen("/offer"), "one exit and -K: no offer needed"
    assert ip_changes(box) == [
        gre_add(key),
        ("link", "set", "dev", "mb0", "mtu", "1280"),
        ("link", "set", "dev", "mb0", "address", "02:6d:62:00:00:07"),
        ("link", "set", "dev", "mb0", "master", "br-lan"),
        ("link", "set", "dev", "mb0", "up"),
    ]
    assert box.ip_calls("l2tp", "add") == []
    table = box.kernel()["nft.mbclient-mb0"]
    assert 'iifname "mb0" ether type 0xfc00 drop' in table
    st = box.read_state()
    assert (st["KIND"], st["SERVICE"], st["IKEY"], st["OKEY"]) == \
        ("ip6gretap", "gre", key, "7")
    assert st["TUNNEL_ID"] == st["SESSION_ID"] == st["IPV6"] == ""
    assert st["BRIDGE"] == "br-lan" and st["FILTER"] == "nft"
    assert "mb0 up: ip6gretap, key %s in/7 out, fc00::2 -> fc00::1, mtu " \
        "1280, mac 02:6d:62:00:00:07, in br-lan, beacon filter nft" % key \
        in p.stderr
    assert "(gre, ip6gretap)" in p.stderr
    p = box.run("status")
    assert "mb0: ip6gretap, key %s in/7 out, fc00::2 -> fc00::1, mtu 1280, " \
        "present" % key in p.stdout
    box.run("down")
    assert ip_changes(box)[-1] == ("link", "del", "mb0")
    assert set(box.kernel()) == {"link.br-lan"}
    assert len(gre.seen("/release")) == 1
    assert box.state_files() == []


def test_ip6tnl_up_builds_a_routed_link(box, exits):
    tnl = exits("ip6tnl")
    p = box.run("-s", tnl.url, "-K", "ip6tnl", "up")
    (req,) = tnl.seen("/lease")
    assert req.fields == {"format": "sh", "kind": "ip6tnl"}, "no ids at all"
    assert ip_changes(box) == [
        TNL_ADD,
        ("link", "set", "dev", "mb0", "mtu", "1280"),
        ("link", "set", "dev", "mb0", "up"),
        ("addr", "add", "198.51.100.16/32", "dev", "mb0"),
        ("addr", "add", "fd00:beef::1/128", "dev", "mb0"),
    ]
    # no Ethernet: no MAC, no beacon filter, no bridge
    assert [c for c in box.calls("nft") if c[1:] == ("-f", "-")] == []
    assert box.calls("ebtables") == [] or \
        not [k for k in box.kernel() if k.startswith("eb")]
    st = box.read_state()
    assert (st["KIND"], st["IPV4"], st["IPV6"], st["PREFIX"], st["MAC"],
            st["FILTER"], st["IPV4_GATEWAY"]) == \
        ("ip6tnl", "198.51.100.16", "fd00:beef::1", "fd00:beef::/64", "", "",
         "")
    assert "mb0 up: ip6tnl, fc00::2 -> fc00::1, mtu 1280, ipv4 " \
        "198.51.100.16, ipv6 fd00:beef::1, prefix fd00:beef::/64" in p.stderr
    assert "default routes" not in p.stderr
    p = box.run("status")
    assert "mb0: ip6tnl, fc00::2 -> fc00::1, mtu 1280, present" in p.stdout
    box.run("down")
    assert ip_changes(box)[-1] == ("link", "del", "mb0")
    assert box.kernel() == {} and box.state_files() == []
    assert len(tnl.seen("/release")) == 1


V4_DEFAULT = [("route", "replace", "0.0.0.0/1", "dev", "mb0"),
              ("route", "replace", "128.0.0.0/1", "dev", "mb0")]
# `ip` takes the family from the address (one -batch for both families)
V6_DEFAULT = [("route", "replace", "::/1", "dev", "mb0"),
              ("route", "replace", "8000::/1", "dev", "mb0")]


@pytest.mark.parametrize("addrs,routes", [
    (TNL_ADDRESSES, V4_DEFAULT + V6_DEFAULT),
    (dict(IPV4="198.51.100.16", IPV6="", PREFIX=""), V4_DEFAULT),
    (dict(IPV4="", IPV6="fd00:beef::1", PREFIX=""), V6_DEFAULT),
    (dict(IPV4="", IPV6="", PREFIX="fd00:beef::/56"), V6_DEFAULT),
    (dict(IPV4="", IPV6="", PREFIX=""), []),
], ids=["all", "ipv4", "ipv6", "prefix", "none"])
def test_ip6tnl_default_routes_only_with_D(box, exits, addrs, routes):
    tnl = exits("ip6tnl", **addrs)
    box.run("-s", tnl.url, "-K", "ip6tnl", "up")
    assert [c for c in ip_changes(box) if "route" in c] == []
    box.run("down")
    n = len(ip_changes(box))
    p = box.run("-s", tnl.url, "-K", "ip6tnl", "-D", "up")
    built = ip_changes(box)[n:]
    assert [c for c in built if "route" in c] == routes
    # the routes come last, once the addresses are there
    assert built[len(built) - len(routes):] == routes
    assert ("default routes" in p.stderr) == bool(routes)
    if routes == V4_DEFAULT + V6_DEFAULT:
        assert ", default routes IPv4 IPv6" in p.stderr


def test_D_does_nothing_for_layer_2(box, broker):
    broker.set("/lease", lambda f: lease_answer(f, **ADDRESSES))
    box.run("-s", broker.url, "-S", "exit", "-D", "up")
    assert [c for c in box.calls("ip") if c[1] in ("addr", "route")] == [
        ("ip", "addr", "add", "198.51.100.16/32", "dev", "mb0"),
        ("ip", "route", "replace", "192.0.2.1/32", "dev", "mb0"),
    ]


def test_gre_lease_with_addresses_is_routed_like_l2tp(box, exits):
    gre = exits("ip6gretap", **ADDRESSES)
    box.run("-s", gre.url, "-K", "ip6gretap", "-D", "up")
    assert [c for c in ip_changes(box) if c[0] in ("addr", "route")] == [
        ("addr", "add", "198.51.100.16/32", "dev", "mb0"),
        ("route", "replace", "192.0.2.1/32", "dev", "mb0"),
    ]


MIXED = {"v6": (10, 0, "ip6tnl"), "gre": (10, 0, "ip6gretap"),
         "l2": (10, 0, "l2tpv3")}


def mixed_lease(f):
    answer = {"v6": tnl_lease_answer, "gre": gre_lease_answer,
              "l2": lease_answer}[f["service"]]
    return answer(f, SERVICE=f["service"])


@pytest.mark.parametrize("args,env,offered,chosen,fields", [
    # -K: the exit's first service of that kind, whatever comes first
    (("-K", "l2tpv3"), {}, MIXED, "l2", {"tunnel_id", "session_id"}),
    (("-K", "ip6gretap"), {}, MIXED, "gre", {"tunnel_id"}),
    (("-K", "ip6tnl"), {}, MIXED, "v6", set()),
    # neither -K nor -S: the first one this router can build, as asked
    ((), {}, MIXED, "v6", set()),
    (("-b", "br-lan"), {}, MIXED, "gre", {"tunnel_id"}),
    ((), {"FAKE_IP_TINY": "1"}, {"l2": MIXED["l2"], "gre": MIXED["gre"]},
     "gre", {"tunnel_id"}),
    # -S and -K agree
    (("-S", "gre", "-K", "ip6gretap"), {}, MIXED, "gre", {"tunnel_id"}),
], ids=["K-l2tpv3", "K-ip6gretap", "K-ip6tnl", "first", "bridged-first",
        "ip-tiny-first", "S-and-K"])
def test_service_is_chosen_by_kind(tmp_path, args, env, offered, chosen,
                                   fields):
    # two exits, so that their offers are read; the first offers only
    # l2tpv3 and is busier
    a, b = CannedBroker(), CannedBroker()
    try:
        a.set("/offer", offer_answer({"l2": (10, 9)}))
        a.set("/lease", lambda f: lease_answer(f, SERVICE="l2"))
        b.set("/offer", offer_answer(offered))
        b.set("/lease", mixed_lease)
        box = Sandbox(tmp_path)
        box.add_link("br-lan")
        kind = dict(MIXED)[chosen][2]
        box.run("-s", a.url, "-s", b.url, *args, "up", env=env)
        (req,) = b.seen("/lease")
        assert a.seen("/lease") == []
        want = {"format", "service"} | fields
        if "-K" in args:
            want.add("kind")
            assert req.fields["kind"] == kind
        assert set(req.fields) == want
        assert req.fields["service"] == chosen
        st = box.read_state()
        assert (st["SERVER"], st["SERVICE"], st["KIND"]) == \
            (b.url, chosen, kind)
        assert len(box.ip_calls("link", "add") +
                   box.ip_calls("l2tp", "add", "tunnel")) == 1
    finally:
        a.close()
        b.close()


def test_service_of_another_kind_is_skipped(tmp_path):
    a, b = CannedBroker(), CannedBroker()
    try:
        a.set("/offer", offer_answer({"x": (10, 0, "ip6gretap")}))
        b.set("/offer", offer_answer({"l2": (10, 0)}))
        box = Sandbox(tmp_path)
        p = box.run("-s", a.url, "-s", b.url, "-S", "x", "-K", "ip6tnl",
                    "up", check=False)
        assert p.returncode == 1
        assert "service x is ip6gretap, not ip6tnl" in p.stderr
        assert "does not offer service x" in p.stderr
        p = box.run("-s", a.url, "-s", b.url, "-K", "ip6tnl", "up",
                    check=False)
        assert p.returncode == 1
        assert "%s offers no ip6tnl service" % a.url in p.stderr
        assert "no exit offers a ip6tnl service usable here now" in p.stderr
        assert a.seen("/lease") == [] and b.seen("/lease") == []
    finally:
        a.close()
        b.close()


def test_one_exit_with_S_and_K_lets_the_exit_check_the_kind(box, exits):
    gre = exits("ip6gretap")
    gre.set("/lease", error_answer("unknown_kind", 404, "service gre is kind "
                                   "ip6gretap, not ip6tnl"))
    p = box.run("-s", gre.url, "-S", "gre", "-K", "ip6tnl", "up",
                check=False)
    assert p.returncode == 1
    assert "unknown_kind: service gre is kind ip6gretap, not ip6tnl" in \
        p.stderr
    (req,) = gre.seen("/lease")
    assert req.fields == {"format": "sh", "service": "gre", "kind": "ip6tnl"}
    assert box.ip_calls("link", "add") == []


def test_lease_of_another_kind_than_asked_is_given_back(box, exits):
    gre = exits("ip6gretap")
    gre.set("/lease", lambda f: tnl_lease_answer(f))
    p = box.run("-s", gre.url, "-K", "ip6gretap", "up", check=False)
    assert p.returncode == 1
    assert "leased a ip6tnl tunnel, not ip6gretap" in p.stderr
    assert len(gre.seen("/release")) == 1
    assert box.ip_calls("link", "add") == [] and box.state_files() == []


@pytest.mark.parametrize("kind,fields", [("ip6gretap", {"tunnel_id"}),
                                         ("ip6tnl", set())])
def test_S_alone_learns_the_kind_from_the_offer(box, exits, kind, fields):
    """One exit and -S: the service is taken for L2TPv3 (one request, as
    before); the exit's bad_request sends the client to its offer."""
    b = exits(kind)
    svc = {"ip6gretap": "gre", "ip6tnl": "tnl"}[kind]
    box.run("-s", b.url, "-S", svc, "up")
    assert [r.path for r in b.seen()] == ["/lease", "/offer", "/lease"]
    first, second = b.seen("/lease")
    assert set(first.fields) == {"format", "service", "tunnel_id",
                                 "session_id"}
    assert set(second.fields) == {"format", "service"} | fields
    assert box.read_state()["KIND"] == kind
    assert len(box.ip_calls("link", "add")) == 1
    # the kept lease tells the kind from now on: leasing again after the
    # exit forgot it asks with the right fields at once
    b.set("/renew", error_answer("not_found", 404, "no such lease"))
    box.run("-s", b.url, "-S", svc, "up")
    third = b.seen("/lease")[2]
    assert third.fields == second.fields
    assert b.seen()[-1].path == "/lease" and len(b.seen("/offer")) == 1
    assert len(box.ip_calls("link", "add")) == 1, "the same link, kept"
    assert box.ip_calls("link", "del") == []


def test_bridge_and_a_routed_lease(box, exits):
    box.add_link("br-lan")
    tnl = exits("ip6tnl")
    # learned from the offer: refused before any lease
    p = box.run("-s", tnl.url, "-S", "tnl", "-b", "br-lan", "up",
                check=False)
    assert p.returncode == 1
    assert "ip6tnl is routed, -b does not apply" in p.stderr
    assert [r.path for r in tnl.seen()] == ["/lease", "/offer"]
    # an exit that leases ip6tnl anyway: given back, nothing built
    l2 = exits("l2tpv3")
    l2.set("/lease", lambda f: tnl_lease_answer(f))
    p = box.run("-s", l2.url, "-S", "exit", "-b", "br-lan", "up",
                check=False)
    assert p.returncode == 1
    assert "ip6tnl is routed, -b does not apply" in p.stderr
    assert [r.path for r in l2.seen()] == ["/lease", "/release"]
    assert box.ip_calls("link", "add") == []
    assert box.state_files() == []


@pytest.mark.parametrize("kind,msg,pkg", [
    ("ip6gretap", "Error: Unknown device type.", "kmod-gre6"),
    ("ip6tnl", "RTNETLINK answers: Operation not supported",
     "kmod-ip6-tunnel"),
])
def test_missing_kernel_module_names_the_package(box, exits, kind, msg, pkg):
    b = exits(kind)
    p = box.run("-s", b.url, "-K", kind, "up", check=False,
                env={"FAKE_IP_FAIL_LINK_ADD": msg})
    assert p.returncode == 1
    assert "the kernel cannot build %s links (%s): install %s (opkg install " \
        "%s)" % (kind, msg, pkg, pkg) in p.stderr
    assert len(b.seen("/release")) == 1
    assert box.state_files() == [] and box.kernel() == {}


@pytest.mark.parametrize("args,env,words", [
    (("-K", "ip6gretap"), {"FAKE_IP_NO_L2TP": "1"},
     ["cannot build ip6gretap links", "ip-full or ip-tiny"]),
    (("-K", "ip6tnl"), {"FAKE_IP_NO_L2TP": "1"},
     ["cannot build ip6tnl links", "ip-full or ip-tiny"]),
    (("-K", "l2tpv3"), {"FAKE_IP_TINY": "1"},
     ["`ip l2tp` is missing", "opkg install ip-full"]),
    (("-S", "exit"), {"FAKE_IP_NO_L2TP": "1"},
     ["opkg install ip-full", "cannot build ip6gretap or ip6tnl"]),
], ids=["busybox-gre", "busybox-ip6tnl", "tiny-l2tp", "busybox-any"])
def test_missing_ip_features_are_said_before_leasing(box, broker, args, env,
                                                    words):
    p = box.run("-s", broker.url, *args, "up", check=False, env=env)
    assert p.returncode == 1
    for w in words:
        assert w in p.stderr, (w, p.stderr)
    assert broker.seen() == []


def test_ip_tiny_builds_the_other_kinds_only(box, broker, exits):
    env = {"FAKE_IP_TINY": "1"}
    # the service's kind must be known first: its offer says l2tpv3
    p = box.run("-s", broker.url, "-S", "exit", "up", check=False, env=env)
    assert p.returncode == 1
    assert "service exit: `ip l2tp` is missing: install ip-full" in p.stderr
    assert [r.path for r in broker.seen()] == ["/offer"]
    gre = exits("ip6gretap")
    box.run("-s", gre.url, "-K", "ip6gretap", "up", env=env)
    assert "link.mb0" in box.kernel()
    box.run("down", env=env)
    assert box.kernel() == {}


HOSTILE_KINDS = {
    "ikey with more words": ("ip6gretap", dict(IKEY="1 up")),
    "ikey zero": ("ip6gretap", dict(IKEY="0")),
    "ikey negative": ("ip6gretap", dict(IKEY="-1")),
    "ikey missing": ("ip6gretap", dict(IKEY="")),
    "okey too big": ("ip6gretap", dict(OKEY="4294967296")),
    "okey substitution": ("ip6gretap", dict(OKEY="$(touch PWNED)")),
    "okey as dotted quad": ("ip6gretap", dict(OKEY="0.0.0.7")),
    "gre over IPv4": ("ip6gretap", dict(REMOTE="192.0.2.1")),
    "gre over udp": ("ip6gretap", dict(ENCAP="udp", UDP_SPORT="1",
                                       UDP_DPORT="2")),
    "gre mac with more words": ("ip6gretap", dict(MAC="02:00:00:00:00:01 up")),
    "ipv6 with length": ("ip6tnl", dict(IPV6="fd00::1/64")),
    "ipv6 with more words": ("ip6tnl", dict(IPV6="fd00::1 dev lo")),
    "ipv6 that is IPv4": ("ip6tnl", dict(IPV6="192.0.2.1")),
    "ipv6 substitution": ("ip6tnl", dict(IPV6="fd00::$(touch PWNED)")),
    "ipv6 backticks": ("ip6tnl", dict(IPV6="`touch PWNED`:")),
    "prefix too long": ("ip6tnl", dict(PREFIX="fd00::/129")),
    "prefix length zero": ("ip6tnl", dict(PREFIX="::/0")),
    "prefix with more words": ("ip6tnl", dict(PREFIX="fd00::/64 dev lo")),
    "prefix that is IPv4": ("ip6tnl", dict(PREFIX="192.0.2.0/24")),
    "prefix with two lengths": ("ip6tnl", dict(PREFIX="fd00::/64/64")),
    "ipv4 with more words": ("ip6tnl", dict(IPV4="198.51.100.16 dev lo")),
    "ipv4 that is IPv6": ("ip6tnl", dict(IPV4="fd00::1")),
    "ip6tnl over IPv4": ("ip6tnl", dict(LOCAL="192.0.2.2")),
    "remote as option": ("ip6tnl", dict(REMOTE="-6")),
    "mtu with more words": ("ip6tnl", dict(MTU="1280 up")),
    "kind with more words": ("ip6tnl", dict(KIND="ip6tnl mode any")),
    "kind injection": ("ip6tnl", dict(KIND="ip6tnl;touch PWNED")),
    "kind in capitals": ("ip6tnl", dict(KIND="IP6TNL")),
    "unknown kind": ("ip6tnl", dict(KIND="vxlan")),
    "no kind": ("ip6gretap", dict(KIND="")),
}


@pytest.mark.parametrize("kind,over", HOSTILE_KINDS.values(),
                         ids=list(HOSTILE_KINDS))
def test_hostile_answers_of_other_kinds_never_reach_ip(box, exits, kind,
                                                       over):
    b = exits(kind, **over)
    p = box.run("-s", b.url, "-K", kind, "up", check=False)
    assert p.returncode == 1
    assert "unusable lease" in p.stderr
    assert ip_changes(box) == []
    assert not os.path.exists(os.path.join(box.tmp, "PWNED"))
    assert box.state_files() == []
    assert [r.fields["lease_id"] for r in b.seen("/release")] == \
        ["0123456789abcdef"]


@pytest.mark.parametrize("kind", ["ip6gretap", "ip6tnl"])
def test_resume_per_kind(box, exits, kind):
    b = exits(kind)
    box.run("-s", b.url, "-K", kind, "up")
    add = box.ip_calls("link", "add")
    assert len(add) == 1
    # the same lease again, the link there: kept
    p = box.run("up")
    assert "resumed lease 0123456789abcdef" in p.stderr
    assert [r.path for r in b.seen()] == ["/lease", "/renew"]
    assert box.ip_calls("link", "add") == add
    assert box.ip_calls("link", "del") == []
    assert box.ip_calls("-d", "link", "show", "dev", "mb0"), \
        "tunnel_up looks at the link's kind and remote"
    # the link is gone (modules reloaded): built again
    os.unlink(os.path.join(box.fake, "link.mb0"))
    box.run("up")
    assert box.ip_calls("link", "add") == add * 2
    # a link of that kind to another remote is not ours: rebuilt
    path = os.path.join(box.fake, "link.mb0")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("remote fc00::1 ", "remote fc00::9 "))
    box.run("up")
    assert box.ip_calls("link", "del") == [("link", "del", "mb0")]
    assert box.ip_calls("link", "add") == add * 3
    assert "remote fc00::1 " in box.kernel()["link.mb0"]


def test_gre_renew_with_other_keys_rebuilds(box, exits):
    gre = exits("ip6gretap")
    box.run("-s", gre.url, "-K", "ip6gretap", "up")
    key = box.read_state()["IKEY"]
    box.run("renew")
    assert box.ip_calls("link", "del") == []
    gre.set("/renew", lambda f: gre_lease_answer({"tunnel_id": key},
                                                 secret=False, OKEY="8"))
    box.run("renew")
    assert box.ip_calls("link", "del") == [("link", "del", "mb0")]
    assert box.ip_calls("link", "add")[-1] == gre_add(key, okey="8")
    st = box.read_state()
    assert st["OKEY"] == "8"
    assert st["SECRET"] == "0123456789abcdef0123456789abcdef"


def test_ip6tnl_renew_with_other_addresses_rebuilds(box, exits):
    tnl = exits("ip6tnl")
    box.run("-s", tnl.url, "-K", "ip6tnl", "up")
    tnl.set("/renew", lambda f: tnl_lease_answer(f, secret=False,
                                                 IPV6="fd00:beef::2"))
    box.run("renew")
    assert box.ip_calls("link", "del") == [("link", "del", "mb0")]
    assert ip_changes(box)[-1] == ("addr", "add", "fd00:beef::2/128",
                                   "dev", "mb0")
    assert box.read_state()["IPV6"] == "fd00:beef::2"


def test_gre_forgotten_lease_proposes_the_same_key(box, exits):
    gre = exits("ip6gretap")
    box.run("-s", gre.url, "-K", "ip6gretap", "up")
    key = box.read_state()["IKEY"]
    gre.set("/renew", error_answer("not_found", 404, "no such lease"))
    p = box.run("up")
    assert "forgot lease" in p.stderr
    second = gre.seen("/lease")[1]
    assert second.fields["tunnel_id"] == key
    assert "session_id" not in second.fields
    assert box.ip_calls("link", "del") == []
    assert len(box.ip_calls("link", "add")) == 1


def test_gre_id_conflict_proposes_another_key(box, exits):
    gre = exits("ip6gretap")
    gre.set("/lease", error_answer("id_conflict", 409, "taken"),
            lambda f: gre_lease_answer(f))
    box.run("-s", gre.url, "-K", "ip6gretap", "up")
    first, second = gre.seen("/lease")
    assert first.fields["tunnel_id"] != second.fields["tunnel_id"]
    assert "session_id" not in first.fields and \
        "session_id" not in second.fields
    assert box.ip_calls("link", "add")[0] == \
        gre_add(second.fields["tunnel_id"])


@pytest.mark.parametrize("kind", ["ip6gretap", "ip6tnl"])
def test_down_without_state_removes_the_link_by_name(box, exits, kind):
    b = exits(kind)
    box.run("-s", b.url, "-K", kind, "up")
    os.unlink(os.path.join(box.state, "mb0.state"))
    box.run("down")
    assert box.ip_calls("link", "del") == [("link", "del", "mb0")]
    assert box.kernel() == {}
    assert b.seen("/release") == []


def test_down_leaves_a_link_that_is_not_a_tunnel(box):
    box.add_link("mb0")
    p = box.run("down", check=False)
    assert box.ip_calls("link", "del") == []
    assert "link.mb0" in box.kernel()
    assert "mb0 is still there" in p.stderr


def test_netifd_gets_the_routed_link(box, exits):
    tnl = exits("ip6tnl", RENEW_INTERVAL="1")
    rc, out, err = run_until(box, lambda: len(tnl.seen("/renew")) >= 1,
                             "-s", tnl.url, "-K", "ip6tnl", "-D", "-N", "wan")
    assert rc == 0, err
    netifd = box.netifd_calls()
    assert netifd == [("proto_init_update", "mb0", "1"),
                      ("proto_add_ipv4_address", "198.51.100.16", "32"),
                      ("proto_add_ipv4_route", "0.0.0.0", "0"),
                      ("proto_add_ipv6_address", "fd00:beef::1", "128"),
                      ("proto_add_ipv6_prefix", "fd00:beef::/64"),
                      ("proto_add_ipv6_route", "::", "0"),
                      ("proto_send_update", "wan")]
    # netifd owns addresses and routes, -D or not
    assert [c for c in ip_changes(box) if "addr" in c or "route" in c] == []
    assert ip_changes(box)[-1] == ("link", "del", "mb0")
    assert box.kernel() == {} and box.state_files() == []


@pytest.mark.parametrize("addrs,calls", [
    (dict(IPV4="198.51.100.16", IPV6="", PREFIX=""),
     [("proto_add_ipv4_address", "198.51.100.16", "32"),
      ("proto_add_ipv4_route", "0.0.0.0", "0")]),
    (dict(IPV4="", IPV6="", PREFIX="fd00:beef::/48"),
     [("proto_add_ipv6_prefix", "fd00:beef::/48"),
      ("proto_add_ipv6_route", "::", "0")]),
    (dict(IPV4="", IPV6="", PREFIX=""), []),
], ids=["ipv4", "prefix", "none"])
def test_netifd_routed_link_gets_only_what_was_leased(box, exits, addrs,
                                                      calls):
    tnl = exits("ip6tnl", **addrs)
    box.run("-s", tnl.url, "-K", "ip6tnl", "-N", "wan", "up")
    netifd = box.netifd_calls()
    assert netifd == [("proto_init_update", "mb0", "1")] + calls + \
        [("proto_send_update", "wan")]


def test_netifd_gre_is_told_like_l2tp(box, exits):
    gre = exits("ip6gretap", **ADDRESSES)
    box.run("-s", gre.url, "-K", "ip6gretap", "-N", "wan", "up")
    netifd = box.netifd_calls()
    assert netifd == [("proto_init_update", "mb0", "1"),
                      ("proto_add_ipv4_address", "198.51.100.16", "32"),
                      ("proto_add_ipv4_route", "192.0.2.1", "32"),
                      ("proto_add_ipv4_route", "0.0.0.0", "0", "192.0.2.1"),
                      ("proto_add_ipv6_prefix", "fd00:beef::/64"),
                      ("proto_send_update", "wan")]


def test_offers_shows_kind_and_layer(box, broker):
    broker.set("/offer", offer_answer(MIXED))
    p = box.run("-s", broker.url, "offers")
    assert "  v6: ip6tnl over IPv6 (layer 3, routed), mtu 1280, lease 600s, " \
        "10 of 10 free" in p.stdout
    assert "  gre: ip6gretap over IPv6 (layer 2), mtu 1280, lease 600s, 10 " \
        "of 10 free" in p.stdout
    assert "  l2: l2tpv3/ip over IPv6, mtu 1280, lease 600s, 10 of 10 free" \
        in p.stdout


def test_run_keeps_a_gre_link_and_stops_cleanly(box, exits):
    gre = exits("ip6gretap", RENEW_INTERVAL="1")
    rc, out, err = run_until(box, lambda: len(gre.seen("/renew")) >= 2,
                             "-s", gre.url, "-K", "ip6gretap")
    assert rc == 0, err
    assert len(box.ip_calls("link", "add")) == 1
    assert box.ip_calls("link", "del") == [("link", "del", "mb0")]
    assert gre.seen()[-1].path == "/release"
    assert box.kernel() == {} and box.state_files() == []
