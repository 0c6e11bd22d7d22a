"""The lease file's record format: slots, lease rows, buckets, the holdings record.

A record has two slots, each a header (magic, CRC32, generation, length,
count, earliest expiry) and a payload padded with zeros; a reader takes the
newest slot that verifies.  Payloads:

    bNN      the leases of every client whose address hashes to bucket NN,
             one line each: `<lease_id> <expires> <JSON row>`, the row in
             FIELDS order
    ids      what all leases hold together (Holdings): the exit's tunnel and
             session ids, leases per service, the allocation cursor, the
             UDP ports and pool items held, the new-lease rate bucket
    meta     format, schema, backend, bucket count, slot sizes, the file's
             first generation (JSON)

Nothing here touches a file.
"""

import binascii
# The C modules that struct.py and bisect.py only re-export: those two
# files are ~0.4 ms of every CGI lease and renew to import.
import _struct as struct
from _bisect import bisect_left, insort_right as insort

from microbroker import jsonlite
from microbroker.leases.errors import Corrupt

U32 = 0xFFFFFFFF


# The on-disk row of schema 1: this order, spelled out so that reordering
# the class can never silently change the file format.
FIELDS = (
    "lease_id", "secret_hash", "client", "service", "kind", "encap", "local",
    "remote", "tunnel_id", "peer_tunnel_id", "session_id", "peer_session_id",
    "ifname", "mtu", "mac", "udp_port", "peer_udp_port", "created", "renewed",
    "expires", "state", "rx_packets", "rx_bytes", "tx_packets", "tx_bytes",
    "seen", "extra")


class Lease:
    """One lease, from the exit's side: tunnel_id/session_id are the exit's.

    A plain class, not a dataclass: importing dataclasses (inspect, ast, re)
    costs a CGI request about 14 ms.
    """

    __slots__ = FIELDS

    def __init__(self, lease_id, secret_hash, client, service, kind, encap, local, remote,
                 tunnel_id, peer_tunnel_id, session_id, peer_session_id, ifname, mtu,
                 mac="", udp_port=0, peer_udp_port=0, created=0.0, renewed=0.0,
                 expires=0.0, state="pending", rx_packets=0, rx_bytes=0, tx_packets=0,
                 tx_bytes=0, seen=0.0, extra=None):
        self.lease_id = lease_id
        self.secret_hash = secret_hash
        self.client = client
        self.service = service
        self.kind = kind
        self.encap = encap
        self.local = local
        self.remote = remote
        self.tunnel_id = tunnel_id
        self.peer_tunnel_id = peer_tunnel_id
        self.session_id = session_id
        self.peer_session_id = peer_session_id
        self.ifname = ifname
        self.mtu = mtu
        self.mac = mac
        self.udp_port = udp_port
        self.peer_udp_port = peer_udp_port
        self.created = created
        self.renewed = renewed
        self.expires = expires
        self.state = state
        self.rx_packets = rx_packets
        self.rx_bytes = rx_bytes
        self.tx_packets = tx_packets
        self.tx_bytes = tx_bytes
        self.seen = seen
        self.extra = {} if extra is None else extra

    def row(self):
        return tuple(getattr(self, f) for f in FIELDS)

    def replace(self, **fields):
        """A copy with some fields changed."""
        d = dict(zip(FIELDS, self.row()))
        d.update(fields)
        return Lease(**d)

    def __eq__(self, other):
        return type(other) is Lease and self.row() == other.row()

    def __repr__(self):
        return "Lease(%s)" % ", ".join("%s=%r" % (f, getattr(self, f)) for f in FIELDS)


_F = {name: i for i, name in enumerate(FIELDS)}
_ID, _SECRET, _CLIENT, _SERVICE, _KIND = 0, 1, 2, 3, 4
_TUNNEL, _PEER_TUNNEL, _SESSION, _PEER_SESSION = 8, 9, 10, 11
_IFNAME, _UDP_PORT = 12, 15
_CREATED, _RENEWED, _EXPIRES, _STATE = 17, 18, 19, 20
_RX_PACKETS, _SEEN, _EXTRA = 21, 25, 26
# What update() may not touch: identity, ids, and what ids derive.
_NUMBERS = {"mtu", "udp_port", "peer_udp_port", "created", "renewed", "expires",
            "rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "seen"}
_FIXED = {"lease_id", "secret_hash", "client", "remote", "service", "tunnel_id",
          "peer_tunnel_id", "session_id", "peer_session_id", "ifname"}


def _lease(row):
    return Lease(*row)


def _row_bytes(row):
    row[_EXPIRES] = float(row[_EXPIRES])
    return b"%s %r %s" % (row[_ID].encode("ascii"), row[_EXPIRES],
                          jsonlite.dumps(row).encode("ascii"))


def _row(line, where):
    return _rows([line], where)[0]


def _rows(lines, where):
    """Parse lease lines, all in one loads (much faster than one call each).
    One line is read without the json module; many (a listing, a sweep)
    with its C parser, whose import then pays for itself."""
    if len(lines) > 1:
        import json as loader
    else:
        loader = jsonlite
    try:
        rows = loader.loads("[%s]" % b",".join(
            [line[line.index(b" ", 17) + 1:] for line in lines]).decode("ascii"))
    except ValueError:
        raise Corrupt(f"{where}: a lease row does not parse") from None
    for row in rows:
        if not isinstance(row, list) or len(row) != len(FIELDS):
            raise Corrupt(f"{where}: a lease row does not parse")
    return rows


def _expiries(lines, where):
    try:
        return [float(line[17:line.index(b" ", 17)]) for line in lines]
    except ValueError:
        raise Corrupt(f"{where}: a lease row does not parse") from None



def home(client):
    """A stable byte from the client address (not hash(): that is salted per process)."""
    return binascii.crc32(client.encode()) & 0xFF


def held_items(row):
    """What a lease holds that no other may: its pool items (the text, e.g.
    '10.98.0.7' or '2001:db8:0:3::/64') and its exit UDP port per service."""
    out = []
    extra = row[_EXTRA] or {}
    for key in ("prefix", "ipv4"):
        v = extra.get(key) if isinstance(extra, dict) else None
        if v and isinstance(v, str):
            out.append(v.encode())
    if row[_UDP_PORT]:
        out.append(b"udp %d %s" % (row[_UDP_PORT], row[_SERVICE].encode()))
    return out


def udp_item(port, service):
    return b"udp %d %s" % (port, service.encode())


# -- records -------------------------------------------------------------
#
# A slot: header, payload, zero padding.  The CRC covers the header fields
# after it and the payload, so a slot that mixes two writes never verifies.

_HEAD = struct.Struct("<4sIQIId")     # magic, crc, gen, length, count, min_expires
_MAGIC = b"MBL1"
_HTAIL = struct.Struct("<QIId")
_MINCAP = 512                          # dbm.dumb's block size


def _pack(gen, payload, count, minexp, cap):
    crc = binascii.crc32(payload, binascii.crc32(_HTAIL.pack(gen, len(payload), count, minexp)))
    raw = _HEAD.pack(_MAGIC, crc, gen, len(payload), count, minexp) + payload
    return raw + bytes(cap - len(raw))


def _unpack(raw):
    """(gen, count, minexp, payload) of a slot, or None if it does not verify."""
    if raw is None or len(raw) < _HEAD.size:
        return None
    magic, crc, gen, length, count, minexp = _HEAD.unpack_from(raw)
    end = _HEAD.size + length
    if magic != _MAGIC or end > len(raw):
        return None
    payload = raw[_HEAD.size:end]
    if binascii.crc32(payload, binascii.crc32(raw[8:_HEAD.size])) != crc:
        return None
    return gen, count, minexp, payload


def _capacity(need, old):
    """dbm.dumb slot size: the old size while it still fits well, else a power of two.

    dbm.dumb rewrites a value in place when it fits its old blocks and
    appends it otherwise, never reusing space; powers of two keep what it
    abandons below the live size."""
    if old and old // 4 < need <= old:
        return old
    cap = _MINCAP
    while cap < need:
        cap <<= 1
    return cap


def _fixed_cap(need, unit):
    """Slot size for gnu/ndbm: whole units, rounded up to 3 significant bits."""
    units = max(1, -(-need // unit))
    step = 1 << max(0, units.bit_length() - 3)
    return -(-units // step) * step * unit


# How each backend stores a slot.  dbm.gnu rewrites a value of unchanged size
# in place, but a size change frees and allocates space, and a crash in the
# middle of that leaves a file it refuses ("Database needs recovery").
# Berkeley DB (Debian's dbm.ndbm) moves values over about 1 KB to overflow
# pages it reallocates on every write, and rewrites smaller ones in place on
# their page.  So on both, every record has a fixed capacity (the layout, in
# meta), stored as one value (gnu) or as 960-byte chunks (ndbm), and every
# write has the same size: in place, no allocation.  A record that outgrows
# its capacity makes the whole file be rebuilt under a new name, with half as
# much room again for every record, and renamed over the old one (atomic).  dbm.dumb appends freely;
# its index recovery (.bak) covers it.
_CHUNK = {"dbm.gnu": 0, "dbm.ndbm": 960}
_UNIT = {"dbm.gnu": 512, "dbm.ndbm": 960}


def _meta_payload(meta, layout, unit):
    """The meta record with `layout` in it, room for itself included."""
    meta = dict(meta)
    layout[b"meta"] = 0
    for _ in range(3):
        meta["layout"] = {k.decode(): v for k, v in layout.items()}
        payload = _sorted_json(meta)
        if layout[b"meta"] >= _HEAD.size + len(payload):
            return payload
        layout[b"meta"] = _fixed_cap(2 * (_HEAD.size + len(payload)), unit)  # rarely rewritten
    raise AssertionError("meta layout does not settle")


def _sorted_json(obj):
    """json.dumps(obj, sort_keys=True), compact, without importing json."""
    def srt(v):
        return {k: srt(v[k]) for k in sorted(v)} if isinstance(v, dict) else v
    return jsonlite.dumps(srt(obj)).encode()


def _put_slot(db, key, raw, chunk, need):
    """Write one slot: the whole value, or the chunks that hold `need` bytes."""
    if not chunk:
        db[key] = raw
        return
    for i in range(-(-need // chunk)):
        db[key + b".%d" % i] = raw[i * chunk:(i + 1) * chunk]


class Holdings:
    """The ids record: what all leases hold together.  The exit's tunnel and
    session ids (sorted lists, stored as little-endian u32), the number of leases per service, the
    allocation cursor, the UDP ports and pool items held (held_items), and
    the new-lease rate bucket (tokens, when last filled).  May also count
    what a crash left behind, until the next sweep.

    The held items and the rate bucket follow the services JSON; a file
    written before they existed has neither (complete is then False and the
    store rebuilds the record from the leases)."""

    _FIX = struct.Struct("<IIII")       # cursor, n tunnels, n sessions, services length
    _TAIL = struct.Struct("<Idd")       # held length, rate tokens, rate stamp

    def __init__(self, payload=b"", next_expiry=0.0):
        self.tunnels, self.sessions = [], []
        self.cursor, self.next_expiry, self.services = 0, next_expiry, {}
        self.held = set()
        self.tokens, self.stamp = -1.0, 0.0        # -1: a full bucket
        self.rebuilt = False
        self.complete = True
        if payload:
            self.cursor, nt, ns, nsvc = self._FIX.unpack_from(payload)
            at = self._FIX.size
            self.tunnels = list(struct.unpack_from("<%dI" % nt, payload, at))
            at += 4 * nt
            self.sessions = list(struct.unpack_from("<%dI" % ns, payload, at))
            at += 4 * ns
            if nsvc:
                self.services = jsonlite.loads(payload[at:at + nsvc])
            at += nsvc
            if len(payload) >= at + self._TAIL.size:
                nheld, self.tokens, self.stamp = self._TAIL.unpack_from(payload, at)
                at += self._TAIL.size
                if nheld:
                    self.held = set(payload[at:at + nheld].split(b"\n"))
            else:
                self.complete = not nt

    def payload(self):
        t, s = self.tunnels, self.sessions
        svc = b""
        if self.services:
            svc = jsonlite.dumps(self.services).encode()
        held = b"\n".join(sorted(self.held))
        head = self._FIX.pack(self.cursor, len(t), len(s), len(svc))
        return (head + struct.pack("<%dI" % len(t), *t)
                + struct.pack("<%dI" % len(s), *s) + svc
                + self._TAIL.pack(len(held), self.tokens, self.stamp) + held)

    def add(self, row):
        insort(self.tunnels, row[_TUNNEL])
        insort(self.sessions, row[_SESSION])
        self.services[row[_SERVICE]] = self.services.get(row[_SERVICE], 0) + 1
        self.held.update(held_items(row))

    def drop(self, rows):
        for name, col in (("tunnels", _TUNNEL), ("sessions", _SESSION)):
            arr = getattr(self, name)
            if len(rows) > 8:
                # one pass instead of many deletions from the middle
                xs = {r[col] for r in rows}
                setattr(self, name, [x for x in arr if x not in xs])
                continue
            for r in rows:
                i = bisect_left(arr, r[col])
                if i < len(arr) and arr[i] == r[col]:
                    del arr[i]
        for r in rows:
            n = self.services.get(r[_SERVICE], 0) - 1
            if n > 0:
                self.services[r[_SERVICE]] = n
            else:
                self.services.pop(r[_SERVICE], None)
            self.held.difference_update(held_items(r))


_Ids = Holdings


def has(arr, x):
    """Is x in the sorted list arr?"""
    i = bisect_left(arr, x)
    return i < len(arr) and arr[i] == x




class Bucket:
    """The leases of one bucket, one line each: `<lease_id> <expires> <JSON row>`.

    The prefix lets lookups, expiry checks and rewrites of one lease work
    without parsing the other rows."""

    def __init__(self, payload, where):
        self.lines = payload.split(b"\n") if payload else []
        self.where = where

    def find(self, lease_id):
        """(index, row) of a lease, or (None, None)."""
        head = lease_id.encode("ascii") + b" "
        for i, line in enumerate(self.lines):
            if line.startswith(head):
                return i, _row(line, self.where)
        return None, None

    def client_rows(self, client):
        """Rows of one client.  The substring test skips most lines unparsed."""
        quoted = b'"' + client.encode() + b'"'
        out = []
        for line in self.lines:
            if quoted in line:
                row = _row(line, self.where)
                if row[_CLIENT] == client:
                    out.append(row)
        return out

    def rows(self):
        return _rows(self.lines, self.where)

    def expiries(self):
        return _expiries(self.lines, self.where)

    def put(self, index, row):
        if index is None:
            self.lines.append(_row_bytes(row))
        else:
            self.lines[index] = _row_bytes(row)

    def payload(self):
        """Payload, count and earliest expiry."""
        return b"\n".join(self.lines), len(self.lines), min(self.expiries(), default=0.0)

