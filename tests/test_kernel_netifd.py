"""The netifd proto handler under OpenWrt's real ubusd and netifd (built at
owrt.PREFIX), in the VM: netifd in the client's network namespace manages
an interface with `option proto 'microbroker'`; up gives a lease, the
pseudo-wire and a ping through it, and `ubus call network.interface.NAME
status` says up; down releases the lease inside netifd's teardown window
(5 s, then SIGKILL: proto-ext.c) and leaves nothing in either kernel.

What is not OpenWrt here: /lib/functions.sh (base-files, not built) is
replaced by the one function netifd-proto.sh uses from it (`append`); the
handler's own lines run unchanged (sourced with INCLUDE_ONLY, then
init_proto and add_protocol as its top and bottom do). jshn.sh is put at
/usr/local/share/libubox, where netifd-proto.sh looks, in a mount
namespace of netifd's own; `ubus` runs with -s for the test's socket."""

import json
import os
import re
import subprocess

import pytest

import owrt
from nsutil import ping, run, wait_for
from standins.clientutil import BUSYBOX, CLIENT, ROOT
from test_kernel_client import (CLIENT_ADDR, EXIT_BR, URL, exit_leases,
                                make_world)

pytestmark = [pytest.mark.kernel,
              # the handler runs under BusyBox sh (shebangs below): jshn.sh
              # needs `export -n`, which Debian's dash lacks
              owrt.need("ubusd", "netifd", "ubus", "jshn", "jshn.sh",
                        "netifd-proto.sh")]

HANDLER = os.path.join(ROOT, "client", "netifd", "microbroker.sh")
LIB = os.path.join(owrt.PREFIX, "lib")
IFACE = "exitvpn"
DEV = "mb-exitvpn"

NETWORK = """
config interface 'loopback'
	option device 'lo'
	option proto 'static'
	option ipaddr '127.0.0.1'
	option netmask '255.0.0.0'

config interface '%s'
	option proto 'microbroker'
	option server '%s'
	option service 'exit'
	option timeout '5'
""" % (IFACE, URL)

# the handler as /lib/netifd/proto/microbroker.sh runs it, but for
# /lib/functions.sh
PROTO = """#!%s sh
# OpenWrt's base-files /lib/functions.sh: append
append() {
	local var="$1" value="$2" sep="${3:- }"
	eval "export -- \\"$var=\\${$var:+\\${$var}\\${value:+\\$sep}}\\$value\\""
}
. ../netifd-proto.sh
init_proto "$@"
INCLUDE_ONLY=1
. '%s'
add_protocol microbroker
""" % (BUSYBOX, HANDLER)


def write(path, text, mode=0o644):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


class Netifd:
    """ubusd and netifd in the client's namespace, on a socket of ours."""

    def __init__(self, ns, tmp):
        self.ns = ns
        self.tmp = tmp
        self.sock = os.path.join(tmp, "ubus.sock")
        bindir = os.path.join(tmp, "owrt-bin")
        os.makedirs(bindir)
        for tool in ("ubus", "jshn"):
            extra = " -s '%s'" % self.sock if tool == "ubus" else ""
            write(os.path.join(bindir, tool),
                  "#!/bin/sh\nLD_LIBRARY_PATH='%s' exec '%s'%s \"$@\"\n"
                  % (LIB, owrt.path(tool), extra), 0o755)
        main = os.path.join(tmp, "netifd")
        os.makedirs(os.path.join(main, "proto"))
        for f in ("netifd-proto.sh", "utils.sh"):
            os.symlink(os.path.join(LIB, "netifd", f), os.path.join(main, f))
        write(os.path.join(main, "proto", "microbroker.sh"), PROTO, 0o755)
        # OpenWrt's /bin/sh is BusyBox ash (jshn.sh needs its `export -n`);
        # Debian's is dash
        client = os.path.join(bindir, "microbroker-client")
        write(client, "#!%s sh\nexec %s sh '%s' \"$@\"\n"
              % (BUSYBOX, BUSYBOX, CLIENT), 0o755)
        conf = os.path.join(tmp, "config")
        os.makedirs(conf)
        write(os.path.join(conf, "network"), NETWORK)
        self.log = os.path.join(tmp, "netifd.log")
        self.env = {
            "PATH": bindir + ":/usr/sbin:/usr/bin:/sbin:/bin",
            "LD_LIBRARY_PATH": LIB, "NETIFD_MAIN_DIR": main,
            "MICROBROKER_CLIENT": os.path.join(bindir, "microbroker-client"),
            "MICROBROKER_LIB": os.path.join(ROOT, "client"),
            "TMPDIR": tmp,
        }
        logf = open(self.log, "ab")
        self.ubusd = subprocess.Popen(
            ["ip", "netns", "exec", ns, owrt.path("ubusd"), "-s", self.sock],
            env=self.env, stdout=logf, stderr=logf)
        assert wait_for(lambda: os.path.exists(self.sock), timeout=30)
        # netifd-proto.sh sources /usr/local/share/libubox/jshn.sh when
        # /usr/share has none
        script = ("mount -t tmpfs none /usr/local && "
                  "mkdir -p /usr/local/share/libubox && "
                  "cp '%s' /usr/local/share/libubox/ && "
                  "exec '%s' -c '%s' -p '%s' -s '%s' -r '%s' -h /bin/true -S"
                  % (owrt.path("jshn.sh"), owrt.path("netifd"), conf, main,
                     self.sock, os.path.join(tmp, "resolv.conf")))
        self.netifd = subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "-m", "--propagation",
             "private", "sh", "-c", script],
            env=self.env, stdout=logf, stderr=logf)
        logf.close()

    def ubus(self, *args, check=True):
        p = subprocess.run([os.path.join(self.tmp, "owrt-bin", "ubus")] +
                           list(args), env=self.env, capture_output=True,
                           text=True, timeout=30)
        if check and p.returncode:
            raise AssertionError("ubus %s -> %d: %s%s\n%s" % (
                " ".join(args), p.returncode, p.stdout, p.stderr,
                self.logtext()))
        return p.stdout

    def status(self):
        out = self.ubus("call", "network.interface." + IFACE, "status",
                        check=False)
        try:
            return json.loads(out)
        except ValueError:
            return {}

    def logtext(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def stop(self):
        for p in (self.netifd, self.ubusd):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def client_pids(ns):
    out = run("ip", "netns", "pids", ns)
    pids = []
    for pid in out.split():
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                if b"microbroker-client" in f.read():
                    pids.append(pid)
        except OSError:
            pass
    return pids


def test_netifd_interface_up_and_down(netns, tmp_path):
    world = make_world(netns, tmp_path)
    exit_, client = next(world)
    nd = Netifd(client.ns, str(tmp_path / "nd"))
    try:
        if not wait_for(lambda: nd.status().get("up") is True, timeout=120,
                        step=0.5):
            pytest.fail("interface never up: %r\n%s\n%s" % (
                nd.status(), nd.logtext(), exit_.log()))
        st = nd.status()
        assert st["proto"] == "microbroker" and st["l3_device"] == DEV, st
        assert exit_leases(client) == 1
        lid = re.search(r"lease (\w+) granted", exit_.log()).group(1)
        assert exit_.session_ifname()
        run("ip", "addr", "replace", CLIENT_ADDR + "/24", "dev", DEV,
            ns=client.ns)
        assert ping(client.ns, EXIT_BR), nd.logtext()

        nd.ubus("call", "network.interface." + IFACE, "down")
        assert wait_for(lambda: not client_pids(client.ns), timeout=10)
        # Inside netifd's teardown window, by netifd's own clock: a client
        # it had to SIGKILL (silently, proto-ext.c) would have left its
        # lease or its kernel side behind, which the lines below look for.
        assert wait_for(lambda: "lease %s released" % lid in exit_.log(),
                        timeout=10), exit_.log()
        assert "SIGKILL" not in nd.logtext()
        assert wait_for(lambda: nd.status().get("up") is False, timeout=10)
        assert exit_leases(client) == 0
        assert wait_for(lambda: exit_.tunnels().strip() == "")
        assert run("ip", "l2tp", "show", "tunnel", ns=client.ns).strip() == ""
        assert DEV not in run("ip", "link", ns=client.ns)
        nft = run("nft", "list", "tables", ns=client.ns, check=False)
        assert "mbclient" not in nft.stdout
    finally:
        nd.stop()
        print("== netifd\n" + nd.logtext())
        for _ in world:
            pass
