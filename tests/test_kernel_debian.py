"""docs/debian.md, run (in the VM): the blocks marked `test:` make the
exit, dnsmasq and the broker start as their units would, and a client
router gets a working lease: IPv4 by DHCP and IPv6 by RA through the
pseudo-wire, a host behind the exit's NAT answers, and `microbroker leases
--json` shows the lease with the kernel's counters.

Namespaces: `x` the exit (uplink eth0), `c` the client router, `n` the
internet. Files the doc puts under /etc go to a scratch directory (the
VM's /etc is the host's)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from nsutil import ping, run, wait_for
from standins.clientutil import BUSYBOX, ROOT
from test_kernel_client import Client

pytestmark = pytest.mark.kernel

DOC = os.path.join(ROOT, "docs", "debian.md")
EXAMPLE = os.path.join(ROOT, "debian", "microbroker.config")
EXIT6, CLIENT6 = "fc00::1", "fc00::2"
WAN_EXIT, WAN_HOST = "192.0.2.2", "192.0.2.1"


def doc_steps(text):
    """[(kind, path or None, body)] of the blocks marked
    `<!-- test: file PATH -->` or `<!-- test: run -->`, in doc order."""
    out = []
    for m in re.finditer(r"<!-- test: (file (\S+)|run) -->\n```[a-z]*\n(.*?)"
                         r"```\n", text, re.S):
        out.append(("file" if m.group(2) else "run", m.group(2), m.group(3)))
    return out


UDHCPC_SCRIPT = """#!/bin/sh
# What busybox's examples/udhcp/simple.script does, for one interface.
case "$1" in
bound|renew)
	ip addr replace "$ip/${mask:-24}" dev "$interface"
	for r in $router; do ip route replace default via "$r" dev "$interface"; done
	echo "$ip $router" > "%s"
	;;
esac
"""


@pytest.mark.skipif(not shutil.which("dnsmasq"),
                    reason="no dnsmasq (tests/setup installs dnsmasq-base)")
def test_debian_exit_from_the_doc_gives_a_working_lease(netns, tmp_path):
    tmp = str(tmp_path)
    etc = os.path.join(tmp, "etc")
    x, c, n = netns.add("x"), netns.add("c"), netns.add("n")
    netns.link(x, c, EXIT6 + "/64", CLIENT6 + "/64")
    netns.link(x, n, WAN_EXIT + "/24", WAN_HOST + "/24", name_a="eth0")
    run("ip", "route", "add", "default", "via", WAN_HOST, ns=x)

    with open(DOC) as f:
        steps = doc_steps(f.read())
    for kind, path, body in steps:
        body = body.replace("/etc/", etc + "/")
        if kind == "file":
            dest = etc + path[len("/etc"):]
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "w") as f:
                f.write(body)
        else:
            p = run("sh", "-ec", body, ns=x, check=False, timeout=120)
            assert p.returncode == 0, (body, p.stdout, p.stderr)
    assert "02:6d:62:ff:00:01" in run("ip", "link", "show", "br-exit", ns=x)
    assert "masquerade" in run("nft", "list", "table", "inet", "exit", ns=x)
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        host_forward = f.read()   # the VM's own namespace is not touched
    assert run("sysctl", "-n", "net.ipv4.ip_forward", ns=x).strip() == "1"

    # dnsmasq as Debian's unit starts it (-7 /etc/dnsmasq.d), with its
    # files in the scratch directory
    dns_log = os.path.join(tmp, "dnsmasq.log")
    dnsmasq = subprocess.Popen(
        ["ip", "netns", "exec", x, "dnsmasq", "--keep-in-foreground",
         "--conf-dir=%s/dnsmasq.d" % etc, "--user=root", "--no-resolv",
         "--pid-file=%s/dnsmasq.pid" % tmp,
         "--dhcp-leasefile=%s/dnsmasq.leases" % tmp,
         "--log-facility=%s" % dns_log, "--log-dhcp"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # the broker as the unit starts it: check-config, then serve; the
    # example config unchanged (--state-dir: the VM's /var is the host's)
    state = os.path.join(tmp, "state")
    mb = [sys.executable, "-m", "microbroker"]
    run(*(mb + ["check-config", EXAMPLE]), ns=x)
    blog = open(os.path.join(tmp, "broker.log"), "w")
    broker = subprocess.Popen(
        ["ip", "netns", "exec", x] + mb + ["-c", EXAMPLE, "--state-dir",
                                           state, "serve"],
        cwd=ROOT, stdout=blog, stderr=blog)
    blog.close()

    def broker_log():
        with open(os.path.join(tmp, "broker.log")) as f:
            return f.read()
    try:
        client = Client(c, tmp)
        url = "http://[%s]:8053" % EXIT6
        assert wait_for(lambda: "leases used" in client.run(
            "-s", url, "-T", "2", "offers", check=False).stdout or
            broker.poll() is not None, timeout=60, step=0.5), broker_log()
        p = client.run("-s", url, "up")
        assert "mb0" in run("ip", "link", ns=c), p.stderr

        # IPv4 by DHCP from dnsmasq on the exit's bridge
        got = os.path.join(tmp, "dhcp.got")
        script = os.path.join(tmp, "udhcpc.script")
        with open(script, "w") as f:
            f.write(UDHCPC_SCRIPT % got)
        os.chmod(script, 0o755)
        p = run(BUSYBOX, "udhcpc", "-i", "mb0", "-f", "-q", "-n", "-t", "10",
                "-T", "3", "-s", script, ns=c, check=False, timeout=120)
        assert p.returncode == 0, (p.stdout, p.stderr, open(dns_log).read())
        with open(got) as f:
            ip4, router = f.read().split()[:2]
        assert ip4.startswith("10.99.0.") and router == "10.99.0.1"

        # IPv6 by RA (SLAAC in the doc's /64)
        assert wait_for(lambda: "2001:db8:99:" in run(
            "ip", "-6", "addr", "show", "mb0", ns=c), timeout=90, step=1), \
            open(dns_log).read()

        # through the exit's NAT: the internet has no route to 10.99.0.0/24
        assert "10.99.0" not in run("ip", "route", ns=n)
        assert ping(c, WAN_HOST), broker_log()
        assert ping(c, "2001:db8:99::1")

        # the operator's view: the lease with the kernel's counters
        out = run(*(mb + ["-c", EXAMPLE, "--state-dir", state, "leases",
                          "--json"]), ns=x)
        rows = json.loads(out)["leases"]
        assert len(rows) == 1
        r = rows[0]
        assert (r["client"], r["service"], r["kind"], r["state"]) == (
            CLIENT6, "exit", "l2tpv3", "up")
        assert r["counters_from"] == "kernel"
        assert r["counters"]["rx_packets"] > 0 and \
            r["counters"]["tx_packets"] > 0
        table = run(*(mb + ["-c", EXAMPLE, "--state-dir", state, "leases"]),
                    ns=x)
        assert r["lease_id"] in table and r["ifname"] in table
        # the example keeps client addresses out of the log
        assert "granted to [address]" in broker_log()
        assert CLIENT6 not in broker_log()
        client.run("-s", url, "down", check=False)
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(timeout=60)
        dnsmasq.send_signal(signal.SIGTERM)
        dnsmasq.wait(timeout=30)
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read() == host_forward
