"""ip6gretap and ip6tnl end to end in a real kernel: the broker (`serve`)
in an exit namespace, two clients leasing through microbroker-client under
`busybox sh`; traffic, isolation, a restart that reconciles, and expiry of
killed clients (an L2TPv3 one too) that leaves nothing in the exit's
kernel. `ip -d link` is the oracle."""

import re

import pytest

from nsutil import ping, run, wait_for
from test_kernel_client import EXIT_BR, LIFETIME, Client, Exit

pytestmark = pytest.mark.kernel

EXIT6 = "fc00::1"
URL = "http://[%s]:8053" % EXIT6
BEHIND4, BEHIND6 = "10.97.0.1", "fd00:97::1"

SERVICES = """
config service 'gre'
	option kind 'ip6gretap'
	option bridge 'br-exit'
	option lifetime '{lifetime}'
	option renew_interval '10'

config service 'tnl'
	option kind 'ip6tnl'
	option lifetime '{lifetime}'
	option renew_interval '10'
	option ipv4_pool '10.98.0.0/24'
	option prefix_pool 'fd00:98::/48'
	option prefix_length '64'
""".format(lifetime=LIFETIME)


@pytest.fixture
def world(netns, tmp_path):
    """The exit on two veths (fc00::1/64 towards c1, fc00:2::1/64 towards
    c2), the bridge for GRE ports, addresses behind it for ip6tnl."""
    ex = netns.add("x")
    clients = []
    for i, (a, b) in enumerate((("fc00::1", "fc00::2"), ("fc00:2::1", "fc00:2::2")), 1):
        c = netns.add("c")
        netns.link(ex, c, a + "/64", b + "/64", name_a="up%d" % i)
        if i == 2:   # c2 reaches the broker's listener on fc00::1 through the exit
            run("ip", "-6", "route", "add", "fc00::/64", "via", a, ns=c)
        tmp = tmp_path / ("c%d" % i)
        tmp.mkdir()
        clients.append(Client(c, str(tmp)))
    run("ip", "link", "add", "br-exit", "type", "bridge", ns=ex)
    run("ip", "addr", "add", EXIT_BR + "/24", "dev", "br-exit", ns=ex)
    run("ip", "link", "set", "br-exit", "up", ns=ex)
    run("ip", "addr", "add", BEHIND4 + "/32", "dev", "lo", ns=ex)
    run("ip", "addr", "add", BEHIND6 + "/128", "dev", "lo", ns=ex)
    run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", ns=ex)
    exit_ = Exit(ex, str(tmp_path), SERVICES)    # beside its L2TPv3 service 'exit'
    exit_.start()
    up = wait_for(lambda: "leases used" in clients[0].run(
        "-s", URL, "-T", "2", "offers", check=False).stdout or
        exit_.proc.poll() is not None, timeout=60, step=0.5)
    assert up and exit_.proc.poll() is None, exit_.log()
    yield exit_, clients
    exit_.stop()


def exit_links(exit_, kind):
    """{ifname: `ip -d link show` line} of the exit's links of one kind."""
    out = run("ip", "-d", "-o", "link", "show", "type", kind, ns=exit_.ns)
    return {m.group(1): line for line in out.splitlines()
            for m in [re.match(r"\d+: ([^:@]+)[@:]", line)] if m and m.group(1).startswith("mb")}


def restart_without(exit_, *ifnames):
    """The broker restarts after the exit lost links (a reboot, a hand):
    it rebuilds them from the lease file."""
    exit_.stop()
    for ifname in ifnames:
        run("ip", "link", "del", ifname, ns=exit_.ns)
    exit_.start()
    assert wait_for(lambda: all(i in run("ip", "-o", "link", ns=exit_.ns) for i in ifnames),
                    timeout=60, step=0.5), exit_.log()


def check_gre(exit_, c1, c2):
    links = exit_links(exit_, "ip6gretap")
    assert len(links) == 2, links
    (if1, line1), = [(n, l) for n, l in links.items() if "remote fc00::2 " in l]
    assert "local fc00::1 " in line1 and "encaplimit none" in line1
    assert "master br-exit" in line1 and "mtu 1280" in line1
    okey, ikey = c1.state_value("OKEY", "gr0"), c1.state_value("IKEY", "gr0")
    assert "ikey %s " % _dotted(okey) in line1 and "okey %s " % _dotted(ikey) in line1
    client_link = run("ip", "-d", "link", "show", "gr0", ns=c1.ns)
    assert "ip6gretap remote fc00::1 local fc00::2" in client_link
    run("ip", "addr", "replace", "10.99.0.2/24", "dev", "gr0", ns=c1.ns)
    run("ip", "addr", "replace", "10.99.0.3/24", "dev", "gr0", ns=c2.ns)
    assert ping(c1.ns, EXIT_BR) and ping(c2.ns, EXIT_BR), exit_.log()
    # Isolated ports: the clients share the bridge but cannot talk.
    assert not ping(c1.ns, "10.99.0.3", count=2, timeout=1)
    return if1


def check_tnl(exit_, c1, c2):
    links = exit_links(exit_, "ip6tnl")
    assert len(links) == 2, (links, exit_.log())
    (if1, line1), = [(n, l) for n, l in links.items() if "remote fc00::2 " in l]
    assert "ip6tnl any remote fc00::2 local fc00::1" in line1 and "encaplimit none" in line1
    assert "master" not in line1 and "mtu 1280" in line1
    v4, v6, prefix = (c1.state_value(k, "tn0") for k in ("IPV4", "IPV6", "PREFIX"))
    # The first or second item of each pool: the two clients lease at once.
    # (Item 0, the pool's network address, is never handed out.)
    assert v4 in ("10.98.0.1", "10.98.0.2"), v4
    assert prefix in ("fd00:98:0:1::/64", "fd00:98:0:2::/64") and v6 == prefix.split("/")[0] + "1"
    # The exit routes the lease's addresses into the tunnel.
    assert re.search(r"^%s dev %s " % (re.escape(v4), if1), run("ip", "route", ns=exit_.ns),
                     re.M)
    assert "%s dev %s " % (prefix, if1) in run("ip", "-6", "route", ns=exit_.ns)
    assert v4 + "/32" in run("ip", "addr", "show", "tn0", ns=c1.ns)
    assert v6 + "/128" in run("ip", "addr", "show", "tn0", ns=c1.ns)
    # IPv4 and IPv6 inside, to addresses behind the exit (-D: default routes
    # as halves, over the blackhole defaults the test put there).
    assert "128.0.0.0/1 dev tn0" in run("ip", "route", ns=c1.ns)
    assert "8000::/1 dev tn0" in run("ip", "-6", "route", ns=c1.ns)
    assert ping(c1.ns, BEHIND4) and ping(c1.ns, BEHIND6), exit_.log()
    assert ping(c2.ns, BEHIND4)
    # Isolated: the exit does not route one client's tunnel into another's.
    v4_2, v6_2 = c2.state_value("IPV4", "tn0"), c2.state_value("IPV6", "tn0")
    assert not ping(c1.ns, v4_2, count=2, timeout=1)
    assert not ping(c1.ns, v6_2, count=2, timeout=1)
    return if1


def test_every_kind_through_the_client_script(world):
    """ip6gretap and ip6tnl side by side from the same two clients, each
    kept up by a `run` loop, and an L2TPv3 one beside them; the loops are
    killed at the end (no release), so every lease has to expire."""
    exit_, (c1, c2) = world
    # The router's own default routes: -D must win over them, not replace them.
    run("ip", "route", "add", "blackhole", "default", ns=c1.ns)
    run("ip", "-6", "route", "add", "blackhole", "default", ns=c1.ns)
    procs = [c1.start("-s", URL, "-K", "l2tpv3", "-i", "mb0", "run")]
    try:
        for c in (c1, c2):
            procs.append(c.start("-s", URL, "-K", "ip6gretap", "-i", "gr0", "run"))
            procs.append(c.start("-s", URL, "-K", "ip6tnl", "-D", "-i", "tn0", "run"))
        for c in (c1, c2):
            for ifname, kind in (("gr0", "ip6gretap"), ("tn0", "ip6tnl")):
                assert wait_for(lambda: c.state_value("KIND", ifname) == kind, timeout=90,
                                step=0.5), exit_.log()
        assert wait_for(lambda: c1.state_value("KIND") == "l2tpv3", timeout=60, step=0.5)
        assert "From %s to fc00::2" % EXIT6 in exit_.tunnels()
        gre1 = check_gre(exit_, c1, c2)
        tnl1 = check_tnl(exit_, c1, c2)

        restart_without(exit_, gre1, tnl1)
        assert "master br-exit" in run("ip", "link", "show", gre1, ns=exit_.ns)
        prefix = c1.state_value("PREFIX", "tn0")
        assert wait_for(lambda: "%s dev %s " % (prefix, tnl1) in
                        run("ip", "-6", "route", ns=exit_.ns), timeout=30)
        assert wait_for(lambda: ping(c1.ns, EXIT_BR, count=1), timeout=30)
        assert wait_for(lambda: ping(c1.ns, BEHIND6, count=1), timeout=30)
    finally:
        for p in procs:
            p.kill()        # no release, no teardown
            p.wait()
    # The leases held when the loops died (a lease may already have been
    # replaced while the broker was down, so not the first ones).
    held = {c1.state_value("LEASE_ID")} | {c.state_value("LEASE_ID", ifname)
                                           for c in (c1, c2) for ifname in ("gr0", "tn0")}
    assert len(held) == 5 and None not in held, held

    # Clients that stopped renewing: their leases expire and everything goes.
    assert wait_for(lambda: exit_links(exit_, "ip6gretap") == {} and
                    exit_links(exit_, "ip6tnl") == {} and exit_.tunnels().strip() == "",
                    timeout=LIFETIME + 60, step=1), exit_.log()
    log = exit_.log()
    for lease_id in held:
        assert "lease %s expired (" % lease_id in log, log
    assert exit_.session_ifname() is None
    assert "10.98.0." not in run("ip", "route", ns=exit_.ns)
    assert "fd00:98:" not in run("ip", "-6", "route", ns=exit_.ns)
    assert re.search(r"\b0 of \d+ leases used", c1.run("-s", URL, "offers").stdout)
    # What a killed client left on its side, `down` removes.
    assert "already gone on the exit" in c1.run("down").stderr
    for c in (c1, c2):
        for ifname in ("gr0", "tn0"):
            c.run("-i", ifname, "down")
        assert c.nothing_left() == []
        links = run("ip", "-o", "link", ns=c.ns)
        assert "gr0" not in links and "tn0" not in links
    assert "blackhole default" in run("ip", "route", ns=c1.ns)
    assert "blackhole default" in run("ip", "-6", "route", ns=c1.ns)


def _dotted(n):
    """GRE keys as `ip -d link` prints them: 0.0.1.245 for 501."""
    n = int(n)
    return "%d.%d.%d.%d" % (n >> 24, (n >> 16) & 255, (n >> 8) & 255, n & 255)
