"""A private Open vSwitch (ovsdb-server + ovs-vswitchd) for tests and benches.

Started as Debian's ovs-ctl does (utilities/ovs-ctl.in, start_ovsdb and
start_forwarding), but with every socket, pidfile and the database under a
scratch directory, so nothing touches /var/run/openvswitch.
"""

import os
import shutil
import signal
import subprocess
import time

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
TOOLS = ("ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ovs-ofctl", "ovs-appctl")


def missing():
    """Why no private OVS can run here, or ''."""
    for t in TOOLS:
        if not shutil.which(t) and not os.path.exists("/usr/sbin/" + t):
            return "%s is not installed (tests/setup installs openvswitch-switch)" % t
    if not os.path.exists(SCHEMA):
        return "no %s" % SCHEMA
    if os.geteuid() != 0:
        return "needs root"
    return ""


def kernel_datapath():
    """Can this kernel run OVS's datapath (module openvswitch)?"""
    if os.path.isdir("/sys/module/openvswitch"):
        return True
    return subprocess.run(["modprobe", "openvswitch"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def _tool(name):
    return shutil.which(name) or "/usr/sbin/" + name


class Ovs:
    """ovsdb-server and ovs-vswitchd with rundir `d`; vswitchd in netns
    `ns` (its datapath and bridge devices live there)."""

    def __init__(self, d, ns=None):
        self.dir = str(d)
        self.ns = ns
        self.socket = os.path.join(self.dir, "db.sock")
        self.env = dict(os.environ, OVS_RUNDIR=self.dir, OVS_DBDIR=self.dir,
                        OVS_LOGDIR=self.dir)

    def _run(self, argv, ns=None):
        if ns:
            argv = ["ip", "netns", "exec", ns] + argv
        p = subprocess.run(argv, env=self.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=120)
        if p.returncode != 0:
            raise AssertionError("%s -> %d: %s%s" % (" ".join(argv), p.returncode,
                                                      p.stdout, p.stderr))
        return p.stdout

    def start(self):
        db = os.path.join(self.dir, "conf.db")
        if not os.path.exists(db):
            self._run([_tool("ovsdb-tool"), "create", db, SCHEMA])
        self._run([_tool("ovsdb-server"), db, "--remote=punix:" + self.socket,
                   "--unixctl=%s/ovsdb-server.ctl" % self.dir,
                   "--pidfile=%s/ovsdb-server.pid" % self.dir,
                   "--log-file=%s/ovsdb-server.log" % self.dir, "--detach"])
        # The Open_vSwitch row, as ovs-ctl's start_ovsdb has it made.
        self._run([_tool("ovs-vsctl"), "--db=unix:" + self.socket, "--no-wait", "init"])
        self.start_vswitchd()
        return self

    def start_vswitchd(self):
        self._run([_tool("ovs-vswitchd"), "unix:" + self.socket,
                   "--unixctl=%s/ovs-vswitchd.ctl" % self.dir,
                   "--pidfile=%s/ovs-vswitchd.pid" % self.dir,
                   "--log-file=%s/ovs-vswitchd.log" % self.dir, "--detach"], self.ns)

    def pid(self, daemon):
        try:
            with open("%s/%s.pid" % (self.dir, daemon)) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def kill(self, daemon, sig=signal.SIGTERM):
        """Stop one daemon and wait until it is gone."""
        pid = self.pid(daemon)
        if pid is None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def stop(self):
        self.kill("ovs-vswitchd")
        self.kill("ovsdb-server")

    def ofctl(self, *args):
        return self._run([_tool("ovs-ofctl")] + list(args))

    def mgmt(self, bridge):
        return "unix:%s/%s.mgmt" % (self.dir, bridge)

    def dump_flows(self, bridge):
        """Flow lines without the counters, sorted."""
        out = []
        for line in self.ofctl("--no-stats", "dump-flows", self.mgmt(bridge)).splitlines():
            line = line.strip()
            if line and not line.startswith(("NXST", "OFPST")):
                out.append(line)
        return sorted(out)

    def appctl(self, *args):
        return self._run([_tool("ovs-appctl"), "-t", "%s/ovs-vswitchd.ctl" % self.dir]
                         + list(args))

    def log(self):
        try:
            with open(os.path.join(self.dir, "ovs-vswitchd.log")) as f:
                return f.read()[-4000:]
        except OSError:
            return ""
