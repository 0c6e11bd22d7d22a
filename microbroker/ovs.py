"""Open vSwitch bridges for services with `bridge_backend 'ovs'`.

Ports through OVSDB (ovsdb.py); isolation is Port.protected, which the
NORMAL action honours like the Linux bridge's isolated flag, so an
unrestricted lease costs one OVSDB transaction and no OpenFlow at all.
The beacon drop and restriction profiles are OpenFlow rules written with
ovs-ofctl (argv only, rules on stdin, one atomic bundle per call).

The flow table is a function of the service and the bridge's ports in
OVSDB (those with external_ids:mb-lease), so it can be rebuilt at any time:
ovs-vswitchd keeps flows only in memory, and a restarted one has none
(fail_mode secure: it drops everything until they are back).
"""

import os
import subprocess

from . import ovsdb, rtnl

# Cookies: the top 16 bits mark ours ("mb"); a lease's rules carry its ofport.
COOKIE_BASE = 0x6D62000000000000
COOKIE_LEASE = 0x6D62000100000000
COOKIE_OURS = 0xFFFF000000000000
BEACON_ETHERTYPE = 0xFC00
DNS = 53
OFCTL_TIMEOUT = 60
BRIDGE_TIMEOUT = 30.0     # seconds
LEAVE_WAIT = 10.0         # seconds for vswitchd to drop a leaving port


class OfctlError(RuntimeError):
    """ovs-ofctl failed or is missing."""


def lease_cookie(ofport):
    return COOKIE_LEASE | int(ofport)


def base_flows(restricted=False):
    """Beacons never cross the bridge; everything else is switched by
    NORMAL, which keeps protected ports apart. Where leases are restricted,
    only the exit's own port is switched without a profile: a port whose
    rules are not in yet (or are gone) drops, it does not pass."""
    c = "cookie=%#x," % COOKIE_BASE
    beacons = c + "priority=1000,dl_type=%#06x actions=drop" % BEACON_ETHERTYPE
    if restricted:
        return [beacons, c + "priority=10,in_port=LOCAL actions=NORMAL",
                c + "priority=5 actions=drop"]
    return [beacons, c + "priority=10 actions=NORMAL"]


def profile_flows(ofport, ports):
    """What a restricted lease's port may send: the nft profile's matches
    (filters.Nft.ensure), ARP, ICMP, DHCP, DNS and the service's TCP ports;
    the rest is dropped. Every L4 match names its protocol: ovs-ofctl turns
    a bare tp_dst into a match-all."""
    p = int(ofport)
    if not 0 < p < ovsdb.OFPP_LOCAL:
        raise ValueError("bad ofport %r" % (ofport,))
    tcp = [DNS] + sorted({int(x) for x in ports} - {DNS})
    if any(not 0 < x < 65536 for x in tcp):
        raise ValueError("bad port in %r" % (ports,))
    head = "cookie=%#x,priority=510,in_port=%d," % (lease_cookie(p), p)
    allow = ["arp", "icmp", "icmp6", "udp,udp_dst=53", "udp,udp_dst=67",
             "udp6,udp_dst=53", "udp6,udp_dst=547"]
    allow += ["%s,tcp_dst=%d" % (proto, x) for proto in ("tcp", "tcp6") for x in tcp]
    return [head + m + " actions=NORMAL" for m in allow] + \
        ["cookie=%#x,priority=500,in_port=%d actions=drop" % (lease_cookie(p), p)]


class Ofctl:
    """ovs-ofctl against one bridge's management socket."""

    def __init__(self, rundir, bridge, ofctl="ovs-ofctl"):
        self.target = "unix:%s/%s.mgmt" % (rundir, rtnl.check_ifname(bridge))
        self.ofctl = ofctl

    def _run(self, args, stdin=None):
        argv = [self.ofctl] + args
        try:
            p = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, timeout=OFCTL_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise OfctlError("%s: %s" % (self.ofctl, e)) from None
        if p.returncode != 0:
            raise OfctlError("ovs-ofctl %s failed: %s" % (args[0] if args[0][0] != "-"
                                                          else args[1], p.stderr.strip()))
        return p.stdout

    def apply(self, lines):
        """Flow mods (`add ...`, `delete ...`) as one bundle: all or none."""
        if lines:
            self._run(["--bundle", "add-flows", self.target, "-"], "\n".join(lines) + "\n")

    def count(self, cookie, mask=-1):
        out = self._run(["dump-aggregate", self.target, "cookie=%#x/%d" % (cookie, mask)
                         if mask == -1 else "cookie=%#x/%#x" % (cookie, mask)])
        for word in out.split():
            if word.startswith("flow_count="):
                return int(word[11:])
        raise OfctlError("ovs-ofctl dump-aggregate: no flow_count in %r" % out)


class Backend:
    """Open vSwitch bridges and ports of the services that ask for it."""

    def __init__(self, config):
        self.socket = getattr(config, "ovsdb", "") or ovsdb.DEFAULT_SOCKET
        # The bridges' management sockets sit beside db.sock (OVS_RUNDIR).
        self.rundir = os.path.dirname(self.socket)
        self.datapath = getattr(config, "ovs_datapath", "") or ""
        self.ofctl = getattr(config, "ovs_ofctl", "") or "ovs-ofctl"
        self._mgmt = {}         # bridge -> identity of its mgmt socket when flows were right

    def db(self):
        return ovsdb.Ovsdb(self.socket)

    def flows(self, bridge):
        return Ofctl(self.rundir, bridge, self.ofctl)

    def ensure_service(self, service, bridge, rt, mac=None):
        """The bridge (fail_mode secure), its own device up, and its flows
        in place. Flows are checked once per ovs-vswitchd (its management
        socket is made anew when it starts) and rebuilt from OVSDB when
        they are missing."""
        with self.db() as db:
            db.ensure_bridge(bridge, "secure", self.datapath, mac,
                             {"mb-service": service.name})
            # vswitchd has made the bridge and its device (the first bridge
            # also makes the datapath: slower than a port).
            db.ofport(bridge, BRIDGE_TIMEOUT)
            ident = self._mgmt_ident(bridge)
            if ident is None or self._mgmt.get(bridge) != ident:
                of = self.flows(bridge)
                if of.count(COOKIE_BASE) != len(base_flows(_restricted(service))):
                    self._rebuild(db, of, service, bridge)
                self._mgmt[bridge] = ident
        rt.set_up(bridge)

    def _mgmt_ident(self, bridge):
        try:
            st = os.stat("%s/%s.mgmt" % (self.rundir, bridge))
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_ctime_ns)

    def _rebuild(self, db, of, service, bridge, ports=None):
        """Our whole flow table for the bridge in one bundle: base rules and
        the profile of every leased port that has an ofport."""
        ports = db.ports(bridge) if ports is None else ports
        lines = ["delete cookie=%#x/%#x" % (COOKIE_BASE, COOKIE_OURS)]
        lines += ["add " + f for f in base_flows(_restricted(service))]
        if _restricted(service):
            for p in sorted(ports.values(), key=lambda p: p.name):
                if ovsdb.LEASE_KEY in p.external_ids and p.ofport and p.ofport > 0:
                    lines += ["add " + f for f in profile_flows(p.ofport, service.ports)]
        of.apply(lines)
        return len(lines) - 1

    def join(self, lease, service, bridge):
        """The lease's device as a port: protected when the service
        isolates, with its profile's rules once its ofport is known.

        An unrestricted port is not waited for: ovs-vswitchd takes it up
        at its next reconfiguration, which goes over every port of the
        switch, so a wait per lease costs one whole reconfiguration each,
        while ports that come faster than vswitchd runs share one. A port
        vswitchd cannot open shows at reconcile (Interface.error)."""
        with self.db() as db:
            db.add_port(bridge, lease.ifname, getattr(service, "isolate", True),
                        {ovsdb.LEASE_KEY: lease.lease_id})
            if not _restricted(service):
                return
            ofport = db.ofport(lease.ifname)
        self.flows(bridge).apply(["delete cookie=%#x/-1" % lease_cookie(ofport)] +
                                 ["add " + f for f in profile_flows(ofport, service.ports)])

    def leave(self, lease, service, bridge):
        """Rules first (flows that name an ofport outlive it), then the
        port, and vswitchd's letting go of it before the caller deletes the
        device: a port whose device is gone before its row is queried
        (ethtool, stats) at every reconfiguration, and 400 such kept
        vswitchd's main loop from the rest for over eight minutes."""
        with self.db() as db:
            ports = db.ports(bridge) if _restricted(service) else {}
            p = ports.get(lease.ifname)
            if p is not None and p.ofport and p.ofport > 0:
                self.flows(bridge).apply(["delete cookie=%#x/-1" % lease_cookie(p.ofport)])
            if db.delete_port(lease.ifname):
                try:
                    db.wait_applied(LEAVE_WAIT)
                except ovsdb.PortError:
                    pass    # vswitchd stopped or far behind: the device goes anyway

    def reconcile(self, service, bridge, leases, links, report):
        """Ports of the live leases whose devices exist on the bridge, other
        leased ports gone, and the flow table rebuilt."""
        want = {l.ifname: l for l in leases if l.ifname in links}
        isolate = getattr(service, "isolate", True)
        with self.db() as db:
            have = db.ports(bridge)
            stale = [n for n, p in have.items()
                     if ovsdb.LEASE_KEY in p.external_ids and
                     (n not in want or p.external_ids[ovsdb.LEASE_KEY] != want[n].lease_id)]
            if stale:
                db.delete_ports(bridge, stale)
                report.setdefault("ports_removed", []).extend(sorted(stale))
            for name, lease in sorted(want.items()):
                p = have.get(name)
                if p is not None and name not in stale and p.protected == isolate:
                    continue
                try:
                    db.add_port(bridge, name, isolate, {ovsdb.LEASE_KEY: lease.lease_id})
                    report.setdefault("ports_added", []).append(name)
                except ovsdb.OvsdbError as e:
                    report["failed"].append("%s: port %s: %s" % (lease.lease_id, name, e))
            if stale or report.get("ports_added"):
                # Added ones have their ofports for the rules; removed ones
                # are let go before the caller deletes their devices.
                db.wait_applied()
            ports = db.ports(bridge)
            for name in sorted(want):
                p = ports.get(name)
                if p is not None and p.error:
                    report["failed"].append("%s: port %s: ovs-vswitchd: %s"
                                            % (want[name].lease_id, name, p.error))
            n = self._rebuild(db, self.flows(bridge), service, bridge, ports)
            self._mgmt[bridge] = self._mgmt_ident(bridge)
        report.setdefault("flows_rebuilt", []).append("%s: %d rules" % (bridge, n))


def _restricted(service):
    return (getattr(service, "restrict", "none") or "none") != "none"
