"""What a lease is in the exit's kernel, and keeping kernel and lease file agreed.

A layer-2 lease (kinds.py) is an Ethernet port, an L2TPv3 tunnel + session
or an ip6gretap link, that joins the service's bridge, isolated from the
other ports, with cjdns beacons dropped and, for restricted services, a
filter profile. A layer-3 lease is an ip6tnl link with routes to the
lease's addresses. Netlink first; filters go through nft or ebtables,
whichever is present.
"""

import errno
import os
import socket
import time

from . import l2tp, rtnl
from .kinds import KINDS


class KernelUnavailable(Exception):
    """This host cannot build tunnels (not root, no l2tp modules)."""


# The kernel datapath's device, master of every Open vSwitch port
# (datapath/dpif-netlink.c's "ovs-system").
OVS_DATAPATH = "ovs-system"


class IdInUse(Exception):
    """The kernel already has this tunnel or session id (EEXIST): another
    tool's, or a leftover. up() has removed what it built; ask again with
    other ids."""

    def __init__(self, message, tunnel_id=0, session_id=0):
        super().__init__(message)
        self.tunnel_id = tunnel_id
        self.session_id = session_id


STATUS_TTL = 10.0


def bridge_name(service):
    """The service's bridge: configured (e.g. OpenWrt's br-exit) or derived."""
    return service.bridge or rtnl.check_ifname(("br-" + service.name)[:15])


def bridge_mac(name):
    """A stable, locally administered MAC for a bridge we create: clients'
    neighbour caches stay right while ports come and go."""
    import zlib
    c = zlib.crc32(name.encode())
    return "02:6d:42:%02x:%02x:%02x" % ((c >> 16) & 255, (c >> 8) & 255, c & 255)


def ovs_backed(service):
    """Is the service's bridge an Open vSwitch one (ovs.py)?"""
    return getattr(service, "bridge_backend", "linux") == "ovs"


def restrict_profile(service):
    r = getattr(service, "restrict", "none") or "none"
    return None if r == "none" else service.name


def profile_ports(service):
    return list(getattr(service, "ports", None) or [80, 443])


def link_local(mac):
    """fe80:: + the modified EUI-64 of a MAC: the link-local address the
    client's kernel gives the interface that carries it."""
    b = [int(x, 16) for x in mac.split(":")]
    words = [(b[0] ^ 0x02) << 8 | b[1], b[2] << 8 | 0xFF, 0xFE << 8 | b[3], b[4] << 8 | b[5]]
    return "fe80::" + ":".join("%x" % w for w in words)


def layer(lease):
    return KINDS[lease.kind].layer


def lease_routes(lease, service):
    """(destination, gateway or None, device) the exit routes to this
    lease's client. Bridged: its prefix via its link-local address and its
    IPv4 address on-link, both on the bridge; routed: both into the tunnel."""
    extra = lease.extra or {}
    out = []
    if layer(lease) == 3:
        for dst in (extra.get("prefix"), extra.get("ipv4") and extra["ipv4"] + "/32"):
            if dst:
                out.append((dst, None, lease.ifname))
        return out
    dev = bridge_name(service) if service is not None else None
    if extra.get("prefix") and lease.mac:
        out.append((extra["prefix"], link_local(lease.mac), dev))
    if extra.get("ipv4"):
        out.append((extra["ipv4"] + "/32", None, dev))
    return out


def port_isolation(release=None):
    """Does this kernel isolate bridge ports (IFLA_BRPORT_ISOLATED, 4.18)?
    Older ones ignore the attribute without an error, so ask the version."""
    release = release or os.uname().release
    try:
        major, minor = (int(x) for x in release.split("-")[0].split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= (4, 18)


def module_present(name):
    """Is kernel module `name` loaded, built in or installed? True when the
    module tree cannot be read (a kernel without modules)."""
    if os.path.isdir("/sys/module/" + name):
        return True
    base = "/lib/modules/" + os.uname().release
    found = False
    for index in ("modules.builtin", "modules.dep"):
        try:
            with open(os.path.join(base, index), "rb") as f:
                data = f.read()
        except OSError:
            continue
        found = True
        want = name.encode()
        if b"/" + want + b".ko" in data or b"/" + want.replace(b"_", b"-") + b".ko" in data:
            return True
    return not found


def _br_netfilter():
    """Does br_netfilter pass bridged IPv4 through the IP hooks here?"""
    try:
        with open("/proc/sys/net/bridge/bridge-nf-call-iptables") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def nft_present(config):
    """Is nft the filter tool here? (PATH search only: no subprocess import
    on a CGI offer.)"""
    if (getattr(config, "filter", "") or "nft") != "nft":
        return False
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/sbin"]
    return any(d and os.access(os.path.join(d, "nft"), os.X_OK) for d in dirs)


def pool_routes(services):
    """(family, parsed pool, length) of every pool: routes of that length
    inside a pool are ours."""
    from .config import parse_prefix
    out = []
    for svc in services:
        if getattr(svc, "prefix_pool", ""):
            out.append((socket.AF_INET6, parse_prefix(svc.prefix_pool), svc.prefix_length))
        if getattr(svc, "ipv4_pool", ""):
            out.append((socket.AF_INET, parse_prefix(svc.ipv4_pool), 32))
    return out


class Dataplane:
    """The exit's kernel side, through our netlink modules."""

    def __init__(self, config):
        self.config = config
        self._status = {}
        self._filters = False     # not probed yet
        self._ready = set()       # services whose bridge and filters exist
        self._iso_fallback = False
        self.warnings = []        # for the broker to log (reconcile)
        self.prefix = getattr(config, "ifname_prefix", "mb") or "mb"
        self._ovs = None
        self.foreign_ids = frozenset()    # after a reconcile: see reconcile()

    # -- capability --
    def status(self, kind=None):
        """(ok, why) for building tunnels of `kind` (default l2tpv3)."""
        kind = kind or "l2tpv3"
        now = time.monotonic()
        cached = self._status.get(kind)
        if cached and now - cached[0] < STATUS_TTL:
            return cached[1]
        if kind == "l2tpv3":
            ok, why = l2tp.available()
        else:
            module = KINDS[kind].module
            ok = module_present(module)
            why = "" if ok else "kernel module %s for %s is missing (modprobe %s)" % (
                module, kind, module)
        if ok and KINDS[kind].layer == 3 and not nft_present(self.config):
            ok, why = False, ("routed (%s) tunnels need nft for their source check "
                              "(install nftables)" % kind)
        if ok and os.geteuid() != 0:
            why = "running as uid %d (needs CAP_NET_ADMIN)" % os.geteuid()
        self._status[kind] = (now, (ok, why))
        return ok, why

    def filters(self):
        # Imported here: subprocess and re cost a CGI offer ~20 ms it never needs.
        if self._filters is False:
            from . import filters
            self._filters = filters.probe(getattr(self.config, "filter", None) or None)
        return self._filters

    # -- per service --
    def ensure_service(self, service, rt=None):
        """Bridge up and filter profile in place; cheap after the first call."""
        if service.name in self._ready:
            return
        if KINDS[service.kind].layer == 3:
            self._ensure_routed(service)
            self._ready.add(service.name)
            return
        own = rt is None
        rt = rt or rtnl.Rtnl()
        try:
            br = bridge_name(service)
            if ovs_backed(service):
                self._ovs_do("ensure_service", service, br, rt, bridge_mac(br))
            else:
                try:
                    rt.add_bridge(br, bridge_mac(br))
                except rtnl.LinkExists:
                    # Ours (no `bridge` configured) but made without its MAC, by
                    # an older version or by hand: give it the stable one.
                    if not service.bridge and rt.link(br).address != bridge_mac(br):
                        rt.set_mac(br, bridge_mac(br))
                rt.set_up(br)
        finally:
            if own:
                rt.close()
        f = self.filters()
        if f is not None:
            profiles = {}
            if restrict_profile(service) and not ovs_backed(service):
                profiles[service.name] = profile_ports(service)
            f.ensure(self.prefix, profiles, self._iso_fallback)
            self._ensure_isolation(f, service)
        elif restrict_profile(service) and not ovs_backed(service):
            raise KernelUnavailable("service %s is restricted but neither nft nor ebtables "
                                    "is installed" % service.name)
        self._ready.add(service.name)

    def _ovs_do(self, what, *args):
        """A call into the Open vSwitch backend; no ovsdb-server or
        ovs-ofctl makes this exit unable to build leases now."""
        from . import ovs, ovsdb
        if self._ovs is None:
            self._ovs = ovs.Backend(self.config)
        try:
            return getattr(self._ovs, what)(*args)
        except (ovsdb.NotAvailable, ovs.OfctlError) as e:
            raise KernelUnavailable("Open vSwitch: %s" % e) from None

    def _sides(self, service):
        """The isolated client sides of every enabled service: their bridges,
        and `prefix*` for routed tunnels."""
        services = [s for s in getattr(self.config, "services", {}).values()
                    if getattr(s, "enabled", True)]
        sides = set()
        for s in services + [service]:
            if not getattr(s, "isolate", True):
                continue
            if KINDS[s.kind].layer == 3:
                sides.add(self.prefix + "*")
            elif not _br_netfilter():
                sides.add(bridge_name(s))
            elif not self.warnings:
                # It hands bridged IP packets to inet forward as bridge to
                # bridge, so the rule would cut clients off a bridge's other
                # (uplink) ports.
                self.warnings.append("br_netfilter is active: clients of an isolated "
                                     "bridge can reach each other through the exit as "
                                     "their router")
        return sides

    def _ensure_isolation(self, f, service):
        from .filters import FilterError
        try:
            f.ensure_isolation(self._sides(service))
        except FilterError as e:
            raise KernelUnavailable("service %s: %s" % (service.name, e)) from None

    def _ensure_routed(self, service):
        """Routed tunnels: no bridge; the source check, isolation and
        restriction need nft."""
        profile = restrict_profile(service)
        f = self.filters()
        if f is None:
            raise KernelUnavailable("service %s: routed (%s) tunnels need nft for their "
                                    "source check, and it is not installed"
                                    % (service.name, service.kind))
        from .filters import FilterError
        try:
            f.ensure_routed(self.prefix, {profile: profile_ports(service)} if profile else {})
        except FilterError as e:
            raise KernelUnavailable("service %s: %s" % (service.name, e)) from None
        self._ensure_isolation(f, service)

    # -- per lease --
    def up(self, lease, service):
        """Build the lease in the kernel; on failure leave nothing of ours
        behind. IdInUse when its tunnel or session id (or GRE key) is held
        by a tunnel that is not this lease's: ask again with other ids."""
        bridged = layer(lease) == 2
        ovs = bridged and ovs_backed(service)
        with rtnl.Rtnl() as rt:
            self.ensure_service(service, rt)
            self._link(rt, lease)       # undoes itself on IdInUse
            try:
                rt.setup_port(lease.ifname, bridge_name(service) if bridged and not ovs
                              else None, mtu=lease.mtu)
                if ovs:
                    self._ovs_do("join", lease, service, bridge_name(service))
                elif bridged and getattr(service, "isolate", True):
                    if port_isolation():
                        rt.set_isolated(lease.ifname, True)
                    elif not self._iso_fallback:
                        # Before 4.18: isolate every pseudo-wire by filter rule.
                        if self.filters() is None:
                            raise KernelUnavailable(
                                "this kernel isolates bridge ports only by filter rules "
                                "(IFLA_BRPORT_ISOLATED needs 4.18), and neither nft nor "
                                "ebtables is installed")
                        self._iso_fallback = True
                        self._ready.clear()
                        self.ensure_service(service, rt)
                profile = restrict_profile(service)
                if profile and not ovs:
                    self.filters().add_port(lease.ifname, profile, profile_ports(service),
                                            family="bridge" if bridged else "inet")
                for dst, via, dev in lease_routes(lease, service):
                    rt.add_route(dst, dev=dev, via=via)
            except Exception:
                self._down(lease, rt)
                raise

    def _link(self, rt, lease):
        """The lease's interface, by kind."""
        if lease.kind == "l2tpv3":
            with l2tp.L2TP() as l2:
                self._tunnel(l2, lease)
                try:
                    self._session(l2, lease)
                except Exception:
                    # The tunnel is this lease's (made now or by an earlier try).
                    try:
                        l2.delete_tunnel(lease.tunnel_id)
                    except l2tp.NotFound:
                        pass
                    raise
            return
        if lease.kind == "ip6gretap":
            # The exit receives with its own id as key and sends the client's.
            def add():
                rt.add_ip6gretap(lease.ifname, lease.local, lease.remote,
                                 ikey=lease.tunnel_id, okey=lease.peer_tunnel_id)
        elif lease.kind == "ip6tnl":
            def add():
                rt.add_ip6tnl(lease.ifname, lease.local, lease.remote)
        else:
            raise ValueError("lease %s: unknown kind %r" % (lease.lease_id, lease.kind))
        try:
            try:
                add()
            except rtnl.LinkExists:
                # The name comes from the lease's tunnel id: what holds it is a
                # leftover or an earlier try of this very lease. An ip6tnl
                # may also clash by its ends (one per address pair).
                self._remove_clash(rt, lease)
                add()
        except rtnl.LinkError as e:
            if e.errno == errno.EOPNOTSUPP:
                module = KINDS[lease.kind].module
                raise KernelUnavailable("the kernel cannot make %s links: module %s "
                                        "missing (modprobe %s)" % (lease.kind, module,
                                                                   module)) from None
            raise

    def _remove_clash(self, rt, lease):
        """Delete the link in the way of `lease`: one by its name, or an
        ip6tnl of ours with its ends (the broker gives a client one ip6tnl
        per exit address, so another is a leftover)."""
        try:
            rt.delete_link(lease.ifname)
            return
        except rtnl.NoSuchLink:
            if lease.kind != "ip6tnl":
                # Not the name: another GRE link has these ends and key.
                raise IdInUse("%s: another ip6gretap from %s to %s has key %d"
                              % (lease.ifname, lease.local, lease.remote, lease.tunnel_id),
                              lease.tunnel_id, 0) from None
        lo, hi = self.config.tunnel_ids
        for link in rt.links_of_kind("ip6tnl"):
            digits = link.name[len(self.prefix):]
            if link.kind == "ip6tnl" and link.name.startswith(self.prefix) and \
                    digits.isdigit() and lo <= int(digits) <= hi and \
                    (link.local, link.remote) == (lease.local, lease.remote):
                rt.delete_link(link.name)
                return
        raise rtnl.LinkExists(errno.EEXIST, "%s: an ip6tnl from %s to %s exists and is "
                              "not ours" % (lease.ifname, lease.local, lease.remote))

    def _tunnel(self, l2, lease):
        """The lease's tunnel, made now or found as an earlier try made it."""
        try:
            l2.create_tunnel(lease.tunnel_id, lease.peer_tunnel_id, lease.local, lease.remote,
                             encap=lease.encap, udp_sport=lease.udp_port,
                             udp_dport=lease.peer_udp_port)
        except l2tp.Exists as e:
            # Ours already (a retry, a reconcile) if it points the same way.
            try:
                t = l2.get_tunnel(lease.tunnel_id)
            except l2tp.NotFound:
                raise e from None     # EADDRINUSE: the UDP port, not the id
            if (t.peer_tunnel_id, t.remote, t.local) != (lease.peer_tunnel_id, lease.remote,
                                                         lease.local):
                raise IdInUse("l2tp tunnel %d exists and is not lease %s's (peer %s)"
                              % (lease.tunnel_id, lease.lease_id, t.remote),
                              lease.tunnel_id, 0) from None

    def _session(self, l2, lease):
        try:
            l2.create_session(lease.tunnel_id, lease.session_id, lease.peer_session_id,
                              ifname=lease.ifname)
        except l2tp.Exists:
            try:
                s = l2.get_session(lease.tunnel_id, lease.session_id)
            except l2tp.NotFound:
                # L2TPv3 session ids are unique per netns, not per tunnel.
                raise IdInUse("l2tp session id %d or interface %s is taken by another "
                              "tunnel" % (lease.session_id, lease.ifname),
                              0, lease.session_id) from None
            if (s.peer_session_id, s.ifname) != (lease.peer_session_id, lease.ifname):
                raise IdInUse("l2tp session %d in tunnel %d exists and is not lease %s's"
                              % (lease.session_id, lease.tunnel_id, lease.lease_id),
                              0, lease.session_id) from None

    def present(self, lease):
        """Is the lease's interface in the kernel and up? One netlink
        request: a renew asks."""
        with rtnl.Rtnl() as rt:
            try:
                return bool(rt.link(lease.ifname).flags & rtnl.IFF_UP)
            except rtnl.NoSuchLink:
                return False

    def down(self, lease):
        self._down(lease)

    def _down(self, lease, rt=None):
        f = self.filters()
        services = getattr(self.config, "services", None) or {}
        svc = services.get(lease.service) if isinstance(services, dict) else None
        bridged = layer(lease) == 2
        if bridged and svc is not None and ovs_backed(svc):
            try:
                self._ovs_do("leave", lease, svc, bridge_name(svc))
            except Exception:
                pass        # reconcile removes a port left behind
        # Unrestricted leases have no per-port rule: save a subprocess.
        elif f is not None and (svc is None or restrict_profile(svc)):
            try:
                f.remove_port(lease.ifname, family="bridge" if bridged else "inet")
            except (OSError, ValueError, RuntimeError):
                pass
        own = rt is None and (lease.kind != "l2tpv3" or lease_routes(lease, svc))
        if own:
            rt = rtnl.Rtnl()
        try:
            if bridged:
                # The routes point at the bridge, which stays: remove them.
                # A routed lease's routes go with its link.
                for dst, _via, dev in lease_routes(lease, svc):
                    try:
                        rt.delete_route(dst, dev=dev)
                    except rtnl.LinkError as e:
                        if e.errno not in (errno.ESRCH, errno.ENODEV):
                            raise
            if lease.kind == "l2tpv3":
                with l2tp.L2TP() as l2:
                    try:
                        l2.delete_tunnel(lease.tunnel_id)
                    except l2tp.NotFound:
                        pass
            else:
                try:
                    rt.delete_link(lease.ifname)
                except rtnl.NoSuchLink:
                    pass
        finally:
            if own:
                rt.close()

    def counters(self, lease):
        if lease.kind != "l2tpv3":
            with rtnl.Rtnl() as rt:
                try:
                    s = rt.stats(lease.ifname)
                except rtnl.NoSuchLink:
                    return {}
        else:
            with l2tp.L2TP() as l2:
                try:
                    s = l2.get_session(lease.tunnel_id, lease.session_id).stats
                except l2tp.NotFound:
                    return {}
        return {"rx_packets": s.rx_packets, "rx_bytes": s.rx_bytes,
                "tx_packets": s.tx_packets, "tx_bytes": s.tx_bytes}

    # -- reconcile --
    def reconcile(self, live, services):
        """Make the kernel match the live leases (a list); idempotent.

        Live leases missing in the kernel are rebuilt, tunnels in our id
        range that no live lease owns removed, and the same for the routes
        to leased prefixes and addresses. The broker sweeps expired leases
        first (so their down hooks run). Afterwards `foreign_ids` holds the
        (tunnel_id, session_id) pairs in the kernel, (tunnel_id, 0) for a
        bare tunnel, that no live lease holds: from the same dumps.
        """
        report = {"rebuilt": [], "removed": [], "links_removed": [], "failed": [],
                  "routes_added": [], "routes_removed": [], "filters_fixed": []}
        by_name = {s.name: s for s in services}
        self._ready.clear()         # check bridges and tables again, not from memory
        lo, hi = self.config.tunnel_ids
        try:
            l2 = l2tp.L2TP()
        except l2tp.NotAvailable as e:
            if any(l.kind == "l2tpv3" for l in live) or \
                    any(s.kind == "l2tpv3" for s in services):
                raise
            l2 = None      # an exit of GRE and ip6tnl only, without L2TP modules
        try:
            with rtnl.Rtnl() as rt:
                tunnels = l2.tunnel_remotes() if l2 else {}     # {id: remote}
                sessions = l2.session_ids() if l2 else set()
                # Bridges and filter rules first: a restart after `nft flush
                # ruleset` or a reboot must not leave beacons or isolation open.
                ready = set()
                for svc in services:
                    try:
                        self.ensure_service(svc, rt)
                        ready.add(svc.name)
                    except (OSError, ValueError, KernelUnavailable) as e:
                        report["failed"].append("service %s: %s" % (svc.name, e))
                ovs = any(ovs_backed(s) for s in services)
                links = self._links(rt, ovs)
                owned = set()
                for lease in live:
                    owned.add(lease.tunnel_id)
                    svc = by_name.get(lease.service)
                    if svc is None:
                        continue
                    link = links.get(lease.ifname)
                    if self._intact(lease, link, tunnels.get(lease.tunnel_id), sessions):
                        continue
                    try:
                        if lease.tunnel_id in tunnels and \
                                tunnels[lease.tunnel_id] != lease.remote:
                            l2.delete_tunnel(lease.tunnel_id)
                        self.up(lease, svc)
                        report["rebuilt"].append(lease.lease_id)
                    except (OSError, ValueError, KernelUnavailable, IdInUse) as e:
                        report["failed"].append("%s: %s" % (lease.lease_id, e))
                # Open vSwitch ports before the tunnels that no lease owns:
                # vswitchd must let go of a port before its device goes.
                self._reconcile_ovs(rt, live, services, ready, report, links)
                for tid in sorted(tunnels):
                    if lo <= tid <= hi and tid not in owned:
                        try:
                            l2.delete_tunnel(tid)
                        except l2tp.NotFound:
                            pass
                        report["removed"].append(tid)
                self.foreign_ids = self._foreign(live, tunnels, sessions, report["removed"])
                self._remove_links(rt, links, owned, report)
                if report["rebuilt"] or report["links_removed"]:
                    links = self._links(rt, ovs)    # indexes changed
                self._reconcile_routes(rt, live, by_name, services, report, links)
        finally:
            if l2 is not None:
                l2.close()
        f = self.filters()
        if f is not None:
            self._sync_ports(f, live, by_name, ready, report,
                             any(KINDS[s.kind].layer == 3 for s in services))
        return report

    def _reconcile_ovs(self, rt, live, services, ready, report, links):
        """Open vSwitch bridges: leased ports and flow tables (ovs.py).
        `links` has the devices on the kernel datapath; one of a lease
        that is not (its port gone from OVSDB) is looked up by name."""
        for svc in services:
            if svc.name not in ready or not ovs_backed(svc) or KINDS[svc.kind].layer != 2:
                continue
            mine = [l for l in live if l.service == svc.name]
            present = set()
            for lease in mine:
                if lease.ifname in links or self._has_link(rt, lease.ifname):
                    present.add(lease.ifname)
            try:
                self._ovs_do("reconcile", svc, bridge_name(svc), mine, present, report)
            except Exception as e:
                report["failed"].append("service %s: Open vSwitch: %s" % (svc.name, e))

    @staticmethod
    def _has_link(rt, name):
        try:
            rt.link(name)
        except rtnl.NoSuchLink:
            return False
        return True

    @staticmethod
    def _sync_ports(f, live, by_name, ready, report, routed):
        """Every restricted lease in the filter map, whether or not its
        links were rebuilt: rules can go while links stay. A lease whose
        service is gone from the config, or could not be set up now, keeps
        what it has: no rule is dropped that nothing replaces."""
        want = {"bridge": {}, "inet": {}}
        keep = set()
        for lease in live:
            svc = by_name.get(lease.service)
            if svc is None or svc.name not in ready:
                keep.add(lease.ifname)
                continue
            profile = restrict_profile(svc)
            if profile and not (layer(lease) == 2 and ovs_backed(svc)):
                want["bridge" if layer(lease) == 2 else "inet"][lease.ifname] = \
                    (profile, profile_ports(svc))
        for family in f.FAMILIES:
            if family == "inet" and not (routed or want["inet"]):
                continue        # no routed service: save a process
            try:
                changed, problems = f.sync_ports(want[family], family, keep)
            except (OSError, RuntimeError) as e:
                changed, problems = [], [str(e)]
            report["filters_fixed"] += changed
            report["failed"] += ["%s filter rules: %s" % (family, p) for p in problems]

    @staticmethod
    def _links(rt, ovs=False):
        """{name: Link} of what reconcile looks at: bridge ports (as
        `bridge link`: a few attributes each), bridges, and the GRE and
        ip6tnl links by kind, filtered in the kernel. A full link dump
        costs several times as much at a thousand leases. Ports of Open
        vSwitch bridges are no Linux bridge's: with `ovs`, the links whose
        master is the kernel datapath (OVS_DATAPATH) are added; l2tpeth
        has no link kind to filter by."""
        links = {l.name: l for l in rt.bridge_ports()}
        if ovs:
            try:
                links.update((l.name, l) for l in
                             rt.links_of_master(rt.ifindex(OVS_DATAPATH)))
            except rtnl.NoSuchLink:
                pass    # the userspace (netdev) datapath: no kernel master
        for kind in ("bridge", "ip6gretap", "ip6tnl"):
            links.update((l.name, l) for l in rt.links_of_kind(kind))
        return links

    @staticmethod
    def _foreign(live, tunnels, sessions, removed):
        """Kernel id pairs no live lease holds, less the tunnels removed."""
        ours = {(l.tunnel_id, l.session_id) for l in live}
        skip = set(removed) | {l.tunnel_id for l in live} | {t for t, _s in sessions}
        out = {p for p in sessions if p not in ours and p[0] not in removed}
        return out | {(t, 0) for t in tunnels if t not in skip}

    @staticmethod
    def _intact(lease, link, remote, sessions):
        """Is the lease's interface in the kernel as up() would build it?
        `remote`: its tunnel's, None without a tunnel."""
        if link is None or link.mtu != lease.mtu or not link.flags & rtnl.IFF_UP:
            return False
        if lease.kind == "l2tpv3":
            return remote is not None and remote == lease.remote and \
                (lease.tunnel_id, lease.session_id) in sessions and bool(link.master)
        return link.kind == lease.kind and link.remote == lease.remote and \
            link.local == lease.local and \
            (layer(lease) == 3 or bool(link.master))

    def _remove_links(self, rt, links, owned, report):
        """GRE and ip6tnl links named for a tunnel id in our range that no
        live lease owns (L2TP ones go with their tunnels)."""
        lo, hi = self.config.tunnel_ids
        n = len(self.prefix)
        for name, link in sorted(links.items()):
            if link.kind not in ("ip6gretap", "ip6tnl") or not name.startswith(self.prefix):
                continue
            digits = name[n:]
            if not digits.isdigit() or not lo <= int(digits) <= hi or int(digits) in owned:
                continue
            try:
                rt.delete_link(name)
            except rtnl.NoSuchLink:
                pass
            report["links_removed"].append(name)

    def _reconcile_routes(self, rt, live, by_name, services, report, links):
        """Routes of live leases present and right; routes of a pool's
        length inside a pool that no live lease owns removed."""
        from .config import in_prefixes, parse_addr
        want = {}
        for lease in live:
            svc = by_name.get(lease.service)
            if svc is not None:
                for dst, via, dev in lease_routes(lease, svc):
                    want[dst] = (via, dev, lease.lease_id)
        pools = pool_routes(services)
        have = {}
        for family in sorted({fam for fam, _p, _l in pools} |
                             {socket.AF_INET6 if ":" in d else socket.AF_INET for d in want}):
            for r in rt.routes(family):
                have.setdefault("%s/%d" % (r.dst, r.dst_len), []).append(r)
        index = {name: l.index for name, l in links.items()}
        for dst, (via, dev, lease_id) in sorted(want.items()):
            ok = any(r.gateway == via and r.oif == index.get(dev) and
                     r.type == rtnl.RTN_UNICAST for r in have.get(dst, ()))
            if ok:
                continue
            try:
                rt.add_route(dst, dev=dev, via=via)
                report["routes_added"].append(dst)
            except (OSError, ValueError) as e:
                report["failed"].append("%s: route %s: %s" % (lease_id, dst, e))
        for dst, routes in sorted(have.items()):
            if dst in want:
                continue
            addr, _s, plen = dst.partition("/")
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            mine = any(fam == family and int(plen) == length and
                       in_prefixes(*parse_addr(addr), [pool]) and pool[2] <= length
                       for fam, pool, length in pools)
            if not mine:
                continue
            for _r in routes:
                try:
                    rt.delete_route(dst)
                except rtnl.LinkError as e:
                    if e.errno != errno.ESRCH:
                        report["failed"].append("route %s: %s" % (dst, e))
                        break
            report["routes_removed"].append(dst)
