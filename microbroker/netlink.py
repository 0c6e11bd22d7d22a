"""Netlink framing: sockets, messages, attributes, ACKs, dumps, genl families.

Layouts from include/uapi/linux/netlink.h and genetlink.h. All integers are in
host byte order unless a caller packs network-order bytes itself.
"""

import _socket
import errno as _errno
import posix
# The C module struct.py only re-exports (see leases/record.py).
import _struct as struct

# include/uapi/linux/netlink.h
NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200

NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

NLMSGERR_ATTR_MSG = 1
NLMSGERR_ATTR_OFFS = 2

# include/uapi/linux/genetlink.h
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_VERSION = 3
CTRL_ATTR_MAXATTR = 5
CTRL_ATTR_MCAST_GROUPS = 7

NLMSGHDR = struct.Struct("=IHHII")
GENLMSGHDR = struct.Struct("=BBH")
NLATTR = struct.Struct("=HH")

RECV_SIZE = 65536


def align(n):
    return (n + 3) & ~3


class NetlinkError(OSError):
    """The kernel answered NLMSG_ERROR; errno and the extended-ack text if any."""

    def __init__(self, err, msg="", what=""):
        self.ext_msg = msg
        self.what = what
        text = posix.strerror(err)
        if what:
            text = "%s: %s" % (what, text)
        if msg:
            text = "%s (%s)" % (text, msg)
        super().__init__(err, text)


# ---- attributes -----------------------------------------------------------

def attr(atype, payload):
    """One attribute, padded to 4 bytes."""
    n = NLATTR.size + len(payload)
    return NLATTR.pack(n, atype) + payload + b"\0" * (align(n) - n)


def attr_u8(atype, v):
    return attr(atype, struct.pack("=B", v))


def attr_u16(atype, v):
    return attr(atype, struct.pack("=H", v))


def attr_u32(atype, v):
    return attr(atype, struct.pack("=I", v))


def attr_u64(atype, v):
    return attr(atype, struct.pack("=Q", v))


def attr_str(atype, s):
    if isinstance(s, str):
        s = s.encode()
    return attr(atype, s + b"\0")


def attr_flag(atype):
    return attr(atype, b"")


def attr_nest(atype, *children):
    return attr(atype | NLA_F_NESTED, b"".join(children))


def parse_attrs(data, offset=0, end=None, wanted=None):
    """Attributes in data[offset:end] as {type: payload bytes}; the last of
    a type wins, or with `wanted` the first.

    Types are masked: the kernel sends some nests without NLA_F_NESTED.
    wanted, a set of types, skips copying the rest and stops once each of
    them is found (the kernel sends a top-level type once): a link dump
    carries dozens of attributes per link and reconcile needs three.
    """
    out = {}
    if end is None:
        end = len(data)
    unpack = NLATTR.unpack_from
    if wanted is None:
        while offset + 4 <= end:
            n, atype = unpack(data, offset)
            if n < 4 or offset + n > end:
                break
            out[atype & NLA_TYPE_MASK] = bytes(data[offset + 4:offset + n])
            offset += (n + 3) & ~3
        return out
    left = len(wanted)
    while offset + 4 <= end:
        n, atype = unpack(data, offset)
        if n < 4 or offset + n > end:
            break
        atype &= NLA_TYPE_MASK
        if atype in wanted and atype not in out:
            out[atype] = bytes(data[offset + 4:offset + n])
            left -= 1
            if not left:
                break
        offset += (n + 3) & ~3
    return out


def parse_attr_list(data):
    """Attributes as a list of (type, payload), for arrays such as nests of nests."""
    out = []
    offset = 0
    while offset + NLATTR.size <= len(data):
        n, atype = NLATTR.unpack_from(data, offset)
        if n < NLATTR.size or offset + n > len(data):
            break
        out.append((atype & NLA_TYPE_MASK, data[offset + NLATTR.size:offset + n]))
        offset += align(n)
    return out


def get_u8(attrs, atype, default=None):
    v = attrs.get(atype)
    return v[0] if v else default


def get_u16(attrs, atype, default=None):
    v = attrs.get(atype)
    return struct.unpack_from("=H", v)[0] if v and len(v) >= 2 else default


_U32 = struct.Struct("=I")


def get_u32(attrs, atype, default=None):
    v = attrs.get(atype)
    return _U32.unpack_from(v)[0] if v and len(v) >= 4 else default


def get_u64(attrs, atype, default=None):
    v = attrs.get(atype)
    return struct.unpack_from("=Q", v)[0] if v and len(v) >= 8 else default


def get_str(attrs, atype, default=None):
    v = attrs.get(atype)
    if v is None:
        return default
    return v.split(b"\0", 1)[0].decode(errors="replace")


def addr_packed(text):
    """(4 or 6, packed bytes) of an IPv4 or IPv6 address written as text,
    by inet_pton (ipaddress costs a CGI a fifth of its start); ValueError
    for anything else."""
    if not isinstance(text, str):
        raise ValueError("%r is not an IPv4 or IPv6 address" % (text,))
    family = _socket.AF_INET6 if ":" in text else _socket.AF_INET
    try:
        return (6 if family == _socket.AF_INET6 else 4), _socket.inet_pton(family, text)
    except OSError:
        raise ValueError("%r is not an IPv4 or IPv6 address" % (text,)) from None


def addr_text(raw):
    """An IPv4 or IPv6 address as ipaddress writes it, by inet_ntop (C):
    dumps of a thousand tunnels or routes spend most of their time here
    otherwise. None for anything else."""
    if len(raw) == 4:
        return _socket.inet_ntop(_socket.AF_INET, raw)
    if len(raw) != 16:
        return None
    text = _socket.inet_ntop(_socket.AF_INET6, raw)
    if "." in text:         # inet_ntop writes ::ffff:a.b.c.d, ipaddress hex words
        import ipaddress
        return str(ipaddress.IPv6Address(raw))
    return text


# ---- what dumps are parsed into ---------------------------------------------

class Record:
    """A kernel object as parsed: its fields by name (a subclass lists
    them in __slots__ and sets each in its __init__), equal, hashed and
    shown by value. What namedtuple gave, but collections and its imports
    would be a tenth of serve's start."""

    __slots__ = ()

    def values(self):
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self.values() == other.values()

    def __hash__(self):
        return hash(self.values())

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__, ", ".join(
            "%s=%r" % (n, getattr(self, n)) for n in self.__slots__))


# ---- messages -------------------------------------------------------------

def message(mtype, flags, seq, payload, pid=0):
    return NLMSGHDR.pack(NLMSGHDR.size + len(payload), mtype, flags, seq, pid) + payload


def split_messages(data):
    """Yield (type, flags, seq, start, end) for each message in one
    datagram: its payload is data[start:end], not copied (a dump's parts
    are parsed in place)."""
    offset, size = 0, len(data)
    head, hsize = NLMSGHDR.unpack_from, NLMSGHDR.size
    while offset + hsize <= size:
        n, mtype, flags, seq, _pid = head(data, offset)
        if n < hsize or offset + n > size:
            break
        yield mtype, flags, seq, offset + hsize, offset + n
        offset += align(n)


def parse_error(flags, payload):
    """(errno, extended-ack message) from an NLMSG_ERROR payload; errno 0 is an ACK."""
    (err,) = struct.unpack_from("=i", payload)
    ext = ""
    if flags & NLM_F_ACK_TLVS:
        if flags & NLM_F_CAPPED:
            start = 4 + NLMSGHDR.size
        else:
            (inner_len,) = struct.unpack_from("=I", payload, 4)
            start = 4 + align(inner_len)
        tlvs = parse_attrs(bytes(payload), start)
        ext = get_str(tlvs, NLMSGERR_ATTR_MSG, "")
    return -err, ext


class Closing:
    """close() closes self.sock, and so does leaving a `with` block: the
    netlink socket here, and every connection built on one."""

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Socket(Closing):
    """A netlink socket bound to a kernel-assigned port, with request/ACK/dump helpers."""

    def __init__(self, protocol):
        self.sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC,
                                  protocol)
        try:
            self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, 1 << 20)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            # Success ACKs need no copy of our request.
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        except OSError:
            pass  # old kernels: errors then come without text, that is all
        # Port id 0: the kernel picks one, so two sockets in one process don't clash.
        self.sock.bind((0, 0))
        self.seq = int.from_bytes(posix.urandom(2), "little")

    def _next_seq(self):
        self.seq = (self.seq + 1) & 0xFFFFFFFF or 1
        return self.seq

    def send(self, mtype, flags, payload):
        seq = self._next_seq()
        self.sock.send(message(mtype, flags, seq, payload))
        return seq

    def _replies(self, seq):
        """Messages answering seq, one datagram at a time; stale ones dropped."""
        while True:
            data = self.sock.recv(RECV_SIZE)
            for mtype, flags, mseq, start, end in split_messages(data):
                if mseq != seq:
                    continue
                yield mtype, flags, data[start:end]

    def request(self, mtype, flags, payload, what=""):
        """Send with NLM_F_ACK; return the reply payloads (often none) once ACKed."""
        seq = self.send(mtype, flags | NLM_F_REQUEST | NLM_F_ACK, payload)
        replies = []
        for rtype, rflags, body in self._replies(seq):
            if rtype == NLMSG_ERROR:
                err, ext = parse_error(rflags, body)
                if err:
                    raise NetlinkError(err, ext, what)
                return replies
            if rtype == NLMSG_DONE:
                return replies
            if rtype == NLMSG_NOOP:
                continue
            replies.append((rtype, bytes(body)))

    def dump_parts(self, mtype, payload, what=""):
        """Yield (type, datagram, start, end) of each part of a multi-part
        dump until NLMSG_DONE; the part is datagram[start:end], not copied:
        a dump of a thousand tunnels spent as long copying and re-yielding
        its parts as the kernel takes to write them."""
        seq = self.send(mtype, NLM_F_REQUEST | NLM_F_DUMP, payload)
        while True:
            data = self.sock.recv(RECV_SIZE)
            for rtype, rflags, mseq, start, end in split_messages(data):
                if mseq != seq:             # stale ones dropped
                    continue
                if rtype == NLMSG_DONE:
                    if end - start >= 4:
                        (err,) = struct.unpack_from("=i", data, start)
                        if err < 0:
                            raise NetlinkError(-err, "", what)
                    return
                if rtype == NLMSG_ERROR:
                    err, ext = parse_error(rflags, data[start:end])
                    if err:
                        raise NetlinkError(err, ext, what)
                    return
                if rtype != NLMSG_NOOP:
                    yield rtype, data, start, end

    def dump(self, mtype, payload, what=""):
        """Yield (type, payload) of each part of a multi-part dump until NLMSG_DONE."""
        for rtype, data, start, end in self.dump_parts(mtype, payload, what):
            yield rtype, data[start:end]


# ---- generic netlink -------------------------------------------------------

def genl_header(cmd, version):
    return GENLMSGHDR.pack(cmd, version, 0)


class FamilyNotFound(NetlinkError):
    """The generic-netlink family is not registered (module not loaded)."""


_family_cache = {}


class GenlSocket(Socket):
    """A NETLINK_GENERIC socket speaking to one family, resolved by name once."""

    def __init__(self, family, version=1):
        super().__init__(NETLINK_GENERIC)
        self.family_name = family
        self.version = version
        try:
            self.family_id = resolve_family(self, family)
        except Exception:
            self.close()
            raise

    def request_cmd(self, cmd, attrs=b"", flags=0, what=""):
        """Send cmd; return the attribute dicts of the replies."""
        payload = genl_header(cmd, self.version) + attrs
        out = []
        for _t, body in self.request(self.family_id, flags, payload, what):
            out.append(parse_attrs(body, GENLMSGHDR.size))
        return out

    def dump_cmd(self, cmd, attrs=b"", what="", wanted=None):
        payload = genl_header(cmd, self.version) + attrs
        for _t, data, start, end in self.dump_parts(self.family_id, payload, what):
            yield parse_attrs(data, start + GENLMSGHDR.size, end, wanted)


def resolve_family(sock, name):
    """Family id for name via CTRL_CMD_GETFAMILY, cached per netns-agnostic name.

    Family ids are global (not per netns), so a process-wide cache is right.
    Asking also makes the kernel try to autoload the module.
    """
    if name in _family_cache:
        return _family_cache[name]
    payload = genl_header(CTRL_CMD_GETFAMILY, 2) + attr_str(CTRL_ATTR_FAMILY_NAME, name)
    try:
        replies = sock.request(GENL_ID_CTRL, 0, payload, "genl family %r" % name)
    except NetlinkError as e:
        if e.errno == _errno.ENOENT:
            raise FamilyNotFound(e.errno, "", "generic netlink family %r not registered" % name)
        raise
    for _t, body in replies:
        attrs = parse_attrs(body, GENLMSGHDR.size)
        fid = get_u16(attrs, CTRL_ATTR_FAMILY_ID)
        if fid is not None:
            _family_cache[name] = fid
            return fid
    raise FamilyNotFound(_errno.ENOENT, "", "generic netlink family %r: no id in reply" % name)
