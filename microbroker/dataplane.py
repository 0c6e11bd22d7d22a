"""What a lease is in the exit's kernel (reconcile.py keeps kernel and lease
file agreed).

A layer-2 lease (kinds.py) is an Ethernet port, an L2TPv3 tunnel + session
or an ip6gretap link, that joins the service's bridge, isolated from the
other ports, with cjdns beacons dropped and, for restricted services, a
filter profile. A layer-3 lease is an ip6tnl link with routes to the
lease's addresses. Netlink first; filters go through nft or ebtables,
whichever is present.
"""

import errno
import posix
import time

from . import l2tp, posixfs, procsys, rtnl
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
    release = release or posix.uname().release
    try:
        major, minor = (int(x) for x in release.split("-")[0].split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= (4, 18)


def module_present(name):
    """Is kernel module `name` loaded, built in or installed? True when the
    module tree cannot be read (a kernel without modules)."""
    if posixfs.exists("/sys/module/" + name):
        return True
    base = "/lib/modules/" + posix.uname().release
    found = False
    for index in ("modules.builtin", "modules.dep"):
        try:
            with open(base + "/" + index, "rb") as f:
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
    return posixfs.which("nft") is not None


def _ensure_bridge(rt, br, ours):
    """A Linux bridge up. Ours (no `bridge` configured) has the stable MAC
    and multicast snooping off, as netifd makes a bridge (igmp_snooping
    0): with it on, a port's join and up cost more the more ports there
    are (bench/bridge_ports.py). One of ours made by an older version or by
    hand gets them; a configured one is left as it is."""
    try:
        rt.add_bridge(br, bridge_mac(br), mcast_snooping=False)
    except rtnl.LinkExists:
        if ours:
            link = rt.link(br)
            if link.address != bridge_mac(br):
                rt.set_mac(br, bridge_mac(br))
            if link.mcast_snooping:
                rt.set_mcast_snooping(br, False)
    rt.set_up(br)


class Dataplane:
    """The exit's kernel side, through our netlink modules."""

    def __init__(self, config):
        self.config = config
        self._status = {}
        self._probing = set()     # kinds whose status a thread asks now
        self._filters = False     # not probed yet
        self._ready = set()       # services whose bridge and filters exist
        self._iso_fallback = False
        self.warnings = []        # for the broker to log (reconcile)
        self.prefix = getattr(config, "ifname_prefix", "mb") or "mb"
        self._ovs = None
        self.foreign_ids = frozenset()    # after a reconcile: see reconcile.py

    # -- capability --
    def status(self, kind=None):
        """(ok, why) for building tunnels of `kind` (default l2tpv3). Once
        known, a stale answer is returned while a thread of its own asks
        again: the question is a netlink request, and under a storm those
        queue behind every lease being built, which an offer must not."""
        kind = kind or "l2tpv3"
        cached = self._status.get(kind)
        if cached is None:
            return self._probe(kind)
        if time.monotonic() - cached[0] >= STATUS_TTL and \
                kind not in self._probing:
            import threading
            self._probing.add(kind)
            threading.Thread(target=self._probe, args=(kind,),
                             name="status-" + kind, daemon=True).start()
        return cached[1]

    def _probe(self, kind):
        try:
            return self._probe_now(kind)
        finally:
            self._probing.discard(kind)

    def _probe_now(self, kind):
        now = time.monotonic()
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
        if ok and posix.geteuid() != 0:
            why = "running as uid %d (needs CAP_NET_ADMIN)" % posix.geteuid()
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
                self.ovs_call("ensure_service", service, br, rt, bridge_mac(br))
            else:
                _ensure_bridge(rt, br, ours=not service.bridge)
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

    def recheck_services(self):
        """ensure_service checks bridges and filters again, not from memory."""
        self._ready.clear()

    def ovs_call(self, what, *args):
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
                if bridged:
                    procsys.disable_ipv6(lease.ifname)
                rt.setup_port(lease.ifname, bridge_name(service) if bridged and not ovs
                              else None, mtu=lease.mtu)
                if ovs:
                    self.ovs_call("join", lease, service, bridge_name(service))
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
                        self.recheck_services()
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
                self.ovs_call("leave", lease, svc, bridge_name(svc))
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

    def reconcile(self, live, services):
        """Make the kernel match the live leases (a list); returns the
        report and sets foreign_ids (reconcile.py)."""
        from .reconcile import reconcile
        return reconcile(self, live, services)
