"""Addresses and pools: parsing and formatting IPv4/IPv6 text, prefixes,
and the items of a lease pool (the prefixes or /32s the broker hands out).

Own parsing instead of `ipaddress` or even `_socket`: each costs more
start-up time than the rest of a CGI request's address handling.
"""


_HEXDIGITS = frozenset("0123456789abcdefABCDEF")


def _v4(text):
    parts = text.split(".")
    # No shorthand forms, no leading zeros (some libcs read them as octal).
    if len(parts) != 4 or any(
            not p.isdigit() or not p.isascii() or len(p) > 3
            or (len(p) > 1 and p[0] == "0") or int(p) > 255 for p in parts):
        raise ValueError("not an IPv4 address: %r" % text)
    return bytes(int(p) for p in parts)


def _v6(text):
    if text.count("::") > 1:
        raise ValueError("not an IPv6 address: %r" % text)
    head, gap, tail = text.partition("::")
    groups = []
    for side in (head, tail):
        g = side.split(":") if side else []
        groups.append(g)
    tail_v4 = b""
    last = groups[1] if gap else groups[0]
    if last and "." in last[-1]:
        tail_v4 = _v4(last.pop())
    words = []
    for g in groups:
        w = []
        for x in g:
            if not 1 <= len(x) <= 4 or not set(x) <= _HEXDIGITS:
                raise ValueError("not an IPv6 address: %r" % text)
            w.append(int(x, 16))
        words.append(w)
    n = len(words[0]) + len(words[1]) + (2 if tail_v4 else 0)
    if gap:
        if n > 7:
            raise ValueError("not an IPv6 address: %r" % text)
        words = words[0] + [0] * (8 - n) + words[1]
    else:
        if n != 8:
            raise ValueError("not an IPv6 address: %r" % text)
        words = words[0]
    return b"".join(w.to_bytes(2, "big") for w in words) + tail_v4


def parse_addr(text):
    """Return (family, packed bytes) of an IPv4/IPv6 address, IPv4-mapped
    IPv6 turned into IPv4; raise ValueError."""
    if not isinstance(text, str) or not text or len(text) > 45:
        raise ValueError("not an IP address: %r" % (text,))
    if text[:1] == "[" and text[-1:] == "]":
        text = text[1:-1]
    if ":" in text:
        if "%" in text:
            raise ValueError("scoped address not allowed: %r" % text)
        packed = _v6(text)
        if packed[:12] == b"\0" * 10 + b"\xff\xff":
            return 4, packed[12:]
        return 6, packed
    return 4, _v4(text)


def format_addr(family, packed):
    """Canonical text (RFC 5952 for IPv6: lowercase, shortest, the first
    longest run of two or more zero groups as ::)."""
    if family == 4:
        return "%d.%d.%d.%d" % tuple(packed)
    words = [int.from_bytes(packed[i:i + 2], "big") for i in range(0, 16, 2)]
    best, best_len, i = -1, 1, 0
    while i < 8:
        if words[i] == 0:
            j = i
            while j < 8 and words[j] == 0:
                j += 1
            if j - i > best_len:
                best, best_len = i, j - i
            i = j
        else:
            i += 1
    hexes = ["%x" % w for w in words]
    if best < 0:
        return ":".join(hexes)
    return ":".join(hexes[:best]) + "::" + ":".join(hexes[best + best_len:])


def norm_addr(text):
    """Canonical text form; IPv4-mapped IPv6 becomes IPv4. ValueError."""
    return format_addr(*parse_addr(text))


def addr_kind(family, packed):
    """'' for an ordinary unicast address, else why it cannot be a tunnel
    endpoint."""
    if packed == b"\0" * len(packed):
        return "unspecified"
    if family == 6:
        if packed[0] == 0xFF:
            return "multicast"
        if packed[0] == 0xFE and packed[1] & 0xC0 == 0x80:
            return "link-local"
    else:
        if 224 <= packed[0] <= 239 or packed == b"\xff" * 4:
            return "multicast or broadcast"
        if packed[0] == 169 and packed[1] == 254:
            return "link-local"
    return ""


def parse_prefix(text):
    """'fc00::/8' -> (family, int network, prefix length); ValueError."""
    addr, slash, plen = text.partition("/")
    family, packed = parse_addr(addr)
    bits = 32 if family == 4 else 128
    mapped = ":" in addr and family == 4
    if not slash:
        n = bits
    elif plen.isdigit() and len(plen) <= 3 and \
            int(plen) <= (128 if mapped else bits):
        n = int(plen)
        # A mapped address with a v6 prefix length means the v4 part.
        if mapped:
            if n < 96:
                raise ValueError("prefix length too short for %r" % text)
            n -= 96
    else:
        raise ValueError("bad prefix length in %r" % text)
    value = int.from_bytes(packed, "big")
    mask = ((1 << n) - 1) << (bits - n)
    if value & ~mask & ((1 << bits) - 1):
        raise ValueError("host bits set in %r" % text)
    return family, value, n


def in_prefixes(family, packed, prefixes):
    value = int.from_bytes(packed, "big")
    bits = 32 if family == 4 else 128
    for pfam, net, n in prefixes:
        if pfam == family and value >> (bits - n) == net >> (bits - n):
            return True
    return False


def pool_size(pool, length):
    """(family, first network as int, step, count) of the prefixes of
    `length` in `pool` ('NET/LEN'); the broker hands them out in order."""
    family, value, n = parse_prefix(pool)
    bits = 128 if family == 6 else 32
    return family, value, 1 << (bits - length), 1 << (length - n)


def pool_items(pool, length):
    """Every item of `pool` a lease may get, in order: 'NET/LEN' for IPv6,
    a bare address for IPv4 (each a /32).  Item 0, the pool's network
    address, is never one (nor, in an IPv4 pool of /30 or wider, the
    broadcast address); a pool of one item is that item."""
    family, first, step, count = pool_size(pool, length)
    lo, hi = (1, count) if count > 1 else (0, 1)
    if family == 4 and count > 2:
        hi = count - 1
    for i in range(lo, hi):
        yield pool_item(family, first, step, length, i)


def pool_item(family, first, step, length, index):
    packed = (first + index * step).to_bytes(16 if family == 6 else 4, "big")
    text = format_addr(family, packed)
    return text if family == 4 else "%s/%d" % (text, length)


def routed_address(prefix):
    """The client's own address in a routed IPv6 prefix: the address of a
    /128, else the prefix's first host (NET::1 of a /64)."""
    if not prefix:
        return ""
    _f, value, length = parse_prefix(prefix)
    if length < 128:
        value += 1
    return format_addr(6, value.to_bytes(16, "big"))


# Locally administered unicast (02), then "mb", then the exit tunnel id's
# low 24 bits: unique among the leases of one exit, and stable, so the
# exit knows the client's link-local address before the client is up.
MAC_OUI = "02:6d:62"


def lease_mac(tunnel_id):
    t = tunnel_id & 0xFFFFFF
    return "%s:%02x:%02x:%02x" % (MAC_OUI, t >> 16, (t >> 8) & 0xFF, t & 0xFF)
