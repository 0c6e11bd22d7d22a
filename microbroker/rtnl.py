"""rtnetlink: links, bridges and bridge ports, addresses, routes, tunnel links.

Constants from include/uapi/linux/rtnetlink.h, if_link.h, if_addr.h,
if_tunnel.h and if_bridge.h.
"""

import _socket
import errno
import posix
# The C module struct.py only re-exports (see leases/record.py).
import _struct as struct

from . import netlink as nl

# include/uapi/linux/rtnetlink.h
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_SETLINK = 19
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26

RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_TABLE = 15

RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255
RTPROT_UNSPEC = 0
RTN_UNSPEC = 0
RTN_UNICAST = 1

# include/uapi/linux/if_link.h
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINK = 5
IFLA_MASTER = 10
IFLA_PROTINFO = 12
IFLA_STATS64 = 23
IFLA_LINKINFO = 18
IFLA_EXT_MASK = 29
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_INFO_SLAVE_KIND = 4
IFLA_INFO_SLAVE_DATA = 5
IFLA_BRPORT_ISOLATED = 33
# the IFLA_BR_* of a bridge's IFLA_INFO_DATA
IFLA_BR_MCAST_SNOOPING = 23
RTEXT_FILTER_SKIP_STATS = 1 << 3

# include/uapi/linux/if_tunnel.h
IFLA_GRE_IKEY = 4
IFLA_GRE_OKEY = 5
IFLA_GRE_LOCAL = 6
IFLA_GRE_REMOTE = 7
IFLA_GRE_TTL = 8
IFLA_GRE_IFLAGS = 2
IFLA_GRE_OFLAGS = 3
IFLA_GRE_ENCAP_LIMIT = 11
IFLA_GRE_FLAGS = 13
GRE_KEY = 0x2000          # __be16, sent in network order
IFLA_IPTUN_LOCAL = 2
IFLA_IPTUN_REMOTE = 3
IFLA_IPTUN_TTL = 4
IFLA_IPTUN_FLAGS = 8
IFLA_IPTUN_PROTO = 9
# include/uapi/linux/ip6_tunnel.h: no 8-byte encapsulation-limit option on
# every packet (iproute2's `encaplimit none`)
IP6_TNL_F_IGN_ENCAP_LIMIT = 0x1
# The outer destination of a tunnel link, by kind (GRE and IPTUN numbering).
# kind: (local, remote) attributes inside IFLA_INFO_DATA
_ENDS_ATTR = {"ip6gretap": (IFLA_GRE_LOCAL, IFLA_GRE_REMOTE),
              "ip6tnl": (IFLA_IPTUN_LOCAL, IFLA_IPTUN_REMOTE)}

# include/uapi/linux/if_addr.h
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_FLAGS = 8
IFA_F_NODAD = 0x02

# include/uapi/linux/if.h
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000

AF_BRIDGE = 7
IFINFOMSG = struct.Struct("=BxHiII")
IFADDRMSG = struct.Struct("=BBBBI")
RTMSG = struct.Struct("=BBBBBBBBI")


class Link(nl.Record):
    """local, remote: the outer addresses of ip6gretap/ip6tnl links, else None;
    mcast_snooping: a bridge's (True/False) where the kernel said, else None."""
    __slots__ = ("index", "name", "flags", "mtu", "master", "kind", "address", "remote",
                 "local", "mcast_snooping")

    def __init__(self, index, name, flags, mtu, master, kind, address, remote, local=None,
                 mcast_snooping=None):
        self.index, self.name, self.flags, self.mtu = index, name, flags, mtu
        self.master, self.kind, self.address = master, kind, address
        self.remote, self.local = remote, local
        self.mcast_snooping = mcast_snooping


class Route(nl.Record):
    """dst and gateway as text (None when absent), dst as the network address."""
    __slots__ = ("family", "dst", "dst_len", "gateway", "oif", "table", "type")

    def __init__(self, family, dst, dst_len, gateway, oif, table, type):
        self.family, self.dst, self.dst_len, self.gateway = family, dst, dst_len, gateway
        self.oif, self.table, self.type = oif, table, type


class LinkStats(nl.Record):
    __slots__ = ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes")

    def __init__(self, rx_packets, tx_packets, rx_bytes, tx_bytes):
        self.rx_packets, self.tx_packets = rx_packets, tx_packets
        self.rx_bytes, self.tx_bytes = rx_bytes, tx_bytes


class LinkError(OSError):
    """A kernel refusal naming the interface it concerns."""


class LinkExists(LinkError):
    pass


class NoSuchLink(LinkError):
    pass


def _error(e, what):
    code = e.errno
    if code == errno.EEXIST:
        cls, text = LinkExists, "%s already exists" % what
    elif code == errno.ENODEV:
        cls, text = NoSuchLink, "%s: no such interface" % what
    elif code == errno.EPERM:
        cls, text = LinkError, "%s: permission denied (needs CAP_NET_ADMIN)" % what
    else:
        # e.strerror already names `what` and the extended ack.
        cls, text = LinkError, "%s: %s" % (what, posix.strerror(code))
    if e.ext_msg:
        text += " (%s)" % e.ext_msg
    return cls(code, text)


from microbroker.names import check_ifname  # noqa: E402 (re-exported)


def ifinfomsg(index=0, flags=0, change=0, family=_socket.AF_UNSPEC, itype=0):
    return IFINFOMSG.pack(family, itype, index, flags, change)


def _mac_bytes(mac):
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError("bad MAC address %r" % (mac,))
    return bytes(int(p, 16) for p in parts)


def _mac_str(raw):
    return ":".join("%02x" % b for b in raw)


def _route_of(body):
    family, dst_len, _src_len, _tos, table, _proto, _scope, rtype, _flags = \
        RTMSG.unpack_from(body)
    attrs = nl.parse_attrs(body, RTMSG.size)
    # rtm_table is a u8; RTA_TABLE carries the full id.
    table = nl.get_u32(attrs, RTA_TABLE, table)
    dst, gw = attrs.get(RTA_DST), attrs.get(RTA_GATEWAY)
    if dst is None:   # the default route
        dst = bytes(16 if family == _socket.AF_INET6 else 4)
    return Route(family, nl.addr_text(dst), dst_len, nl.addr_text(gw) if gw else None,
                 nl.get_u32(attrs, RTA_OIF, 0), table, rtype)


_PORT_ATTRS = frozenset((IFLA_IFNAME, IFLA_MTU, IFLA_MASTER))
_LINK_ATTRS = frozenset((IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_LINKINFO))
_BRIDGE_ATTRS = frozenset((IFLA_BR_MCAST_SNOOPING,))


def _link(body):
    _fam, _type, index, flags, _change = IFINFOMSG.unpack_from(body)
    attrs = nl.parse_attrs(body, IFINFOMSG.size, wanted=_LINK_ATTRS)
    kind = remote = local = snooping = None
    if IFLA_LINKINFO in attrs:
        info = nl.parse_attrs(attrs[IFLA_LINKINFO])
        kind = nl.get_str(info, IFLA_INFO_KIND)
        if kind in _ENDS_ATTR and IFLA_INFO_DATA in info:
            data = nl.parse_attrs(info[IFLA_INFO_DATA])
            local, remote = (_ip6(data.get(a)) for a in _ENDS_ATTR[kind])
        elif kind == "bridge" and IFLA_INFO_DATA in info:
            raw = nl.parse_attrs(info[IFLA_INFO_DATA],
                                 wanted=_BRIDGE_ATTRS).get(IFLA_BR_MCAST_SNOOPING)
            snooping = bool(raw[0]) if raw else None
    addr = attrs.get(IFLA_ADDRESS)
    return Link(index, nl.get_str(attrs, IFLA_IFNAME), flags, nl.get_u32(attrs, IFLA_MTU),
                nl.get_u32(attrs, IFLA_MASTER, 0), kind, _mac_str(addr) if addr else None,
                remote, local, snooping)


def _packed6(text):
    version, packed = nl.addr_packed(text)
    if version != 6:
        raise ValueError("%s is not an IPv6 address" % text)
    return packed


def _ip6(raw):
    return nl.addr_text(raw) if raw and len(raw) == 16 else None


class Rtnl(nl.Closing):
    """An rtnetlink connection in the calling thread's network namespace."""

    def __init__(self):
        self.sock = nl.Socket(nl.NETLINK_ROUTE)

    def _do(self, mtype, flags, payload, what):
        try:
            return self.sock.request(mtype, flags, payload, what)
        except nl.NetlinkError as e:
            raise _error(e, what) from None

    # -- reading --
    def links(self):
        """Every link in this netns."""
        payload = ifinfomsg() + nl.attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        try:
            return [_link(body) for _t, body in self.sock.dump(RTM_GETLINK, payload, "links")]
        except nl.NetlinkError as e:
            raise _error(e, "link dump") from None

    def links_of_kind(self, kind):
        """The links of one kind (IFLA_INFO_KIND: "bridge", "ip6gretap"),
        filtered by the kernel (rtnl_dump_ifinfo, 4.x on) and again here,
        for kernels that ignore the filter."""
        return [l for l in self._links_filtered(
            nl.attr_nest(IFLA_LINKINFO, nl.attr_str(IFLA_INFO_KIND, kind)),
            "%s link dump" % kind) if l.kind == kind]

    def links_of_master(self, master):
        """The links whose master is ifindex `master` (an Open vSwitch
        datapath, whose ports the AF_BRIDGE dump leaves out), filtered by
        the kernel (IFLA_MASTER in the dump request) and again here."""
        return [l for l in self._links_filtered(nl.attr_u32(IFLA_MASTER, master),
                                                "link dump of master %d" % master)
                if l.master == master]

    def _links_filtered(self, attr, what):
        """A link dump without stats, with one filter attribute."""
        payload = ifinfomsg() + nl.attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS) + attr
        try:
            return [_link(body) for _t, body in self.sock.dump(RTM_GETLINK, payload, what)]
        except nl.NetlinkError as e:
            raise _error(e, what) from None

    def bridge_ports(self):
        """Every bridge port, from the AF_BRIDGE dump (as `bridge link`):
        a handful of attributes per port instead of a full link message.
        Links without kind, local or remote."""
        out = []
        try:
            for _t, data, start, end in self.sock.dump_parts(
                    RTM_GETLINK, ifinfomsg(family=AF_BRIDGE), "bridge ports"):
                if end - start < IFINFOMSG.size:
                    continue
                _fam, _type, index, flags, _change = IFINFOMSG.unpack_from(data, start)
                a = nl.parse_attrs(data, start + IFINFOMSG.size, end, _PORT_ATTRS)
                out.append(Link(index, nl.get_str(a, IFLA_IFNAME), flags,
                                nl.get_u32(a, IFLA_MTU), nl.get_u32(a, IFLA_MASTER, 0), None,
                                None, None, None))
        except nl.NetlinkError as e:
            raise _error(e, "bridge port dump") from None
        return out

    def link(self, name):
        check_ifname(name)
        payload = ifinfomsg() + nl.attr_str(IFLA_IFNAME, name) + \
            nl.attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        for _t, body in self._do(RTM_GETLINK, 0, payload, name):
            return _link(body)
        raise NoSuchLink(errno.ENODEV, "%s: no such interface" % name)

    def ifindex(self, name):
        return self.link(name).index

    def stats(self, name):
        check_ifname(name)
        payload = ifinfomsg() + nl.attr_str(IFLA_IFNAME, name)
        for _t, body in self._do(RTM_GETLINK, 0, payload, name):
            raw = nl.parse_attrs(body, IFINFOMSG.size).get(IFLA_STATS64)
            if raw:
                # struct rtnl_link_stats64 starts rx_packets, tx_packets, rx_bytes, tx_bytes
                return LinkStats(*struct.unpack_from("=QQQQ", raw))
        return LinkStats(0, 0, 0, 0)

    def port_isolated(self, name):
        """The bridge port's isolated flag, None if name is not a bridge port."""
        index = self.ifindex(name)
        try:
            parts = self.sock.dump(RTM_GETLINK, ifinfomsg(family=AF_BRIDGE), "bridge ports")
            found = None
            for _t, body in parts:
                if IFINFOMSG.unpack_from(body)[2] != index:
                    continue
                attrs = nl.parse_attrs(body, IFINFOMSG.size)
                if IFLA_PROTINFO in attrs:
                    found = bool(nl.get_u8(nl.parse_attrs(attrs[IFLA_PROTINFO]),
                                           IFLA_BRPORT_ISOLATED, 0))
            return found
        except nl.NetlinkError as e:
            raise _error(e, name) from None

    # -- changing links --
    def _set(self, name, flags=0, change=0, attrs=b"", what=None):
        check_ifname(name)
        payload = ifinfomsg(0, flags, change) + nl.attr_str(IFLA_IFNAME, name) + attrs
        self._do(RTM_NEWLINK, 0, payload, what or name)

    def set_up(self, name, up=True):
        # change must name IFF_UP: change 0 would mean "all flags".
        self._set(name, IFF_UP if up else 0, IFF_UP)

    def set_mtu(self, name, mtu):
        if not 68 <= int(mtu) <= 65535:
            raise ValueError("MTU %r out of range" % (mtu,))
        self._set(name, attrs=nl.attr_u32(IFLA_MTU, int(mtu)), what="%s mtu %d" % (name, mtu))

    def set_mac(self, name, mac):
        self._set(name, attrs=nl.attr(IFLA_ADDRESS, _mac_bytes(mac)),
                  what="%s address %s" % (name, mac))

    def set_master(self, name, master):
        """Enslave name to bridge master; master None or "" detaches."""
        index = self.ifindex(master) if master else 0
        self._set(name, attrs=nl.attr_u32(IFLA_MASTER, index),
                  what="%s master %s" % (name, master or "none"))

    def setup_port(self, name, master, mtu=None, mac=None, up=True):
        """MTU, MAC, master and up in one message: the hot path of a lease."""
        attrs = b""
        if mtu:
            attrs += nl.attr_u32(IFLA_MTU, int(mtu))
        if mac:
            attrs += nl.attr(IFLA_ADDRESS, _mac_bytes(mac))
        if master:
            attrs += nl.attr_u32(IFLA_MASTER, self.ifindex(master))
        self._set(name, IFF_UP if up else 0, IFF_UP, attrs, "%s port of %s" % (name, master))

    def set_isolated(self, name, on=True):
        """IFLA_BRPORT_ISOLATED of a bridge port, by name (`ip link set NAME
        type bridge_slave isolated on`): no ifindex lookup first. Kernels
        before 4.18 ignore the attribute."""
        info = nl.attr_str(IFLA_INFO_SLAVE_KIND, "bridge") + nl.attr_nest(
            IFLA_INFO_SLAVE_DATA, nl.attr_u8(IFLA_BRPORT_ISOLATED, 1 if on else 0))
        self._set(name, attrs=nl.attr_nest(IFLA_LINKINFO, info), what="%s isolated" % name)

    def set_mcast_snooping(self, name, on):
        """A bridge's multicast snooping (`ip link set NAME type bridge
        mcast_snooping 0|1`)."""
        info = nl.attr_str(IFLA_INFO_KIND, "bridge") + nl.attr_nest(
            IFLA_INFO_DATA, nl.attr_u8(IFLA_BR_MCAST_SNOOPING, 1 if on else 0))
        self._set(name, attrs=nl.attr_nest(IFLA_LINKINFO, info),
                  what="%s mcast_snooping" % name)

    def _new(self, name, kind, data=b"", extra=b""):
        check_ifname(name)
        info = nl.attr_str(IFLA_INFO_KIND, kind)
        if data:
            info += nl.attr_nest(IFLA_INFO_DATA, data)
        payload = ifinfomsg() + nl.attr_str(IFLA_IFNAME, name) + extra + \
            nl.attr_nest(IFLA_LINKINFO, info)
        self._do(RTM_NEWLINK, nl.NLM_F_CREATE | nl.NLM_F_EXCL, payload, "%s %s" % (kind, name))

    def add_bridge(self, name, mac=None, mcast_snooping=None):
        """A bridge; with a MAC of its own it keeps it, instead of taking the
        lowest of its ports' each time a port comes or goes. mcast_snooping
        None leaves the kernel's default (on)."""
        data = b""
        if mcast_snooping is not None:
            data = nl.attr_u8(IFLA_BR_MCAST_SNOOPING, 1 if mcast_snooping else 0)
        self._new(name, "bridge", data,
                  extra=nl.attr(IFLA_ADDRESS, _mac_bytes(mac)) if mac else b"")

    def add_veth(self, name, peer):
        check_ifname(peer)
        # VETH_INFO_PEER (1) carries an ifinfomsg and the peer's attributes.
        data = nl.attr(1, ifinfomsg() + nl.attr_str(IFLA_IFNAME, peer))
        self._new(name, "veth", data)

    def add_ip6gretap(self, name, local, remote, ikey, okey, ttl=64):
        """An Ethernet-over-GRE-over-IPv6 link with keys both ways."""
        data = (nl.attr(IFLA_GRE_LOCAL, _packed6(local)) +
                nl.attr(IFLA_GRE_REMOTE, _packed6(remote)) +
                nl.attr(IFLA_GRE_IFLAGS, struct.pack("!H", GRE_KEY)) +
                nl.attr(IFLA_GRE_OFLAGS, struct.pack("!H", GRE_KEY)) +
                nl.attr(IFLA_GRE_IKEY, struct.pack("!I", ikey)) +
                nl.attr(IFLA_GRE_OKEY, struct.pack("!I", okey)) +
                nl.attr_u8(IFLA_GRE_TTL, ttl) +
                nl.attr_u32(IFLA_GRE_FLAGS, IP6_TNL_F_IGN_ENCAP_LIMIT))
        self._new(name, "ip6gretap", data)

    def add_ip6tnl(self, name, local, remote, proto=0, ttl=64):
        """An IP-in-IPv6 tunnel; proto 0 carries IPv4 and IPv6 (ip6tnl 'any')."""
        data = (nl.attr(IFLA_IPTUN_LOCAL, _packed6(local)) +
                nl.attr(IFLA_IPTUN_REMOTE, _packed6(remote)) +
                nl.attr_u8(IFLA_IPTUN_TTL, ttl) + nl.attr_u8(IFLA_IPTUN_PROTO, proto) +
                nl.attr_u32(IFLA_IPTUN_FLAGS, IP6_TNL_F_IGN_ENCAP_LIMIT))
        self._new(name, "ip6tnl", data)

    def delete_link(self, name):
        """RTM_DELLINK. l2tpeth links cannot go this way: delete their session."""
        check_ifname(name)
        self._do(RTM_DELLINK, 0, ifinfomsg() + nl.attr_str(IFLA_IFNAME, name), name)

    # -- addresses and routes --
    def add_address(self, name, cidr, nodad=True):
        import ipaddress
        iface = ipaddress.ip_interface(cidr)
        index = self.ifindex(name)
        family = _socket.AF_INET6 if iface.version == 6 else _socket.AF_INET
        payload = IFADDRMSG.pack(family, iface.network.prefixlen,
                                 IFA_F_NODAD if nodad and iface.version == 6 else 0, 0, index)
        payload += nl.attr(IFA_LOCAL, iface.ip.packed) + nl.attr(IFA_ADDRESS, iface.ip.packed)
        self._do(RTM_NEWADDR, nl.NLM_F_CREATE | nl.NLM_F_EXCL, payload, "%s address %s" %
                 (name, cidr))

    def _route(self, mtype, flags, prefix, dev=None, via=None, table=RT_TABLE_MAIN):
        import ipaddress
        net = ipaddress.ip_network(prefix, strict=True)
        family = _socket.AF_INET6 if net.version == 6 else _socket.AF_INET
        if mtype == RTM_DELROUTE:
            # As `ip route del`: match any protocol, scope and type, so a
            # route someone else added goes too.
            proto, scope, rtype = RTPROT_UNSPEC, RT_SCOPE_NOWHERE, RTN_UNSPEC
        else:
            proto, rtype = RTPROT_STATIC, RTN_UNICAST
            scope = RT_SCOPE_LINK if via is None and net.version == 4 else RT_SCOPE_UNIVERSE
        payload = RTMSG.pack(family, net.prefixlen, 0, 0, table, proto, scope, rtype, 0)
        payload += nl.attr(RTA_DST, net.network_address.packed)
        if via:
            payload += nl.attr(RTA_GATEWAY, ipaddress.ip_address(via).packed)
        if dev:
            payload += nl.attr_u32(RTA_OIF, self.ifindex(dev))
        what = "route %s%s%s" % (prefix, " via %s" % via if via else "",
                                  " dev %s" % dev if dev else "")
        self._do(mtype, flags, payload, what)

    def routes(self, family, table=RT_TABLE_MAIN):
        """The unicast and other routes of one family (_socket.AF_INET or
        AF_INET6) in one table; multipath routes are not taken apart."""
        payload = RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        try:
            found = [_route_of(body) for _t, body in self.sock.dump(RTM_GETROUTE, payload,
                                                                 "route dump")]
        except nl.NetlinkError as e:
            raise _error(e, "route dump") from None
        return [r for r in found if r.family == family and r.table == table]

    def add_route(self, prefix, dev=None, via=None, replace=True):
        flags = nl.NLM_F_CREATE | (nl.NLM_F_REPLACE if replace else nl.NLM_F_EXCL)
        self._route(RTM_NEWROUTE, flags, prefix, dev, via)

    def delete_route(self, prefix, dev=None, via=None):
        self._route(RTM_DELROUTE, 0, prefix, dev, via)
