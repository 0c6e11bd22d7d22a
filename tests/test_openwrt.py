"""OpenWrt integration on the host: the netifd proto handler against a
stand-in of netifd's shell API, the procd init scripts against stand-ins of
/etc/rc.common, /lib/functions.sh and /lib/functions/procd.sh, and the
package Makefile against a stand-in of the OpenWrt build system
(tests/standins/sdk) that runs its Build and install steps for real."""

import os
import signal
import subprocess
import sys

import pytest

from standins.clientutil import (BUSYBOX, CLIENT, ROOT, STANDINS,
                                 CannedBroker, Sandbox, standard_answers)

HANDLER = os.path.join(ROOT, "client", "netifd", "microbroker.sh")
INIT_EXIT = os.path.join(ROOT, "init.d", "microbroker")
INIT_CLIENT = os.path.join(ROOT, "init.d", "microbroker-client")
PROG = os.path.join(ROOT, "openwrt", "files", "microbroker")
MAKEFILE = os.path.join(ROOT, "openwrt", "Makefile")
SDK = os.path.join(STANDINS, "sdk")


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [tuple(l.rstrip("\n").split("\t")) for l in f]


# ---------------------------------------------------------------- netifd

def handler(tmp_path, body, config=None, env=None):
    """Source the handler the way netifd's INCLUDE_ONLY users do, with the
    netifd stand-in, then run `body` (shell); returns (process, calls)."""
    log = str(tmp_path / "netifd.log")
    e = {"PATH": os.path.join(STANDINS, "bin") + ":/usr/bin:/bin",
         "STANDIN_LOG": log, "FAKE_DIR": str(tmp_path),
         "MICROBROKER_CLIENT": CLIENT,
         "MICROBROKER_LIB": os.path.join(ROOT, "client")}
    for k, v in (config or {}).items():
        e["CONFIG_" + k] = v
    e.update(env or {})
    script = ('INCLUDE_ONLY=1\n. "%s/netifd-proto.sh"\n. "%s"\n%s\n'
              % (STANDINS, HANDLER, body))
    p = subprocess.run([BUSYBOX, "sh", "-c", script], env=e,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=60)
    return p, [c for c in read_log(log) if c[0] != "ip"]


def test_handler_declares_its_options(tmp_path):
    p, calls = handler(tmp_path, 'proto_microbroker_init_config\n'
                       'echo "$no_device $available $renew_handler"')
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["1", "1", "1"]
    assert calls == [("proto_config_add_array", "server"),
                     ("proto_config_add_string", "service"),
                     ("proto_config_add_string", "kind"),
                     ("proto_config_add_string", "network"),
                     ("proto_config_add_string", "bridge"),
                     ("proto_config_add_string", "token"),
                     ("proto_config_add_string", "filter"),
                     ("proto_config_add_int", "timeout")]


def test_handler_structure_is_netifds():
    with open(HANDLER) as f:
        text = f.read()
    assert text.startswith("#!/bin/sh\n")
    head = '[ -n "$INCLUDE_ONLY" ] || {\n\t. /lib/functions.sh\n' \
           '\t. ../netifd-proto.sh\n\tinit_proto "$@"\n}\n'
    assert head in text
    assert text.rstrip().endswith('[ -n "$INCLUDE_ONLY" ] || {\n'
                                  '\tadd_protocol microbroker\n}')


def test_handler_setup_runs_the_client(tmp_path):
    p, calls = handler(tmp_path, "proto_microbroker_setup exitvpn ''",
                       config={"server": "http://[fc00::1]:8053 "
                                         "http://[fc00::2]/cgi-bin/microbroker",
                               "service": "exit", "network": "lan",
                               "token": "s3cr3t-token", "filter": "nft",
                               "timeout": "5"})
    assert p.returncode == 0, p.stderr
    calls0 = calls
    calls = [c for c in calls if c[0] != "proto_export"]
    assert calls == [("proto_run_command", "exitvpn", CLIENT, "-i",
                      "mb-exitvpn", "-N", "exitvpn",
                      "-s", "http://[fc00::1]:8053",
                      "-s", "http://[fc00::2]/cgi-bin/microbroker",
                      "-S", "exit", "-b", "@lan",
                      "-f", "nft", "-T", "5", "run")]
    # the token reaches the client through its environment, not argv
    assert ("proto_export", "MICROBROKER_TOKEN=s3cr3t-token") in calls0


def test_handler_minimal_config_and_long_names(tmp_path):
    p, calls = handler(tmp_path,
                       "proto_microbroker_setup averyverylongname ''",
                       config={"server": "http://[fc00::1]:8053",
                               "bridge": "br-lan"})
    assert p.returncode == 0, p.stderr
    (run,) = calls
    assert run[:5] == ("proto_run_command", "averyverylongname", CLIENT,
                       "-i", "mb-averyverylon")
    assert len(run[4]) == 15
    assert run[5:] == ("-N", "averyverylongname", "-s",
                       "http://[fc00::1]:8053", "-b", "br-lan", "run")


@pytest.mark.parametrize("config,env,code", [
    ({}, {}, "MISSING_SERVER"),
    ({"server": "http://[fc00::1]:8053"}, {"FAKE_IP_NO_L2TP": "1"},
     "NO_IP_L2TP"),
    ({"server": "http://[fc00::1]:8053"},
     {"MICROBROKER_CLIENT": "/nonexistent/microbroker-client"}, "NO_CLIENT"),
    ({"server": "http://[fc00::1]:8053", "network": "lan",
      "bridge": "br-lan"}, {}, "BRIDGE_AND_NETWORK"),
])
def test_handler_setup_errors_block_restarts(tmp_path, config, env, code):
    p, calls = handler(tmp_path, "proto_microbroker_setup exitvpn ''",
                       config=config, env=env)
    assert p.returncode == 1
    assert calls == [("proto_notify_error", "exitvpn", code),
                     ("proto_block_restart", "exitvpn")]
    assert "microbroker: exitvpn:" in p.stderr


@pytest.mark.parametrize("config,env,code", [
    ({"kind": "gre"}, {}, "INVALID_KIND"),
    ({"kind": "ip6tnl;reboot"}, {}, "INVALID_KIND"),
    # BusyBox's ip: neither `ip l2tp` nor the ip6gretap/ip6tnl link types
    ({"kind": "ip6gretap"}, {"FAKE_IP_NO_L2TP": "1"}, "NO_IP_TUNNEL"),
    ({"kind": "ip6tnl"}, {"FAKE_IP_NO_L2TP": "1"}, "NO_IP_TUNNEL"),
    # ip-tiny: the link types, but no `ip l2tp`
    ({"kind": "l2tpv3"}, {"FAKE_IP_TINY": "1"}, "NO_IP_L2TP"),
    ({"kind": "ip6tnl", "network": "lan"}, {}, "ROUTED_KIND"),
    ({"kind": "ip6tnl", "bridge": "br-lan"}, {}, "ROUTED_KIND"),
])
def test_handler_kind_errors_block_restarts(tmp_path, config, env, code):
    config = dict(config, server="http://[fc00::1]:8053")
    p, calls = handler(tmp_path, "proto_microbroker_setup exitvpn ''",
                       config=config, env=env)
    assert p.returncode == 1
    assert calls == [("proto_notify_error", "exitvpn", code),
                     ("proto_block_restart", "exitvpn")]
    assert "microbroker: exitvpn:" in p.stderr


@pytest.mark.parametrize("kind,env", [
    ("ip6gretap", {}), ("ip6tnl", {}), ("ip6gretap", {"FAKE_IP_TINY": "1"}),
    ("ip6tnl", {"FAKE_IP_TINY": "1"}), ("", {"FAKE_IP_TINY": "1"}),
    ("l2tpv3", {}),
])
def test_handler_passes_the_kind(tmp_path, kind, env):
    config = {"server": "http://[fc00::1]:8053", "service": "x"}
    if kind:
        config["kind"] = kind
    p, calls = handler(tmp_path, "proto_microbroker_setup exitvpn ''",
                       config=config, env=env)
    assert p.returncode == 0, p.stderr
    (run,) = calls
    assert run[5:] == ("-N", "exitvpn", "-s", "http://[fc00::1]:8053",
                       "-S", "x") + (("-K", kind) if kind else ()) + ("run",)


def test_the_command_netifd_runs_works_for_ip6tnl(tmp_path):
    """A routed lease under netifd: the client builds the link and hands
    netifd its addresses, prefix and default routes (no gateway)."""
    from standins.clientutil import TNL_ADDRESSES
    p, calls = handler(tmp_path, "proto_microbroker_setup wan6 ''",
                       config={"server": "SERVER", "kind": "ip6tnl"})
    (run,) = calls
    broker = CannedBroker()
    standard_answers(broker, kind="ip6tnl")
    try:
        box = Sandbox(tmp_path / "client")
        argv = [broker.url if a == "SERVER" else a for a in run[3:]]
        assert argv[-3:] == ["-K", "ip6tnl", "run"]
        box.run(*argv[:-1], "up")
        (req,) = broker.seen("/lease")
        assert req.fields == {"format": "sh", "kind": "ip6tnl"}
        netifd = box.netifd_calls()
        assert netifd == [
            ("proto_init_update", "mb-wan6", "1"),
            ("proto_add_ipv4_address", TNL_ADDRESSES["IPV4"], "32"),
            ("proto_add_ipv4_route", "0.0.0.0", "0"),
            ("proto_add_ipv6_address", TNL_ADDRESSES["IPV6"], "128"),
            ("proto_add_ipv6_prefix", TNL_ADDRESSES["PREFIX"]),
            ("proto_add_ipv6_route", "::", "0"),
            ("proto_send_update", "wan6")]
        assert ("ip", "link", "add", "mb-wan6", "type", "ip6tnl", "mode",
                "any", "local", "fc00::2", "remote", "fc00::1", "encaplimit",
                "none") in box.calls("ip")
        assert not [c for c in box.calls("ip") if "addr" in c or
                    "route" in c], "netifd sets addresses and routes"
        box.run("-i", "mb-wan6", "down")
        assert box.kernel() == {}
    finally:
        broker.close()


def test_handler_teardown_stops_the_client(tmp_path):
    p, calls = handler(tmp_path, "proto_microbroker_teardown exitvpn ''")
    assert p.returncode == 0
    assert calls == [("proto_kill_command", "exitvpn")]


def test_handler_renew_signals_the_client(tmp_path):
    p, calls = handler(tmp_path, "proto_microbroker_renew exitvpn ''")
    assert p.returncode == 0, p.stderr
    assert calls == [("proto_kill_command", "exitvpn",
                      str(int(signal.SIGUSR1)))]


def test_the_command_netifd_runs_works(tmp_path):
    """Run what the handler hands to proto_run_command (with `up` for
    `run`): the client leases, joins lan's bridge through ubus, and tells
    netifd about the device."""
    p, calls = handler(tmp_path, "proto_microbroker_setup exitvpn ''",
                       config={"server": "SERVER", "service": "exit",
                               "network": "lan"})
    (run,) = calls
    argv = list(run[2:])
    broker = CannedBroker()
    standard_answers(broker)
    try:
        box = Sandbox(tmp_path / "client")
        argv = [broker.url if a == "SERVER" else a for a in argv[1:]]
        assert argv[-1] == "run"
        box.run(*argv[:-1], "up")
        log = box.calls()
        assert ("ubus", "call", "network.interface.lan", "add_device",
                '{ "name": "mb-exitvpn" }') in log
        assert ("proto_init_update", "mb-exitvpn", "1") in log
        assert ("proto_send_update", "exitvpn") in log
        assert "link.mb-exitvpn" in box.kernel()
        box.run("-i", "mb-exitvpn", "down")
        assert box.kernel() == {}
    finally:
        broker.close()


# ---------------------------------------------------------------- procd

def run_init(tmp_path, script, action, uci, env=None):
    """The init script through the rc.common stand-in; returns (process,
    [procd and config calls])."""
    log = tmp_path / "procd.log"
    if log.exists():
        log.unlink()
    ucidir = tmp_path / "uci"
    ucidir.mkdir(exist_ok=True)
    for name, text in uci.items():
        (ucidir / name).write_text(text)
    e = {"PATH": "/usr/bin:/bin", "STANDINS": STANDINS,
         "STANDIN_LOG": str(log), "UCI_CONFIG_DIR": str(ucidir)}
    e.update(env or {})
    p = subprocess.run([BUSYBOX, "sh", os.path.join(STANDINS, "rc.common"),
                        script, action], env=e, cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=120)
    return p, read_log(str(log))


@pytest.mark.parametrize("path", [INIT_EXIT, INIT_CLIENT],
                         ids=os.path.basename)
def test_init_scripts_are_procd_scripts(path):
    p = subprocess.run([BUSYBOX, "sh", "-n", path], stderr=subprocess.PIPE,
                       text=True)
    assert p.returncode == 0, p.stderr
    with open(path) as f:
        text = f.read()
    assert text.startswith("#!/bin/sh /etc/rc.common\n")
    for line in ("USE_PROCD=1", "START=", "start_service() {",
                 "service_triggers() {"):
        assert "\n" + line in text
    assert os.access(path, os.X_OK)


def exit_init_copy(tmp_path):
    """init.d/microbroker with this machine's python for /usr/bin/python3
    and, for /usr/bin/microbroker, openwrt/files/microbroker finding this
    checkout's package instead of site-packages."""
    with open(INIT_EXIT) as f:
        text = f.read()
    with open(PROG) as f:
        prog = f.read()
    assert prog.count("sys.path.append(") == 1
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "microbroker").write_text(
        prog.replace("sys.path.append(", "sys.path.insert(0, %r); (" % ROOT))
    for old, new in (("PYTHON=/usr/bin/python3", "PYTHON=%s" % sys.executable),
                     ("PROG=/usr/bin/microbroker",
                      "PROG=%s" % (tmp_path / "bin" / "microbroker"))):
        assert text.count("\n%s\n" % old) == 1
        text = text.replace("\n%s\n" % old, "\n%s\n" % new)
    path = tmp_path / "microbroker"
    path.write_text(text)
    return str(path)


def test_exit_init_starts_the_server_from_the_default_config(tmp_path):
    with open(os.path.join(ROOT, "openwrt", "microbroker.config")) as f:
        uci = f.read()
    script = exit_init_copy(tmp_path)
    p, calls = run_init(tmp_path, script, "start", {"microbroker": uci},
                        env={"MICROBROKER_CONFIG": str(tmp_path / "uci" /
                                                       "microbroker")})
    assert p.returncode == 0, p.stderr
    assert calls == [
        ("procd_open_service", "microbroker", script),
        ("config_load", "microbroker"),
        ("procd_open_instance", "broker"),
        ("procd_set_param", "command", sys.executable, "-u", "-I", "-S",
         str(tmp_path / "bin" / "microbroker"), "serve"),
        ("procd_set_param", "file", "/etc/config/microbroker"),
        ("procd_set_param", "netdev", "br-exit"),
        ("procd_set_param", "respawn"),
        ("procd_set_param", "reload_signal", "HUP"),
        ("procd_set_param", "term_timeout", "15"),
        # log 'syslog' in the default config: only stderr goes to procd
        ("procd_set_param", "stderr", "1"),
        ("procd_close_instance",),
        ("procd_open_trigger",),
        ("procd_add_reload_trigger", "microbroker"),
        ("procd_close_trigger",),
        ("procd_close_service",),
    ]


def test_exit_init_reads_services_and_log_target(tmp_path):
    uci = ("config broker\n\toption log 'stderr'\n"
           "config service 'a'\n"
           "config service 'b'\n\toption bridge 'br-lan'\n"
           "config service 'c'\n\toption enabled '0'\n")
    script = exit_init_copy(tmp_path)
    p, calls = run_init(tmp_path, script, "start", {"microbroker": uci},
                        env={"MICROBROKER_CONFIG": str(tmp_path / "uci" /
                                                       "microbroker")})
    assert p.returncode == 0, p.stderr
    assert ("procd_set_param", "netdev", "br-a", "br-lan") in calls
    assert ("procd_set_param", "stdout", "1") in calls


def test_exit_init_does_not_start_a_broken_config(tmp_path):
    uci = "config broker\n\toption max_leases 'lots'\nconfig service 'x'\n"
    script = exit_init_copy(tmp_path)
    p, calls = run_init(tmp_path, script, "start", {"microbroker": uci},
                        env={"MICROBROKER_CONFIG": str(tmp_path / "uci" /
                                                       "microbroker")})
    assert p.returncode != 0
    assert "max_leases" in p.stderr and "check-config" in p.stderr
    assert not [c for c in calls if c[0] == "procd_open_instance"]


def test_exit_init_stop_and_reload(tmp_path):
    uci = "config service 'x'\n"
    script = exit_init_copy(tmp_path)
    env = {"MICROBROKER_CONFIG": str(tmp_path / "uci" / "microbroker")}
    p, calls = run_init(tmp_path, script, "stop", {"microbroker": uci}, env)
    assert p.returncode == 0 and calls == [("procd_kill", "microbroker", "")]
    p, calls = run_init(tmp_path, script, "reload", {"microbroker": uci}, env)
    assert p.returncode == 0
    assert ("procd_open_instance", "broker") in calls
    # procd sends a changed instance SIGHUP (the broker reloads in place)
    assert ("procd_set_param", "reload_signal", "HUP") in calls


def test_exit_init_reload_keeps_a_broken_config_from_the_broker(tmp_path):
    uci = "config broker\n\toption max_leases 'lots'\nconfig service 'x'\n"
    script = exit_init_copy(tmp_path)
    env = {"MICROBROKER_CONFIG": str(tmp_path / "uci" / "microbroker")}
    p, calls = run_init(tmp_path, script, "reload", {"microbroker": uci}, env)
    assert p.returncode != 0 and "not reloaded" in p.stderr
    assert not [c for c in calls if c[0] == "procd_open_instance"]


def test_exit_init_term_timeout_covers_the_servers_shutdown(tmp_path):
    # service.Server.stop waits up to timeout + 2 s for answers in flight
    uci = "config broker\n\toption timeout '30'\nconfig service 'x'\n"
    script = exit_init_copy(tmp_path)
    env = {"MICROBROKER_CONFIG": str(tmp_path / "uci" / "microbroker")}
    p, calls = run_init(tmp_path, script, "start", {"microbroker": uci}, env)
    assert p.returncode == 0, p.stderr
    t = [int(c[2]) for c in calls if c[:2] == ("procd_set_param",
                                                "term_timeout")]
    assert t == [35] and t[0] > 30 + 2


CLIENT_UCI = """
config client 'a'
	list server 'http://[fc00::1]:8053'
	list server 'http://[fc00::2]:8053'
	option service 'exit'
	option ifname 'mb0'
	option bridge 'br-lan'
	option token 'tok-12345678'
	option filter 'nft'
	option timeout '5'
	option hook '/etc/mb.hook'

config client 'off'
	option enabled '0'
	list server 'http://[fc00::3]:8053'

config client 'noserver'

config client 'plain'
	option server 'http://[fc00::4]:8053'
	option kind 'ip6tnl'
	option defaultroute '1'
"""


def test_client_init_one_instance_per_enabled_section(tmp_path):
    p, calls = run_init(tmp_path, INIT_CLIENT, "start",
                        {"microbroker-client": CLIENT_UCI})
    assert p.returncode == 0, p.stderr
    assert "noserver: no server" in p.stderr
    prog = "/usr/sbin/microbroker-client"
    assert calls == [
        ("procd_open_service", "microbroker-client", INIT_CLIENT),
        ("config_load", "microbroker-client"),
        ("procd_open_instance", "a"),
        ("procd_set_param", "command", prog, "-i", "mb0"),
        ("procd_append_param", "command", "-s", "http://[fc00::1]:8053"),
        ("procd_append_param", "command", "-s", "http://[fc00::2]:8053"),
        ("procd_append_param", "command", "-S", "exit"),
        ("procd_append_param", "command", "-b", "br-lan"),
        ("procd_set_param", "env", "MICROBROKER_TOKEN=tok-12345678"),
        ("procd_append_param", "command", "-f", "nft"),
        ("procd_append_param", "command", "-T", "5"),
        ("procd_append_param", "command", "-H", "/etc/mb.hook"),
        ("procd_append_param", "command", "run"),
        ("procd_set_param", "respawn"),
        ("procd_set_param", "stdout", "1"),
        ("procd_set_param", "stderr", "1"),
        ("procd_set_param", "term_timeout", "10"),
        ("procd_close_instance",),
        ("procd_open_instance", "plain"),
        ("procd_set_param", "command", prog, "-i", "mb-plain"),
        ("procd_append_param", "command", "-s", "http://[fc00::4]:8053"),
        ("procd_append_param", "command", "-K", "ip6tnl"),
        ("procd_append_param", "command", "-D"),
        ("procd_append_param", "command", "run"),
        ("procd_set_param", "respawn"),
        ("procd_set_param", "stdout", "1"),
        ("procd_set_param", "stderr", "1"),
        ("procd_set_param", "term_timeout", "10"),
        ("procd_close_instance",),
        ("procd_open_trigger",),
        ("procd_add_reload_trigger", "microbroker-client"),
        ("procd_close_trigger",),
        ("procd_close_service",),
    ]


def test_client_init_default_config_starts_nothing(tmp_path):
    with open(os.path.join(ROOT, "openwrt", "microbroker-client.config")) as f:
        uci = f.read()
    p, calls = run_init(tmp_path, INIT_CLIENT, "start",
                        {"microbroker-client": uci})
    assert p.returncode == 0, p.stderr
    assert not [c for c in calls if c[0] == "procd_open_instance"]
    # enabled, the shipped example is a working instance
    uci = uci.replace("option enabled '0'", "option enabled '1'")
    p, calls = run_init(tmp_path, INIT_CLIENT, "start",
                        {"microbroker-client": uci})
    assert ("procd_set_param", "command", "/usr/sbin/microbroker-client",
            "-i", "mb0") in calls


def test_client_init_command_is_one_the_client_takes(tmp_path):
    p, calls = run_init(tmp_path, INIT_CLIENT, "start",
                        {"microbroker-client": CLIENT_UCI})
    argv = []
    for c in calls:
        if c[:2] in (("procd_set_param", "command"),
                     ("procd_append_param", "command")):
            argv += c[2:]
        if c[0] == "procd_close_instance":
            break
    broker = CannedBroker()
    standard_answers(broker)
    try:
        box = Sandbox(tmp_path / "client")
        box.add_link("br-lan")
        argv = [broker.url if a.startswith("http://[fc00::") else a
                for a in argv[1:]]
        assert argv[-1] == "run"
        env = {}
        for c in calls:
            if c[:2] == ("procd_set_param", "env"):
                k, _, v = c[2].partition("=")
                env[k] = v
        box.run(*argv[:-1], "up", env=env)
        assert box.read_state()["FILTER"] == "nft"
        assert broker.seen("/lease")[0].fields["token"] == "tok-12345678"
        box.run("down")
    finally:
        broker.close()


# ---------------------------------------------------------------- package

def make(tmp_path, *targets):
    ver = "%d.%d" % sys.version_info[:2]
    p = subprocess.run(
        ["make", "-s", "-C", os.path.join(ROOT, "openwrt"), "TOPDIR=" + SDK,
         "BUILD_DIR=%s" % (tmp_path / "build"),
         "IPKG_ROOT=%s" % (tmp_path / "ipkg"), "PYTHON3_VERSION=" + ver,
         "HOST_PYTHON3_BIN=" + sys.executable] + list(targets),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout


def info(tmp_path, pkg):
    return dict(l.split("=", 1) for l in make(tmp_path, "info-" + pkg)
                .splitlines())


def tree(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out["/" + os.path.relpath(p, root)] = os.stat(p).st_mode & 0o777
    return out


def test_package_metadata(tmp_path):
    exit_ = info(tmp_path, "microbroker")
    deps = exit_["DEPENDS"].split()
    assert "+python3-light" in deps and "+python3-dbm" in deps
    assert {"+kmod-l2tp", "+kmod-l2tp-eth", "+kmod-l2tp-ip"} <= set(deps)
    assert exit_["CONFFILES"] == "/etc/config/microbroker"
    client = info(tmp_path, "microbroker-client")
    deps = client["DEPENDS"].split()
    assert "+ip-full" in deps, "`ip l2tp` is only in ip-full"
    assert not [d for d in deps if "python" in d]
    assert client["PKGARCH"] == "all"
    assert client["CONFFILES"] == "/etc/config/microbroker-client"
    with open(MAKEFILE) as f:
        text = f.read()
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert "PKG_LICENSE:=%s\n" % project["license"]["text"] in text
    assert "PKG_LICENSE_FILES:=LICENSE\n" in text


def test_package_installs(tmp_path):
    make(tmp_path, "install-microbroker", "install-microbroker-src",
         "install-microbroker-client", "postinst-microbroker-client")
    ipkg = tmp_path / "ipkg"
    ver = "%d.%d" % sys.version_info[:2]
    site = "/usr/lib/python%s/site-packages/microbroker" % ver
    exit_ = tree(ipkg / "microbroker")
    # Every module, the subpackages' too (microbroker/leases).
    pkg = os.path.join(ROOT, "microbroker")
    modules = sorted(os.path.relpath(os.path.join(d, f), pkg)[:-3]
                     for d, _dirs, files in os.walk(pkg) if "__pycache__" not in d
                     for f in files if f.endswith(".py"))
    assert "leases/store" in modules
    assert {"%s/%s.pyc" % (site, m) for m in modules} <= set(exit_)
    assert not [f for f in exit_ if f.endswith(".py")]
    assert exit_["/usr/bin/microbroker"] == 0o755
    with open(str(ipkg / "microbroker") + "/usr/bin/microbroker") as a, open(PROG) as b:
        assert a.read() == b.read()
    assert exit_["/www/cgi-bin/microbroker"] == 0o755
    assert exit_["/etc/init.d/microbroker"] == 0o755
    assert exit_["/etc/config/microbroker"] == 0o600
    src = tree(ipkg / "microbroker-src")
    assert {"%s/%s.py" % (site, m) for m in modules} == set(src)
    client = tree(ipkg / "microbroker-client")
    assert client == {
        "/usr/sbin/microbroker-client": 0o755,
        "/usr/lib/microbroker-client/kernel.sh": 0o644,
        "/lib/netifd/proto/microbroker.sh": 0o755,
        "/etc/init.d/microbroker-client": 0o755,
        "/etc/config/microbroker-client": 0o600,
    }
    for path, repo in [("/usr/sbin/microbroker-client", CLIENT),
                       ("/usr/lib/microbroker-client/kernel.sh",
                        os.path.join(ROOT, "client", "kernel.sh")),
                       ("/lib/netifd/proto/microbroker.sh", HANDLER),
                       ("/etc/init.d/microbroker-client", INIT_CLIENT)]:
        with open(str(ipkg / "microbroker-client") + path) as a, \
                open(repo) as b:
            assert a.read() == b.read()
    # the byte-compiled module runs without its sources
    env = dict(os.environ, PYTHONPATH=str(ipkg / "microbroker") +
               os.path.dirname(site))
    p = subprocess.run([sys.executable, str(ipkg / "microbroker" / "usr" /
                                            "bin" / "microbroker"),
                        "version"], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    import microbroker
    assert p.stdout.strip() == "microbroker %s" % microbroker.__version__
    # ...and so do the CGI's lease store and the server, from the package
    # alone (-I: not from this checkout).
    p = subprocess.run([sys.executable, "-I", "-c",
                        "import sys; sys.path.insert(0, %r); "
                        "import microbroker.leases.store, microbroker.cgi, "
                        "microbroker.service, microbroker.server; print(microbroker.leases.store.__file__)"
                        % (str(ipkg / "microbroker") + os.path.dirname(site))],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(str(ipkg / "microbroker")), p.stdout
    post = (ipkg / "microbroker-client.postinst").read_text()
    p = subprocess.run([BUSYBOX, "sh", "-c", post], stdout=subprocess.PIPE,
                       text=True, env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 0 and "/etc/init.d/network restart" in p.stdout
    p = subprocess.run([BUSYBOX, "sh", "-c", post], stdout=subprocess.PIPE,
                       text=True, env={"IPKG_INSTROOT": "/build/root"})
    assert p.returncode == 0 and p.stdout == ""


def test_package_version_is_the_modules(tmp_path):
    import microbroker
    out = subprocess.run(
        ["make", "-s", "-C", os.path.join(ROOT, "openwrt"), "TOPDIR=" + SDK,
         "BUILD_DIR=%s" % (tmp_path / "build"), "-f", "Makefile", "-f", "-",
         "print-version"], input="print-version:\n\t@echo $(PKG_VERSION)\n",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert out.stdout.strip() == microbroker.__version__, out.stderr


def test_shipped_uci_files_are_plain_uci():
    """The client's UCI file parses with microbroker's own UCI reader and
    has only the options the init script reads."""
    from microbroker.config import parse_uci
    with open(os.path.join(ROOT, "openwrt", "microbroker-client.config")) as f:
        sections, problems = parse_uci(f.read())
    assert problems == []
    (sec,) = sections
    assert sec.type == "client"
    with open(INIT_CLIENT) as f:
        init = f.read()
    for opt in sec.options:
        assert ('"$cfg" %s' % opt) in init, opt
