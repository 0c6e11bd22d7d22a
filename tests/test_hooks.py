"""The operator's hook (hooks.py): argv as before, the whole lease in its
environment, counters on down, and the broker running it."""

import os
import stat

from microbroker import nulldataplane, wiring
from microbroker import config as mbconfig
from microbroker import hooks

CONFIG = """
config broker 'main'
	option state_dir '%(state)s'
	option hook '%(hook)s'

config service 'exit'
	option endpoint 'fc00::1'
	option bridge 'br-test'
	option prefix_pool 'fd00:99::/48'
	option prefix_length '64'
	option ipv4_pool '198.51.100.16/28'
	option ipv4_gateway '198.51.100.1'
	option lifetime '600'
"""


class CountingDataplane(nulldataplane.NullDataplane):
    """Builds nothing; the link's counters are whatever the test sets."""

    dry_run = False

    def __init__(self):
        self.links = {}

    def status(self, kind=None):
        return True, ""

    def up(self, lease, service):
        self.links[lease.ifname] = {"rx_packets": 7, "rx_bytes": 700,
                                    "tx_packets": 3, "tx_bytes": 300}

    def down(self, lease):
        self.links.pop(lease.ifname, None)

    def counters(self, lease):
        if lease.ifname not in self.links:
            raise OSError("no such device")
        return self.links[lease.ifname]


def make(tmp_path):
    out = tmp_path / "env"
    hook = tmp_path / "hook"
    # One file per event: the environment as the hook saw it, then argv.
    hook.write_text("#!/bin/sh\nenv | grep '^MB_' | sort > %s/env.$1\n"
                    "echo \"$@\" > %s/argv.$1\n" % (tmp_path, tmp_path))
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    path = tmp_path / "config"
    path.write_text(CONFIG % {"state": tmp_path / "state", "hook": hook})
    cfg = mbconfig.load(str(path))
    assert cfg.problems == []
    dp = CountingDataplane()
    return wiring.make_broker(cfg, dataplane=dp), dp, out


def read_env(tmp_path, event):
    text = (tmp_path / ("env." + event)).read_text()
    return dict(line.split("=", 1) for line in text.splitlines())


def test_up_hook_gets_the_whole_lease(tmp_path):
    b, dp, _ = make(tmp_path)
    v = b.lease("fc00::99", "exit")
    env = read_env(tmp_path, "up")
    lease = b.store.get(v["lease_id"])
    assert env["MB_EVENT"] == "up"
    assert env["MB_LEASE_ID"] == v["lease_id"]
    assert env["MB_IFNAME"] == lease.ifname
    assert env["MB_KIND"] == "l2tpv3" and env["MB_ENCAP"] == "ip"
    assert env["MB_CLIENT"] == "fc00::99" and env["MB_LOCAL"] == "fc00::1"
    assert env["MB_MTU"] == str(v["mtu"]) == str(lease.mtu)
    assert env["MB_MAC"] == v["mac"] and v["mac"].startswith("02:6d:62")
    assert env["MB_PREFIX"] == v["prefix"] == "fd00:99:0:1::/64"
    assert env["MB_IPV4"] == v["ipv4"] and env["MB_IPV4"].startswith(
        "198.51.100.")
    assert env["MB_IPV4_GATEWAY"] == "198.51.100.1"
    assert env["MB_BRIDGE"] == "br-test" and env["MB_LIFETIME"] == "600"
    assert env["MB_TUNNEL_ID"] == str(lease.tunnel_id)
    assert env["MB_PEER_TUNNEL_ID"] == str(lease.peer_tunnel_id)
    assert int(env["MB_EXPIRES"]) == int(lease.expires)
    # no counters on up
    assert "MB_RX_BYTES" not in env
    # argv is what it always was
    assert (tmp_path / "argv.up").read_text().split() == [
        "up", lease.ifname, v["lease_id"], "exit", "fc00::99"]


def test_down_hook_gets_counters(tmp_path):
    b, dp, _ = make(tmp_path)
    v = b.lease("fc00::99", "exit")
    b.release("fc00::99", v["lease_id"], v["secret"])
    env = read_env(tmp_path, "down")
    assert env["MB_EVENT"] == "down" and env["MB_LEASE_ID"] == v["lease_id"]
    assert env["MB_PREFIX"] == "fd00:99:0:1::/64"
    # The link was torn down before the hook ran: the counters are the
    # store's (0 here: nothing refreshed them), never missing.
    for k in ("MB_RX_PACKETS", "MB_RX_BYTES", "MB_TX_PACKETS",
              "MB_TX_BYTES"):
        assert env[k].isdigit()


def test_down_hook_counters_come_from_the_kernel_while_the_link_is_up(
        tmp_path):
    b, dp, _ = make(tmp_path)
    b.lease("fc00::99", "exit")
    lease = b.store.leases()[0]
    b._hook("down", lease)
    env = read_env(tmp_path, "down")
    assert (env["MB_RX_PACKETS"], env["MB_RX_BYTES"], env["MB_TX_PACKETS"],
            env["MB_TX_BYTES"]) == ("7", "700", "3", "300")


def test_environment_values_are_one_printable_line():
    class L:
        lease_id = "ab"
        service = "s"
        ifname = "mb1"
        remote = "x"
        mac = "02:00\n:00'$(reboot)\x00"
        extra = {"prefix": "a\nb"}
    env = hooks.environ("up", L(), base={})
    assert env["MB_MAC"] == "02:00:00'$(reboot)"
    assert env["MB_PREFIX"] == "ab"
    assert all("\n" not in v and "\x00" not in v for v in env.values())
    assert set(env) >= {"MB_EVENT", "MB_KIND", "MB_MTU", "MB_IPV4"}


def test_hook_environment_has_no_broker_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("MB_SECRET_LEAK", "x")
    monkeypatch.setenv("MICROBROKER_CONFIG", "/etc/x")
    b, dp, _ = make(tmp_path)
    b.lease("fc00::99", "exit")
    env = read_env(tmp_path, "up")
    assert "MB_SECRET_LEAK" not in env
    assert not any("secret" in k.lower() for k in env)
    lease = b.store.leases()[0]
    assert lease.secret_hash not in " ".join(env.values())
    assert os.path.exists(tmp_path / "argv.up")
