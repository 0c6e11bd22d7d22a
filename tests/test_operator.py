"""What an operator uses: per-command help, `microbroker leases`, client
addresses kept out of logs."""

import json
import os
import subprocess
import sys

import pytest

from microbroker import __main__ as cli
from microbroker import broker as mb, wiring
from microbroker import config as mbconfig
from microbroker import listing, logmask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, env=None):
    e = dict(os.environ, PYTHONPATH=ROOT)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "microbroker"] + list(args),
                          capture_output=True, text=True, env=e, cwd=ROOT)


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_each_command_has_its_own_help(command):
    for argv in ([command, "-h"], ["-h", command], [command, "--help"]):
        p = run(*argv)
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith("usage: microbroker " + command), p.stdout
        assert p.stdout != cli.USAGE
    # and it differs from every other command's
    assert len({cli.command_help(c) for c in cli.COMMANDS}) == len(
        cli.COMMANDS)


def test_help_without_a_command_is_the_global_text():
    p = run("-h")
    assert p.returncode == 0 and p.stdout == cli.USAGE
    assert "leases" in p.stdout


CONFIG = """
config broker
	option state_dir '%s'
	option dataplane 'none'
config service 'default'
	option lifetime '600'
config service 'other'
	option kind 'ip6gretap'
"""


@pytest.fixture
def exit_(tmp_path):
    path = tmp_path / "config"
    path.write_text(CONFIG % (tmp_path / "state"))
    cfg = mbconfig.load(str(path))
    assert cfg.problems == []
    b = wiring.make_broker(cfg)
    return path, b


def test_leases_lists_every_lease(exit_):
    path, b = exit_
    a = b.lease("fc00::5", "default", local="fc00::1")
    g = b.lease("fc00::6", "other", local="fc00::1")
    p = run("-c", str(path), "leases", "--json")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["count"] == 2
    by_id = {r["lease_id"]: r for r in got["leases"]}
    r = by_id[a["lease_id"]]
    assert (r["client"], r["service"], r["kind"], r["state"]) == (
        "fc00::5", "default", "l2tpv3", "up")
    assert r["ifname"] == b.store.get(a["lease_id"]).ifname
    assert 0 <= r["age"] < 60 and 540 < r["expires_in"] <= 600
    assert r["counters_from"] == "store"     # dataplane none
    assert set(r["counters"]) == set(listing.COUNTERS)
    assert by_id[g["lease_id"]]["kind"] == "ip6gretap"
    p = run("-c", str(path), "leases")
    assert p.returncode == 0
    lines = p.stdout.splitlines()
    assert lines[0].split() == list(listing.HEAD)
    assert any(a["lease_id"] in l and "fc00::5" in l and "l2tpv3" in l
               for l in lines)
    assert lines[-1].startswith("2 leases")


def test_leases_counters_come_from_the_dataplane(exit_):
    _, b = exit_
    b.lease("fc00::5", "default", local="fc00::1")

    class DP:
        def counters(self, lease):
            return {"rx_packets": 3, "rx_bytes": 3000, "tx_packets": 2,
                    "tx_bytes": 2 << 20}
    rows = listing.rows(b.store, DP(), b.clock())
    assert rows[0]["counters"] == {"rx_packets": 3, "rx_bytes": 3000,
                                   "tx_packets": 2, "tx_bytes": 2 << 20}
    assert rows[0]["counters_from"] == "kernel"
    text = listing.table(rows)
    assert "2.9K (3)" in text and "2.0M (2)" in text and "*" not in text


def test_durations_and_sizes():
    assert [listing.duration(s) for s in (5, 65, 3600 + 120, 90000, -5)] == \
        ["5s", "1m05s", "1h02m", "1d01h", "-5s"]
    assert [listing.size(n) for n in (0, 1023, 1024, 15 << 20)] == \
        ["0", "1023", "1.0K", "15M"]


def test_client_addresses_are_masked_by_default(exit_, capsys):
    path, b = exit_
    log = mb.Log()
    log.configure("stderr", "info")
    log("info", "lease %s granted to %s (%s, prefix %s, %s)",
        "0123456789abcdef", "fc00::5", "default", "fd00:1::/64", "10.0.0.7")
    err = capsys.readouterr().err
    assert "fc00::5" not in err and "fd00:1::/64" not in err \
        and "10.0.0.7" not in err
    assert "0123456789abcdef" in err and "default" in err
    log.configure("stderr", "info", client_addresses=True)
    log("info", "granted to %s", "fc00::5")
    assert "fc00::5" in capsys.readouterr().err


def test_a_served_lease_keeps_the_address_out_of_the_log(exit_):
    path, b = exit_
    env = {"REQUEST_METHOD": "POST", "PATH_INFO": "/lease",
           "REMOTE_ADDR": "fc00::77", "SERVER_ADDR": "fc00::1",
           "CONTENT_TYPE": "application/x-www-form-urlencoded",
           "CONTENT_LENGTH": "15", "MICROBROKER_CONFIG": str(path)}
    p = subprocess.run([sys.executable, "-m", "microbroker", "cgi"],
                       input="service=default", capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=ROOT, **env))
    assert "Status: 200" in p.stdout or '"lease_id"' in p.stdout, p.stdout
    assert "granted" in p.stderr and "fc00::77" not in p.stderr
    path.write_text(path.read_text().replace(
        "config broker\n", "config broker\n\toption log_client_addresses '1'\n"))
    env["REMOTE_ADDR"] = "fc00::78"
    p = subprocess.run([sys.executable, "-m", "microbroker", "cgi"],
                       input="service=default", capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=ROOT, **env))
    assert "fc00::78" in p.stderr


@pytest.mark.parametrize("s, hidden", [
    ("fc00::1", True), ("::1", True), ("10.1.2.3", True),
    ("2001:db8::/64", True), ("198.51.100.0/28", True),
    ("02:6d:62:00:00:01", True), ("0123456789abcdef", False),
    ("mb12", False), ("br-exit", False), ("0.1.0", False), ("default", False),
    ("127.0.0.1:8053", False), ("[::]:8053", False),
    ("", False)])
def test_what_counts_as_an_address(s, hidden):
    assert logmask.looks_like_address(s) is hidden
