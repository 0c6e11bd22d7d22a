"""The "l2tp" generic-netlink family: tunnels and sessions with kernel sockets.

Constants from include/uapi/linux/l2tp.h; behaviour as net/l2tp/l2tp_netlink.c
and iproute2's ip/ipl2tp.c.
"""

import errno
import posix
# The C module struct.py only re-exports (see leases/record.py).
import _struct as struct

from . import netlink as nl

# include/uapi/linux/l2tp.h
L2TP_GENL_NAME = "l2tp"
L2TP_GENL_VERSION = 1

L2TP_CMD_TUNNEL_CREATE = 1
L2TP_CMD_TUNNEL_DELETE = 2
L2TP_CMD_TUNNEL_MODIFY = 3
L2TP_CMD_TUNNEL_GET = 4
L2TP_CMD_SESSION_CREATE = 5
L2TP_CMD_SESSION_DELETE = 6
L2TP_CMD_SESSION_MODIFY = 7
L2TP_CMD_SESSION_GET = 8

L2TP_ATTR_PW_TYPE = 1
L2TP_ATTR_ENCAP_TYPE = 2
L2TP_ATTR_L2SPEC_TYPE = 5
L2TP_ATTR_L2SPEC_LEN = 6
L2TP_ATTR_PROTO_VERSION = 7
L2TP_ATTR_IFNAME = 8
L2TP_ATTR_CONN_ID = 9
L2TP_ATTR_PEER_CONN_ID = 10
L2TP_ATTR_SESSION_ID = 11
L2TP_ATTR_PEER_SESSION_ID = 12
L2TP_ATTR_UDP_CSUM = 13
L2TP_ATTR_COOKIE = 15
L2TP_ATTR_PEER_COOKIE = 16
L2TP_ATTR_RECV_SEQ = 18
L2TP_ATTR_SEND_SEQ = 19
L2TP_ATTR_LNS_MODE = 20
L2TP_ATTR_IP_SADDR = 24
L2TP_ATTR_IP_DADDR = 25
L2TP_ATTR_UDP_SPORT = 26
L2TP_ATTR_UDP_DPORT = 27
L2TP_ATTR_STATS = 30
L2TP_ATTR_IP6_SADDR = 31
L2TP_ATTR_IP6_DADDR = 32
L2TP_ATTR_UDP_ZERO_CSUM6_TX = 33
L2TP_ATTR_UDP_ZERO_CSUM6_RX = 34

L2TP_ATTR_TX_PACKETS = 1
L2TP_ATTR_TX_BYTES = 2
L2TP_ATTR_TX_ERRORS = 3
L2TP_ATTR_RX_PACKETS = 4
L2TP_ATTR_RX_BYTES = 5
L2TP_ATTR_RX_SEQ_DISCARDS = 6
L2TP_ATTR_RX_OOS_PACKETS = 7
L2TP_ATTR_RX_ERRORS = 8

L2TP_PWTYPE_ETH = 0x0005
L2TP_ENCAPTYPE_UDP = 0
L2TP_ENCAPTYPE_IP = 1
L2TP_L2SPECTYPE_NONE = 0
L2TP_L2SPECTYPE_DEFAULT = 1

ENCAPS = {"udp": L2TP_ENCAPTYPE_UDP, "ip": L2TP_ENCAPTYPE_IP}
ENCAP_NAMES = {v: k for k, v in ENCAPS.items()}

MODULES = ("l2tp_netlink", "l2tp_eth", "l2tp_ip6", "l2tp_ip")
MODPROBE_HINT = "modprobe l2tp_netlink l2tp_eth l2tp_ip6 l2tp_ip"

class Stats(nl.Record):
    __slots__ = ("tx_packets", "tx_bytes", "tx_errors", "rx_packets", "rx_bytes",
                 "rx_errors")

    def __init__(self, tx_packets, tx_bytes, tx_errors, rx_packets, rx_bytes, rx_errors):
        self.tx_packets, self.tx_bytes, self.tx_errors = tx_packets, tx_bytes, tx_errors
        self.rx_packets, self.rx_bytes, self.rx_errors = rx_packets, rx_bytes, rx_errors


class Tunnel(nl.Record):
    __slots__ = ("tunnel_id", "peer_tunnel_id", "encap", "local", "remote", "udp_sport",
                 "udp_dport", "stats")

    def __init__(self, tunnel_id, peer_tunnel_id, encap, local, remote, udp_sport,
                 udp_dport, stats):
        self.tunnel_id, self.peer_tunnel_id, self.encap = tunnel_id, peer_tunnel_id, encap
        self.local, self.remote = local, remote
        self.udp_sport, self.udp_dport, self.stats = udp_sport, udp_dport, stats


class Session(nl.Record):
    __slots__ = ("tunnel_id", "session_id", "peer_tunnel_id", "peer_session_id", "pw_type",
                 "ifname", "cookie", "peer_cookie", "stats")

    def __init__(self, tunnel_id, session_id, peer_tunnel_id, peer_session_id, pw_type,
                 ifname, cookie, peer_cookie, stats):
        self.tunnel_id, self.session_id = tunnel_id, session_id
        self.peer_tunnel_id, self.peer_session_id = peer_tunnel_id, peer_session_id
        self.pw_type, self.ifname = pw_type, ifname
        self.cookie, self.peer_cookie, self.stats = cookie, peer_cookie, stats


ZERO_STATS = Stats(0, 0, 0, 0, 0, 0)
# Every attribute a dump reply may carry that we read, counters aside.
_NO_STATS = frozenset(range(1, 35)) - {L2TP_ATTR_STATS}
_REMOTE_ATTRS = frozenset((L2TP_ATTR_CONN_ID, L2TP_ATTR_IP_DADDR, L2TP_ATTR_IP6_DADDR))
_ID_ATTRS = frozenset((L2TP_ATTR_CONN_ID, L2TP_ATTR_SESSION_ID))


class L2TPError(OSError):
    """A kernel refusal, named after the tunnel/session it concerns."""


class NotAvailable(L2TPError):
    """The l2tp family or one of its modules is missing in this kernel."""


class Exists(L2TPError):
    pass


class NotFound(L2TPError):
    pass


class PermissionDenied(L2TPError):
    pass


def _error(e, what):
    """Turn a NetlinkError into the exception a user can act on."""
    code = e.errno
    if code == errno.EEXIST or code == errno.EADDRINUSE:
        cls = Exists
        text = "%s already exists" % what
    elif code == errno.ENODEV:
        cls = NotFound
        text = "%s not found" % what
    elif code == errno.EPERM:
        cls = PermissionDenied
        text = "%s: permission denied (needs CAP_NET_ADMIN)" % what
    elif code == errno.EPROTONOSUPPORT:
        cls = NotAvailable
        text = "%s: kernel lacks a module for this (%s)" % (what, MODPROBE_HINT)
    elif code == errno.EADDRNOTAVAIL:
        cls = L2TPError
        text = "%s: local address not configured here (or still tentative)" % what
    else:
        cls = L2TPError
        # e.strerror already names `what` and the extended ack.
        text = "%s: %s" % (what, posix.strerror(code))
    if e.ext_msg:
        text += " (%s)" % e.ext_msg
    return cls(code, text)


def _stats(attrs):
    raw = attrs.get(L2TP_ATTR_STATS)
    if raw is None:
        return ZERO_STATS
    s = nl.parse_attrs(raw)
    return Stats(nl.get_u64(s, L2TP_ATTR_TX_PACKETS, 0), nl.get_u64(s, L2TP_ATTR_TX_BYTES, 0),
                 nl.get_u64(s, L2TP_ATTR_TX_ERRORS, 0), nl.get_u64(s, L2TP_ATTR_RX_PACKETS, 0),
                 nl.get_u64(s, L2TP_ATTR_RX_BYTES, 0), nl.get_u64(s, L2TP_ATTR_RX_ERRORS, 0))


def _tunnel(attrs):
    local = remote = None
    if L2TP_ATTR_IP6_SADDR in attrs:
        local = nl.addr_text(attrs[L2TP_ATTR_IP6_SADDR])
        remote = nl.addr_text(attrs.get(L2TP_ATTR_IP6_DADDR, b""))
    elif L2TP_ATTR_IP_SADDR in attrs:
        local = nl.addr_text(attrs[L2TP_ATTR_IP_SADDR])
        remote = nl.addr_text(attrs.get(L2TP_ATTR_IP_DADDR, b""))
    encap = nl.get_u16(attrs, L2TP_ATTR_ENCAP_TYPE)
    return Tunnel(nl.get_u32(attrs, L2TP_ATTR_CONN_ID), nl.get_u32(attrs, L2TP_ATTR_PEER_CONN_ID),
                  ENCAP_NAMES.get(encap, str(encap)), local, remote,
                  nl.get_u16(attrs, L2TP_ATTR_UDP_SPORT, 0), nl.get_u16(attrs, L2TP_ATTR_UDP_DPORT, 0),
                  _stats(attrs))


def _session(attrs):
    return Session(nl.get_u32(attrs, L2TP_ATTR_CONN_ID), nl.get_u32(attrs, L2TP_ATTR_SESSION_ID),
                   nl.get_u32(attrs, L2TP_ATTR_PEER_CONN_ID),
                   nl.get_u32(attrs, L2TP_ATTR_PEER_SESSION_ID),
                   nl.get_u16(attrs, L2TP_ATTR_PW_TYPE), nl.get_str(attrs, L2TP_ATTR_IFNAME),
                   attrs.get(L2TP_ATTR_COOKIE), attrs.get(L2TP_ATTR_PEER_COOKIE), _stats(attrs))


def _check_id(name, v):
    if not isinstance(v, int) or not 0 < v <= 0xFFFFFFFF:
        raise ValueError("%s must be 1..4294967295, not %r" % (name, v))


from microbroker.names import check_ifname as _check_ifname  # noqa: E402


def _check_cookie(name, c):
    if c is not None and len(c) not in (4, 8):
        raise ValueError("%s must be 4 or 8 bytes" % name)


def tunnel_attrs(tunnel_id, peer_tunnel_id, local, remote, encap="ip", udp_sport=0,
                 udp_dport=0, udp_csum=False):
    """Attributes of TUNNEL_CREATE, as ipl2tp.c orders them."""
    _check_id("tunnel_id", tunnel_id)
    _check_id("peer_tunnel_id", peer_tunnel_id)
    if encap not in ENCAPS:
        raise ValueError("encap must be 'ip' or 'udp', not %r" % (encap,))
    version, la = nl.addr_packed(local)
    remote_version, ra = nl.addr_packed(remote)
    if remote_version != version:
        raise ValueError("local %s and remote %s differ in family" % (local, remote))
    a = [nl.attr_u32(L2TP_ATTR_CONN_ID, tunnel_id),
         nl.attr_u32(L2TP_ATTR_PEER_CONN_ID, peer_tunnel_id),
         nl.attr_u8(L2TP_ATTR_PROTO_VERSION, 3),
         nl.attr_u16(L2TP_ATTR_ENCAP_TYPE, ENCAPS[encap])]
    if encap == "udp":
        if not (0 < udp_sport < 65536 and 0 < udp_dport < 65536):
            raise ValueError("encap udp needs both ports")
        a.append(nl.attr_u16(L2TP_ATTR_UDP_SPORT, udp_sport))
        a.append(nl.attr_u16(L2TP_ATTR_UDP_DPORT, udp_dport))
        if version == 4:
            if udp_csum:
                a.append(nl.attr_u8(L2TP_ATTR_UDP_CSUM, 1))
        elif not udp_csum:
            a.append(nl.attr_flag(L2TP_ATTR_UDP_ZERO_CSUM6_TX))
            a.append(nl.attr_flag(L2TP_ATTR_UDP_ZERO_CSUM6_RX))
    if version == 6:
        a.append(nl.attr(L2TP_ATTR_IP6_SADDR, la))
        a.append(nl.attr(L2TP_ATTR_IP6_DADDR, ra))
    else:
        a.append(nl.attr(L2TP_ATTR_IP_SADDR, la))
        a.append(nl.attr(L2TP_ATTR_IP_DADDR, ra))
    return b"".join(a)


def session_attrs(tunnel_id, session_id, peer_session_id, ifname=None, cookie=None,
                  peer_cookie=None, l2spec=L2TP_L2SPECTYPE_DEFAULT):
    """Attributes of SESSION_CREATE for an Ethernet pseudo-wire."""
    _check_id("tunnel_id", tunnel_id)
    _check_id("session_id", session_id)
    _check_id("peer_session_id", peer_session_id)
    _check_cookie("cookie", cookie)
    _check_cookie("peer_cookie", peer_cookie)
    a = [nl.attr_u32(L2TP_ATTR_CONN_ID, tunnel_id),
         nl.attr_u32(L2TP_ATTR_PEER_CONN_ID, 0),
         nl.attr_u32(L2TP_ATTR_SESSION_ID, session_id),
         nl.attr_u32(L2TP_ATTR_PEER_SESSION_ID, peer_session_id),
         nl.attr_u16(L2TP_ATTR_PW_TYPE, L2TP_PWTYPE_ETH),
         nl.attr_u8(L2TP_ATTR_L2SPEC_TYPE, l2spec),
         # Current kernels ignore the length, older ones want it to match the type.
         nl.attr_u8(L2TP_ATTR_L2SPEC_LEN, 4 if l2spec == L2TP_L2SPECTYPE_DEFAULT else 0)]
    if cookie:
        a.append(nl.attr(L2TP_ATTR_COOKIE, bytes(cookie)))
    if peer_cookie:
        a.append(nl.attr(L2TP_ATTR_PEER_COOKIE, bytes(peer_cookie)))
    if ifname is not None:
        _check_ifname(ifname)
        a.append(nl.attr_str(L2TP_ATTR_IFNAME, ifname))
    return b"".join(a)


class L2TP(nl.Closing):
    """A connection to the l2tp family in the calling thread's network namespace."""

    def __init__(self):
        try:
            self.sock = nl.GenlSocket(L2TP_GENL_NAME, L2TP_GENL_VERSION)
        except nl.FamilyNotFound:
            raise NotAvailable(errno.ENOENT, "the kernel has no l2tp netlink family; load the "
                               "modules: " + MODPROBE_HINT)

    def _do(self, cmd, attrs, what, flags=0):
        try:
            return self.sock.request_cmd(cmd, attrs, flags, what)
        except nl.NetlinkError as e:
            raise _error(e, what) from None

    def check_access(self):
        """Raise unless this process may drive l2tp here, in one round trip.

        Tunnel 0 never exists: a GET of it answers ENODEV when we are
        allowed and EPERM when not, without the dump of every tunnel.
        """
        try:
            self._do(L2TP_CMD_TUNNEL_GET, nl.attr_u32(L2TP_ATTR_CONN_ID, 0), "l2tp access")
        except NotFound:
            pass

    # -- tunnels --
    def create_tunnel(self, tunnel_id, peer_tunnel_id, local, remote, encap="ip",
                      udp_sport=0, udp_dport=0, udp_csum=False):
        attrs = tunnel_attrs(tunnel_id, peer_tunnel_id, local, remote, encap, udp_sport,
                             udp_dport, udp_csum)
        self._do(L2TP_CMD_TUNNEL_CREATE, attrs, "l2tp tunnel %d" % tunnel_id)

    def delete_tunnel(self, tunnel_id):
        """Delete a tunnel and with it every session. The kernel finishes later."""
        _check_id("tunnel_id", tunnel_id)
        self._do(L2TP_CMD_TUNNEL_DELETE, nl.attr_u32(L2TP_ATTR_CONN_ID, tunnel_id),
                 "l2tp tunnel %d" % tunnel_id)

    def get_tunnel(self, tunnel_id):
        _check_id("tunnel_id", tunnel_id)
        replies = self._do(L2TP_CMD_TUNNEL_GET, nl.attr_u32(L2TP_ATTR_CONN_ID, tunnel_id),
                           "l2tp tunnel %d" % tunnel_id)
        for attrs in replies:
            return _tunnel(attrs)
        raise NotFound(errno.ENODEV, "l2tp tunnel %d not found" % tunnel_id)

    def tunnels(self, stats=True):
        """Every tunnel in this netns (a dump ignores filters: callers filter).

        stats=False leaves the counters out (as zeros): parsing them is most
        of a large dump's cost, and reconcile does not need them.
        """
        wanted = None if stats else _NO_STATS
        try:
            return [_tunnel(a) for a in self.sock.dump_cmd(L2TP_CMD_TUNNEL_GET, b"",
                                                            "l2tp tunnel dump", wanted)]
        except nl.NetlinkError as e:
            raise _error(e, "l2tp tunnel dump") from None

    def tunnel_remotes(self):
        """{tunnel_id: remote address} of every tunnel: what reconcile
        compares, from a dump that copies only those two attributes of each
        (a third of tunnels()' time at a thousand tunnels)."""
        out = {}
        try:
            for a in self.sock.dump_cmd(L2TP_CMD_TUNNEL_GET, b"", "l2tp tunnel dump",
                                        _REMOTE_ATTRS):
                raw = a.get(L2TP_ATTR_IP6_DADDR) or a.get(L2TP_ATTR_IP_DADDR)
                out[nl.get_u32(a, L2TP_ATTR_CONN_ID)] = nl.addr_text(raw) if raw else None
        except nl.NetlinkError as e:
            raise _error(e, "l2tp tunnel dump") from None
        return out

    # -- sessions --
    def create_session(self, tunnel_id, session_id, peer_session_id, ifname=None, cookie=None,
                       peer_cookie=None, l2spec=L2TP_L2SPECTYPE_DEFAULT):
        attrs = session_attrs(tunnel_id, session_id, peer_session_id, ifname, cookie,
                              peer_cookie, l2spec)
        what = "l2tp session %d in tunnel %d" % (session_id, tunnel_id)
        if ifname:
            what += " (%s)" % ifname
        self._do(L2TP_CMD_SESSION_CREATE, attrs, what)

    def delete_session(self, tunnel_id, session_id):
        _check_id("tunnel_id", tunnel_id)
        _check_id("session_id", session_id)
        self._do(L2TP_CMD_SESSION_DELETE,
                 nl.attr_u32(L2TP_ATTR_CONN_ID, tunnel_id) +
                 nl.attr_u32(L2TP_ATTR_SESSION_ID, session_id),
                 "l2tp session %d in tunnel %d" % (session_id, tunnel_id))

    def delete_session_by_ifname(self, ifname):
        _check_ifname(ifname)
        self._do(L2TP_CMD_SESSION_DELETE, nl.attr_str(L2TP_ATTR_IFNAME, ifname),
                 "l2tp session on %s" % ifname)

    def get_session(self, tunnel_id, session_id):
        _check_id("tunnel_id", tunnel_id)
        _check_id("session_id", session_id)
        what = "l2tp session %d in tunnel %d" % (session_id, tunnel_id)
        for attrs in self._do(L2TP_CMD_SESSION_GET,
                              nl.attr_u32(L2TP_ATTR_CONN_ID, tunnel_id) +
                              nl.attr_u32(L2TP_ATTR_SESSION_ID, session_id), what):
            return _session(attrs)
        raise NotFound(errno.ENODEV, what + " not found")

    def sessions(self, stats=True):
        wanted = None if stats else _NO_STATS
        try:
            return [_session(a) for a in self.sock.dump_cmd(L2TP_CMD_SESSION_GET, b"",
                                                             "l2tp session dump", wanted)]
        except nl.NetlinkError as e:
            raise _error(e, "l2tp session dump") from None


    def session_ids(self):
        """{(tunnel_id, session_id)} of every session."""
        try:
            return {(nl.get_u32(a, L2TP_ATTR_CONN_ID), nl.get_u32(a, L2TP_ATTR_SESSION_ID))
                    for a in self.sock.dump_cmd(L2TP_CMD_SESSION_GET, b"",
                                                "l2tp session dump", _ID_ATTRS)}
        except nl.NetlinkError as e:
            raise _error(e, "l2tp session dump") from None


def available():
    """(True, "") if this process can drive l2tp here, else (False, why)."""
    try:
        with L2TP() as l2:
            l2.check_access()
    except NotAvailable as e:
        return False, e.strerror
    except L2TPError as e:
        return False, e.strerror
    except OSError as e:
        return False, "netlink: %s" % e.strerror
    return True, ""
