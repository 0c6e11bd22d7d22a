"""The lease store: one dbm file shared by CGI processes, server threads and crashes.

Works on dbm.gnu, dbm.ndbm and dbm.dumb (chosen in that order, recorded in
the file, never switched silently).  Layout, schema 1.  The number of dbm
keys is fixed and small whatever the number of leases, because dbm.dumb
rereads its whole key index on every open and rewrites it on every close:

    ids.a / ids.b        exit tunnel ids and session ids in use (sorted u32
                         arrays), leases per service, the allocation cursor
    bNN.a / bNN.b        the leases of every client whose address hashes to
                         bucket NN (32 buckets on dbm.dumb, 128 otherwise),
                         one line each: `<lease_id> <expires> <JSON row>`
    meta.a / meta.b      format, schema, backend, bucket count, slot sizes
                         (created last, so they are the last lines of a
                         dbm.dumb index)

A lease lives in the bucket of its client, so everything about one client
(reuse, per-client quota, the client's own ids) reads one bucket; the first
byte of a lease id is the client's hash byte, so get/renew/release find the
bucket from the id alone.  Exit ids are unique through the ids record, which
allocate, release and sweep read; renew and lookups never do.

Crash safety.  Every record has two slots, each with a generation number and
a CRC32 over header and payload.  A write goes to the slot that does not hold
the newest valid copy, so a write torn by kill -9 or power loss only damages
that slot, and a reader takes the newest slot that verifies.  The backends'
own structures must never be caught half-updated either: on dbm.gnu and
dbm.ndbm every record has a fixed size, so every write is in place (see
_CHUNK), and a record that outgrows it has the file rebuilt under a new name
and renamed over the old one; dbm.dumb slots are padded to powers of two, so
it mostly writes in place too.  Invariant across records:
every id of a lease is in the ids record (ids are written and synced before a
new lease, and dropped only after the lease is gone); a crash in between
leaves an id that nobody holds, which the next sweep finds (the lease count
no longer matches) and frees.  dbm.dumb's own index (.dir) can be torn or
missing after a crash inside its commit; it is checked on every open and
restored from dbm.dumb's .bak copy, which is the index of the last complete
commit.  A file that still cannot be read raises Corrupt naming it;
LeaseStore.repair() moves it aside and keeps every lease that still reads.

Concurrency.  Every call takes an exclusive flock on `<path>.lock` (plus an
in-process lock for threads), opens the dbm file, works, syncs, closes and
releases, so CGI processes and server threads interleave safely.  The
in_kernel callback of allocate() runs under that lock: it must not call the
store.

Records are kept from the exit's side: tunnel_id/session_id are the exit's
ids, peer_* the client's.
"""

import binascii
import os
import struct
import time
import _thread
from bisect import bisect_left, insort

from microbroker import jsonlite

SCHEMA = 1
FORMAT = "microbroker-leases"
BACKENDS = ("dbm.gnu", "dbm.ndbm", "dbm.dumb")    # preference order
STATES = ("pending", "up", "closing")
ENCAPS = ("ip", "udp")
IFNAMSIZ = 16                                    # including the trailing NUL
U32 = 0xFFFFFFFF

# dbm.dumb pays per key on every open, the others do not; more buckets make
# each record (and so each renew) smaller.  Must divide 256 (see _home).
_BUCKETS = {"dbm.dumb": 32, "dbm.gnu": 128, "dbm.ndbm": 128}


# -- errors --------------------------------------------------------------

class LeaseError(Exception):
    """A request the store refuses; .code is the stable API error code."""
    code = "lease"

    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


class NotFound(LeaseError):
    code = "not_found"


class Forbidden(LeaseError):
    code = "forbidden"


class Conflict(LeaseError):
    code = "id_conflict"


class Exhausted(LeaseError):
    code = "ids_exhausted"


class TooMany(LeaseError):
    code = "too_many"


class Full(LeaseError):
    code = "full"


class BadRequest(LeaseError, ValueError):
    """A malformed argument (not in the API list; maps to bad_request)."""
    code = "bad_request"


class StoreError(Exception):
    """The lease file cannot be used: corrupt, locked, wrong backend or schema."""
    code = "store"

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


class Corrupt(StoreError):
    pass


class Locked(StoreError):
    pass


# -- the lease -----------------------------------------------------------

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
_ID, _SECRET, _CLIENT, _SERVICE = 0, 1, 2, 3
_TUNNEL, _PEER_TUNNEL, _SESSION, _PEER_SESSION = 8, 9, 10, 11
_RENEWED, _EXPIRES, _STATE = 18, 19, 20
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
    import json
    meta = dict(meta)
    layout[b"meta"] = 0
    for _ in range(3):
        meta["layout"] = {k.decode(): v for k, v in layout.items()}
        payload = json.dumps(meta, sort_keys=True).encode()
        if layout[b"meta"] >= _HEAD.size + len(payload):
            return payload
        layout[b"meta"] = _fixed_cap(2 * (_HEAD.size + len(payload)), unit)  # rarely rewritten
    raise AssertionError("meta layout does not settle")


def _put_slot(db, key, raw, chunk, need):
    """Write one slot: the whole value, or the chunks that hold `need` bytes."""
    if not chunk:
        db[key] = raw
        return
    for i in range(-(-need // chunk)):
        db[key + b".%d" % i] = raw[i * chunk:(i + 1) * chunk]


class _Ids:
    """What all leases hold together: the exit's tunnel and session ids
    (sorted u32 arrays), the number of leases per service, the allocation
    cursor.  May also count ids a crash left behind, until the next sweep."""

    _FIX = struct.Struct("<IIII")       # cursor, n tunnels, n sessions, services length

    def __init__(self, payload=b"", next_expiry=0.0):
        from array import array
        self.tunnels, self.sessions = array("I"), array("I")
        assert self.tunnels.itemsize == 4
        self.cursor, self.next_expiry, self.services = 0, next_expiry, {}
        self.rebuilt = False
        if payload:
            self.cursor, nt, ns, nsvc = self._FIX.unpack_from(payload)
            at = self._FIX.size
            self.tunnels.frombytes(payload[at:at + 4 * nt])
            at += 4 * nt
            self.sessions.frombytes(payload[at:at + 4 * ns])
            at += 4 * ns
            if _BIG:
                self.tunnels.byteswap()
                self.sessions.byteswap()
            if nsvc:
                self.services = jsonlite.loads(payload[at:at + nsvc])

    def payload(self):
        t, s = self.tunnels, self.sessions
        if _BIG:
            t, s = t[:], s[:]
            t.byteswap()
            s.byteswap()
        svc = b""
        if self.services:
            svc = jsonlite.dumps(self.services).encode()
        head = self._FIX.pack(self.cursor, len(t), len(s), len(svc))
        return head + t.tobytes() + s.tobytes() + svc

    def add(self, row):
        insort(self.tunnels, row[_TUNNEL])
        insort(self.sessions, row[_SESSION])
        self.services[row[_SERVICE]] = self.services.get(row[_SERVICE], 0) + 1

    def drop(self, rows):
        for name, col in (("tunnels", _TUNNEL), ("sessions", _SESSION)):
            arr = getattr(self, name)
            if len(rows) > 8:
                # one pass instead of many deletions from the middle
                xs = {r[col] for r in rows}
                setattr(self, name, type(arr)(arr.typecode, [x for x in arr if x not in xs]))
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


_BIG = struct.pack("=I", 1) != struct.pack("<I", 1)


def _free_ids(used, lo, hi, start):
    """Yield the ids in [lo, hi] missing from the sorted array `used`, from start round."""
    c = start if lo <= start <= hi else lo
    i = bisect_left(used, c)
    n = len(used)
    for _ in range(hi - lo + 1):
        if i < n and used[i] == c:
            i += 1
        else:
            yield c
        c += 1
        if c > hi:
            c, i = lo, bisect_left(used, lo)


class _Bucket:
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


# -- locking -------------------------------------------------------------

_thread_locks = {}
_thread_locks_guard = _thread.allocate_lock()


def _thread_lock(path):
    with _thread_locks_guard:
        lock = _thread_locks.get(path)
        if lock is None:
            lock = _thread_locks[path] = _thread.allocate_lock()
        return lock


def _reset_thread_locks():
    # A child forked while another thread held a lock would wait forever.
    global _thread_locks_guard
    _thread_locks.clear()
    _thread_locks_guard = _thread.allocate_lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_thread_locks)


class _FileLock:
    """Exclusive flock on <path>.lock for one call; flock (not lockf) so that
    two opens in one process exclude each other too."""

    def __init__(self, path, timeout, mode):
        self.path, self.timeout, self.mode = path, timeout, mode
        self.fd = None
        self.tlock = _thread_lock(path)

    def __enter__(self):
        import fcntl
        timeout = -1 if self.timeout is None else max(self.timeout, 0)
        deadline = time.monotonic() + (timeout if timeout >= 0 else 0)
        if not self.tlock.acquire(True, timeout):
            raise Locked(f"{self.path}: held by another thread for {self.timeout} s", self.path)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self.mode)
            delay = 0.0002
            while True:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return self
                except BlockingIOError:
                    pass
                if timeout >= 0 and time.monotonic() >= deadline:
                    raise Locked(f"{self.path}: held by another process for "
                                 f"{self.timeout} s", self.path)
                time.sleep(delay)
                delay = min(delay * 2, 0.01)
        except BaseException:
            self._release()
            raise

    def _release(self):
        if self.fd is not None:
            os.close(self.fd)           # drops the flock
            self.fd = None
        self.tlock.release()

    def __exit__(self, *exc):
        self._release()


# -- backends ------------------------------------------------------------

def available_backends():
    """The dbm backends this Python has, in preference order."""
    out = []
    for name in BACKENDS:
        try:
            __import__(name)
        except ImportError:
            continue
        out.append(name)
    return out


def _module(name):
    return __import__(name, fromlist=["open"])


def _norm_backend(name):
    if name is None:
        return None
    full = name if name.startswith("dbm.") else "dbm." + name
    if full not in BACKENDS:
        raise ValueError(f"unknown dbm backend {name!r}; one of {', '.join(BACKENDS)}")
    return full


def _fsync(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dumb_index_ok(path):
    """True if a dbm.dumb index file is complete: meta.b, created last, is its last line.

    dbm.dumb rewrites the index in key order, so any torn prefix lacks that line."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 80))
            tail = f.read()
    except OSError:
        return False
    if not tail.endswith(b"\n"):
        return False
    last = tail[:-1].rsplit(b"\n", 1)[-1]
    return last.startswith(b"'meta.b', (")


class _Txn:
    """One call's view of the open dbm file: read and write two-slot records."""

    def __init__(self, store, writable):
        self.store = store
        self.writable = writable
        self.db = store._open_db("w" if writable else "r")
        self.slots = {}       # record name -> [newest slot index, newest gen, [len a, len b]]
        self.wrote = False

    def close(self):
        db, self.db = self.db, None
        if db is not None:
            self.store._close_db(db, self.wrote)

    def _get(self, key):
        try:
            return self.db[key]
        except KeyError:
            return None

    def _raw(self, name, suffix):
        """One slot's bytes (its chunks joined, on Berkeley DB)."""
        key = name + suffix
        chunk = self.store.chunk
        if not chunk:
            return self._get(key)
        first = self._get(key + b".0")
        if first is None or len(first) < _HEAD.size:
            return first
        n = -(-(_HEAD.size + _HEAD.unpack_from(first)[3]) // chunk)
        # A torn header must not send us probing for thousands of chunks.  meta
        # is read before the layout is known (another process may have grown it).
        bound = 4096 * chunk if name == b"meta" else self.store.layout.get(name, 4096 * chunk)
        n = min(n, bound // chunk)
        parts = [first]
        for i in range(1, n):
            part = self._get(key + b".%d" % i)
            if part is None:
                break
            parts.append(part)
        return b"".join(parts)

    def read(self, name):
        """(count, minexp, payload) of the newest valid slot, or None if neither verifies."""
        best = None
        lens = [0, 0]
        for i, suffix in enumerate((b".a", b".b")):
            raw = self._raw(name, suffix)
            lens[i] = 0 if raw is None else len(raw)
            slot = _unpack(raw)
            if slot is not None and (best is None or slot[0] > best[1][0]):
                best = (i, slot)
        if best is None:
            self.slots[name] = [1, 0, lens]       # next write: slot a, gen 1
            return None
        i, (gen, count, minexp, payload) = best
        self.slots[name] = [i, gen, lens]
        return count, minexp, payload

    def write(self, name, payload, count=0, minexp=0.0):
        if name not in self.slots:
            self.read(name)
        newest, gen, lens = self.slots[name]
        target = 1 - newest
        need = _HEAD.size + len(payload)
        st = self.store
        if st.fixed:
            if need > st.layout.get(name, 0):
                self.grow({name: need})
            cap = st.layout[name]
        else:
            cap = _capacity(need, lens[target])
        _put_slot(self.db, name + (b".a", b".b")[target],
                  _pack(gen + 1, payload, count, minexp, cap), st.chunk, need)
        lens[target] = cap
        self.slots[name] = [target, gen + 1, lens]
        self.wrote = True

    def reserve(self, needs):
        """Make room for several records at once ({name: bytes}): one rebuild, not many."""
        st = self.store
        if st.fixed and any(n > st.layout.get(name, 0) for name, n in needs.items()):
            self.grow(needs)

    def grow(self, needs):
        """Rebuild the file (gnu, ndbm) with room for `needs` and half as much again
        as every record uses now, under a new name, and rename it over the old one."""
        import json
        st = self.store
        names = st._names()
        slots, used = {}, {}
        for name in names:
            pair = [_unpack(self._raw(name, sfx)) for sfx in (b".a", b".b")]
            slots[name] = pair
            used[name] = max([_HEAD.size + len(p[3]) for p in pair if p] + [needs.get(name, 0)])
        # Buckets fill alike on average: a floor from the mean keeps the small
        # ones from each forcing a rebuild of their own as they catch up.
        mean = sum(used[name] for name in names[1:-1]) // max(1, len(names) - 2)
        layout = {}
        for name in names:
            n = used[name] if name in (b"ids", b"meta") else max(used[name], mean + 1024)
            layout[name] = _fixed_cap(n + n // 2, st.unit)
        gen, _, _, raw = max((p for p in slots[b"meta"] if p), key=lambda p: p[0])
        meta = json.loads(raw)
        payload = _meta_payload(meta, layout, st.unit)
        slots[b"meta"] = [(gen + 1, 0, 0.0, payload), (gen, 0, 0.0, payload)]
        tmp = st.path + ".grow"
        st._build(tmp, names, slots, layout)
        self.db.close()                   # (writes to the old file, about to be replaced)
        self.db = None
        st._install(tmp)
        self.db = st._open_db("w")
        st.layout, st._meta_raw = layout, payload
        self.slots.pop(b"meta", None)
        self.wrote = True

    def flush(self):
        """Make what was written so far durable before writing more (ordering point)."""
        if self.wrote:
            self.db = self.store._flush_db(self.db)

    # typed records

    def bucket(self, b):
        name = b"b%02x" % b
        rec = self.read(name)
        if rec is None:
            raise Corrupt(f"{self.store.path}: lease bucket {b} is unreadable (both copies "
                          f"fail their checksum); `microbroker repair-leases` keeps the readable "
                          f"leases", self.store.path)
        return _Bucket(rec[2], f"{self.store.path} bucket {b}"), rec[0], rec[1]

    def put_bucket(self, b, bucket):
        payload, count, minexp = bucket.payload()
        self.write(b"b%02x" % b, payload, count, minexp)

    def ids(self):
        rec = self.read(b"ids")
        if rec is None:
            # Derived data: rebuild it from the leases rather than fail.
            ids = self.store._rebuild_ids(self)
            ids.rebuilt = True
            return ids
        return _Ids(rec[2], rec[1])

    def put_ids(self, ids):
        self.write(b"ids", ids.payload(), len(ids.tunnels), float(ids.next_expiry))


# -- the store -----------------------------------------------------------

class LeaseStore:
    """Leases in one dbm file; every method is one locked read-modify-write."""

    def __init__(self, path, tunnel_ids=(1, 0xFFFF), session_ids=(1, 0xFFFF),
                 max_leases=0, max_per_client=0, ifname_prefix="mb",
                 backend=None, lock_timeout=5.0, fsync=True, mode=0o600):
        self.path = os.fspath(path)
        self.tunnel_ids = self._range(tunnel_ids, "tunnel_ids")
        self.session_ids = self._range(session_ids, "session_ids")
        self.max_leases = int(max_leases or 0)
        self.max_per_client = int(max_per_client or 0)
        from microbroker.names import check_prefix
        check_prefix(ifname_prefix, self.tunnel_ids[1])
        self.ifname_prefix = ifname_prefix
        self.lock_timeout = lock_timeout
        self.fsync = fsync
        self.mode = mode
        self.lock_path = self.path + ".lock"
        self._meta_raw = None
        self._wanted = _norm_backend(backend)
        self._use(self._choose_backend(self._wanted))

    def _use(self, backend):
        self.backend = backend
        self._mod = _module(backend)
        self.buckets = _BUCKETS[backend]        # replaced by the file's own value
        self.fixed = backend in _CHUNK          # see _CHUNK
        self.chunk = _CHUNK.get(backend, 0)
        self.unit = _UNIT.get(backend, _MINCAP)
        self.layout = {}                        # record -> slot size, from meta
        self._meta_raw = None

    @staticmethod
    def _range(r, name):
        lo, hi = int(r[0]), int(r[1])
        if not 1 <= lo <= hi <= U32:
            raise ValueError(f"{name} {r!r}: need 1 <= lo <= hi <= {U32}")
        return lo, hi

    def __repr__(self):
        return f"LeaseStore({self.path!r}, backend={self.backend!r})"

    # files and backends

    def _present(self):
        """Backends whose files exist at self.path."""
        p, ex = self.path, os.path.exists
        found = []
        if os.path.isfile(p):
            found.append("dbm.gnu")
        if ex(p + ".db") or ex(p + ".pag"):
            found.append("dbm.ndbm")
        if ex(p + ".dat") or ex(p + ".bak") or (ex(p + ".dir") and not ex(p + ".pag")):
            found.append("dbm.dumb")
        return found

    def _choose_backend(self, wanted):
        found = self._present()
        if len(found) > 1:
            raise StoreError(f"{self.path}: files of several dbm backends are there "
                             f"({', '.join(found)}); keep one, move the others away", self.path)
        if found:
            have = found[0]
            if wanted and wanted != have:
                raise StoreError(f"{self.path}: the lease file is {have}, not the {wanted} "
                                 f"asked for; drop the backend setting or move the file away",
                                 self.path)
            try:
                __import__(have)
            except ImportError:
                import sys
                raise StoreError(f"{self.path}: the lease file was written with {have}, which "
                                 f"this Python ({sys.executable}) lacks; run the broker with a "
                                 f"Python that has it, or move the file away to start anew",
                                 self.path) from None
            return have
        if wanted:
            try:
                __import__(wanted)
            except ImportError:
                raise StoreError(f"backend {wanted} is not available in this Python", self.path)
            return wanted
        avail = available_backends()
        if not avail:
            raise StoreError("no dbm backend in this Python", self.path)
        return avail[0]

    def _suffixes(self):
        return {"dbm.gnu": ("",), "dbm.ndbm": (".db", ".pag", ".dir"),
                "dbm.dumb": (".dat", ".dir", ".bak")}[self.backend]

    def _complete(self):
        p, ex = self.path, os.path.exists
        if self.backend == "dbm.gnu":
            return os.path.isfile(p)
        if self.backend == "dbm.ndbm":
            return ex(p + ".db") or (ex(p + ".pag") and ex(p + ".dir"))
        return ex(p + ".dir")

    def _fix_dumb_index(self):
        """Repair the dbm.dumb index after a crash inside dbm.dumb's commit.

        That commit renames .dir to .bak and then writes a new .dir, so a crash
        leaves .dir missing or torn next to a complete .bak."""
        d, bak, dat = self.path + ".dir", self.path + ".bak", self.path + ".dat"
        if _dumb_index_ok(d):
            return
        if _dumb_index_ok(bak):
            tmp = d + ".tmp"
            with open(bak, "rb") as src, open(tmp, "wb") as dst:
                dst.write(src.read())
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, d)
            self._fsync_dir()
            return
        if not os.path.exists(d) and not os.path.exists(bak):
            if os.path.exists(dat):
                # Creation renames .dat before .dir: it was interrupted, nothing to keep.
                os.replace(dat, dat + ".incomplete")
            return
        raise Corrupt(f"{self.path}: the dbm.dumb index ({d}) is damaged and has no good "
                      f"backup; `microbroker repair-leases` starts a new file", self.path)

    def _fsync_dir(self):
        if not self.fsync:
            return
        fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _open_db(self, flag, path=None):
        path = path or self.path
        try:
            return self._mod.open(path, flag, self.mode)
        except Exception as e:
            import errno
            if e.args and e.args[0] in (errno.EAGAIN, errno.EWOULDBLOCK):  # dbm.gnu's own lock
                raise Locked(f"{path}: locked by a process outside microbroker ({e})",
                             self.path) from e
            raise Corrupt(f"{path}: cannot open the {self.backend} lease file ({e}); "
                          f"`microbroker repair-leases` moves it aside and starts anew",
                          self.path) from e

    def _db_files(self, path=None, synced=False):
        """The backend's files; synced=True leaves out dbm.dumb's .bak (the
        previous index, renamed, already on disk)."""
        path = path or self.path
        return [path + s for s in self._suffixes()
                if not (synced and s == ".bak") and os.path.exists(path + s)]

    def _flush_db(self, db):
        if self.backend == "dbm.ndbm":
            # No sync(): close writes everything out, then carry on with a new handle.
            db.close()
            if self.fsync:
                for f in self._db_files(synced=True):
                    _fsync(f)
            return self._open_db("w")
        db.sync()                     # dbm.gnu: fsync; dbm.dumb: write the index
        if self.fsync and self.backend == "dbm.dumb":
            for f in self._db_files(synced=True):
                _fsync(f)
            self._fsync_dir()
        return db

    def _close_db(self, db, wrote):
        db.close()
        if wrote and self.fsync:
            # dbm.gnu's close msyncs its mapped pages; fsync covers the rest (size, pwrite).
            for f in self._db_files(synced=True):
                _fsync(f)
            if self.backend == "dbm.dumb":
                self._fsync_dir()

    def _names(self, k=None):
        """Every record, meta last (see _dumb_index_ok)."""
        k = self.buckets if k is None else k
        return [b"ids"] + [b"b%02x" % b for b in range(k)] + [b"meta"]

    def _build(self, tmp, names, slots, caps):
        """Write a complete file under the name `tmp`: every slot of every record.

        slots: {name: [slot a, slot b]}, each (gen, count, minexp, payload) or None."""
        for s in (".db", ".pag", ".dir", ".dat", ".bak", ""):
            if os.path.isfile(tmp + s):
                os.unlink(tmp + s)
        db = self._open_db("n", tmp)
        try:
            for name in names:
                cap = caps[name]
                for sfx, slot in zip((b".a", b".b"), slots[name]):
                    raw = _pack(slot[0], slot[3], slot[1], slot[2], cap) if slot else bytes(cap)
                    _put_slot(db, name + sfx, raw, self.chunk, cap)
        finally:
            db.close()

    def _install(self, tmp):
        """Rename a file built by _build into place, durably."""
        made = self._db_files(tmp)
        if not made:
            raise StoreError(f"{tmp}: {self.backend} created no file", self.path)
        if self.fsync:
            for f in made:
                _fsync(f)
        # dbm.dumb: .dat before .dir, so a lone .dat means an interrupted creation.
        made.sort(key=lambda f: f.endswith(".dir"))
        for f in made:
            os.replace(f, self.path + f[len(tmp):])
        self._fsync_dir()

    def _create(self):
        """Build an empty store under a temporary name, then rename it into place."""
        import json
        k = _BUCKETS[self.backend]
        names = self._names(k)
        meta = {"format": FORMAT, "schema": SCHEMA, "backend": self.backend,
                "buckets": k, "created": time.time()}
        payloads = {name: b"" for name in names}
        payloads[b"ids"] = _Ids().payload()
        if self.fixed:
            caps = {name: _fixed_cap(_HEAD.size + len(p), self.unit)
                    for name, p in payloads.items()}
            payloads[b"meta"] = _meta_payload(meta, caps, self.unit)
        else:
            payloads[b"meta"] = json.dumps(meta, sort_keys=True).encode()
            caps = {name: _capacity(_HEAD.size + len(p), 0) for name, p in payloads.items()}
        # Both slots exist from the start, so later writes keep the key set fixed.
        slots = {name: [(1, 0, 0.0, p), (0, 0, 0.0, p)] for name, p in payloads.items()}
        self._build(self.path + ".new", names, slots, caps)
        self._install(self.path + ".new")

    def _txn(self, writable):
        return _Call(self, writable)

    def _check_meta(self, tx):
        rec = tx.read(b"meta")
        if rec is None:
            raise Corrupt(f"{self.path}: the header record is unreadable; "
                          f"`microbroker repair-leases` keeps the readable leases", self.path)
        raw = rec[2]
        if raw == self._meta_raw:
            return
        try:
            meta = jsonlite.loads(raw)
            fmt, schema = meta["format"], meta["schema"]
            backend, k = meta["backend"], meta["buckets"]
        except (ValueError, KeyError, TypeError):
            raise Corrupt(f"{self.path}: the header record does not parse", self.path) from None
        if fmt != FORMAT:
            raise Corrupt(f"{self.path}: not a microbroker lease file ({fmt!r})", self.path)
        if schema > SCHEMA:
            raise StoreError(f"{self.path}: written by a newer microbroker (schema {schema}, "
                             f"this one reads up to {SCHEMA}); upgrade, or move the file away",
                             self.path)
        if schema < SCHEMA:
            # Schema 1 is the first; a later one migrates here, under the lock.
            raise StoreError(f"{self.path}: schema {schema} has no migration", self.path)
        if backend != self.backend:
            raise Corrupt(f"{self.path}: the file says it is {backend} but opens as "
                          f"{self.backend}", self.path)
        if not isinstance(k, int) or k < 1 or 256 % k:
            raise Corrupt(f"{self.path}: bad bucket count {k!r}", self.path)
        if self.fixed:
            try:
                layout = {name.encode(): int(cap) for name, cap in meta["layout"].items()}
            except (KeyError, AttributeError, TypeError, ValueError):
                layout = {}
            if any(layout.get(name, 0) < _HEAD.size for name in self._names(k)):
                raise Corrupt(f"{self.path}: the header record has no usable layout",
                              self.path)
            self.layout = layout
        self.buckets = k
        self._meta_raw = raw

    # hashing and ids

    @staticmethod
    def _home(client):
        """A stable byte from the client address (not hash(): that is salted per process)."""
        return binascii.crc32(client.encode()) & 0xFF

    def _bucket_of_id(self, lease_id):
        if not (isinstance(lease_id, str) and len(lease_id) == 16
                and all(c in "0123456789abcdef" for c in lease_id)):
            raise NotFound(f"no lease {lease_id!r}")
        return int(lease_id[:2], 16) % self.buckets

    def _rebuild_ids(self, tx, keep_cursor=0):
        ids = _Ids()
        ids.cursor = keep_cursor
        nexts = []
        for b in range(self.buckets):
            bucket, count, minexp = tx.bucket(b)
            for row in bucket.rows():
                ids.add(row)
            if count:
                nexts.append(minexp)
        ids.next_expiry = min(nexts, default=0.0)
        return ids

    # public API

    def allocate(self, client, service, kind, encap, local, mtu, lifetime,
                 peer_tunnel_id=None, peer_session_id=None, in_kernel=None, now=None,
                 mac="", udp_port=0, peer_udp_port=0, extra=None):
        """A lease for (client, service): (lease, secret, reused).

        The client's live lease for the same service comes back (reused=True)
        with a new secret, the old one then stops working."""
        client = _client(client)
        service = _text(service, "service")
        kind = _text(kind, "kind")
        if encap not in ENCAPS:
            raise BadRequest(f"encap {encap!r}: one of {', '.join(ENCAPS)}")
        local = _text(local, "local")
        mtu = _int(mtu, "mtu", 68, 65535)
        _lifetime(lifetime)
        pt = None if peer_tunnel_id is None else _int(peer_tunnel_id, "tunnel_id", 1, U32)
        ps = None if peer_session_id is None else _int(peer_session_id, "session_id", 1, U32)
        now = time.time() if now is None else now
        secret = os.urandom(16).hex()
        home = self._home(client)
        with self._txn(True) as tx:
            b = home % self.buckets
            bucket, _, _ = tx.bucket(b)
            mine = bucket.client_rows(client)

            for row in mine:
                if row[_SERVICE] == service and row[_STATE] != "closing":
                    row[_SECRET] = _hash(secret)
                    row[_RENEWED] = now
                    row[_EXPIRES] = max(row[_EXPIRES], now + lifetime)
                    i, _ = bucket.find(row[_ID])
                    bucket.put(i, row)
                    tx.put_bucket(b, bucket)
                    return _lease(row), secret, True

            for want, col, name in ((pt, _PEER_TUNNEL, "tunnel_id"),
                                    (ps, _PEER_SESSION, "session_id")):
                for row in mine:
                    if want is not None and row[col] == want:
                        raise Conflict(f"{name} {want} is in use by your lease {row[_ID]}; "
                                       f"propose another or omit it")

            if self.max_per_client and len(mine) >= self.max_per_client:
                soonest = min(r[_EXPIRES] for r in mine)
                raise TooMany(f"{client} holds {len(mine)} leases, the most allowed",
                              retry_after=max(1, int(soonest - now) + 1))

            ids = tx.ids()
            if self.max_leases and len(ids.tunnels) >= self.max_leases:
                raise Full(f"all {self.max_leases} leases are taken",
                           retry_after=max(1, int(ids.next_expiry - now) + 1))

            t, s = self._pick(ids, in_kernel)
            if pt is None:
                pt = _free_peer(t, {r[_PEER_TUNNEL] for r in mine})
            if ps is None:
                ps = _free_peer(s, {r[_PEER_SESSION] for r in mine})

            lease_id = self._new_id(home, bucket)
            row = [None] * len(FIELDS)
            values = dict(
                lease_id=lease_id, secret_hash=_hash(secret), client=client,
                service=service, kind=kind, encap=encap, local=local, remote=client,
                tunnel_id=t, peer_tunnel_id=pt, session_id=s, peer_session_id=ps,
                ifname=f"{self.ifname_prefix}{t}", mtu=mtu, mac=_text(mac or "", "mac", True),
                udp_port=_int(udp_port, "udp_port", 0, 65535),
                peer_udp_port=_int(peer_udp_port, "peer_udp_port", 0, 65535),
                created=now, renewed=now, expires=now + lifetime, state="pending",
                rx_packets=0, rx_bytes=0, tx_packets=0, tx_bytes=0, seen=0.0,
                extra=_extra(extra))
            for k, v in values.items():
                row[_F[k]] = v

            # The ids first, durable, then the lease (see the module docstring).
            ids.add(row)
            ids.cursor = t + 1
            ids.next_expiry = min(ids.next_expiry or row[_EXPIRES], row[_EXPIRES])
            tx.put_ids(ids)
            tx.flush()
            bucket.put(None, row)
            tx.put_bucket(b, bucket)
            return _lease(row), secret, False

    def _pick(self, ids, in_kernel):
        """Free exit (tunnel_id, session_id), skipping pairs the kernel still holds."""
        tlo, thi = self.tunnel_ids
        slo, shi = self.session_ids
        vetoed = set()
        tries = 0
        for t in _free_ids(ids.tunnels, tlo, thi, ids.cursor):
            # 1:1 from the tunnel id where free, so ids match with equal ranges.
            pref = slo + (t - tlo) % (shi - slo + 1)
            s = next((x for x in _free_ids(ids.sessions, slo, shi, pref) if x not in vetoed), None)
            if s is None:
                raise Exhausted(f"no free session id in {slo}-{shi}")
            if in_kernel is None or not in_kernel(t, s):
                return t, s
            vetoed.add(s)
            tries += 1
            if tries >= 1024:
                break
        raise Exhausted(f"no free tunnel id in {tlo}-{thi}"
                        + (f" ({len(vetoed)} still in the kernel)" if vetoed else ""))

    @staticmethod
    def _new_id(home, bucket):
        while True:
            lease_id = "%02x%s" % (home, os.urandom(7).hex())
            if bucket.find(lease_id)[0] is None:
                return lease_id

    def _locate(self, tx, lease_id):
        b = self._bucket_of_id(lease_id)
        bucket, _, _ = tx.bucket(b)
        i, row = bucket.find(lease_id)
        if row is None:
            raise NotFound(f"no lease {lease_id}")
        return b, bucket, i, row

    @staticmethod
    def _check(row, secret, client):
        import hmac
        ok = isinstance(secret, str) and hmac.compare_digest(_hash(secret), row[_SECRET])
        if not ok or _client(client) != row[_CLIENT]:
            raise Forbidden("wrong secret or address for this lease")

    def authorize(self, lease_id, secret, client):
        """The lease if secret and client address match; NotFound or Forbidden."""
        with self._txn(False) as tx:
            _, _, _, row = self._locate(tx, lease_id)
            self._check(row, secret, client)
            return _lease(row)

    def renew(self, lease_id, secret, client, lifetime, now=None):
        """Heartbeat: expires = now + lifetime."""
        _lifetime(lifetime)
        now = time.time() if now is None else now
        with self._txn(True) as tx:
            b, bucket, i, row = self._locate(tx, lease_id)
            self._check(row, secret, client)
            if row[_STATE] == "closing":
                raise NotFound(f"lease {lease_id} is closing")
            row[_RENEWED] = now
            row[_EXPIRES] = now + lifetime
            bucket.put(i, row)
            tx.put_bucket(b, bucket)
            return _lease(row)

    def release(self, lease_id, secret, client):
        """End a lease; returns it, gone from the store, for teardown."""
        with self._txn(True) as tx:
            b, bucket, i, row = self._locate(tx, lease_id)
            self._check(row, secret, client)
            self._drop(tx, b, bucket, i, row)
            return _lease(row)

    def _drop(self, tx, b, bucket, i, row):
        # The lease first, then its ids: a crash in between only leaks ids.
        del bucket.lines[i]
        tx.put_bucket(b, bucket)
        tx.flush()
        ids = tx.ids()
        ids.drop([row])
        tx.put_ids(ids)

    def get(self, lease_id):
        with self._txn(False) as tx:
            return _lease(self._locate(tx, lease_id)[3])

    def update(self, lease_id, /, **fields):
        """Change state, counters and the like; ids and identity stay fixed."""
        for k, v in fields.items():
            if k not in _F or k in _FIXED:
                raise ValueError(f"update: {k!r} cannot be changed")
            if k in _NUMBERS:
                # (NaN fails both tests; infinity has no JSON)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or \
                        not 0 <= v < float("inf"):
                    raise ValueError(f"update: {k} must be a number >= 0, not {v!r}")
            elif k != "extra":
                _text(v, k, empty=(k == "mac"))
        if "encap" in fields and fields["encap"] not in ENCAPS:
            raise ValueError(f"encap {fields['encap']!r}: one of {', '.join(ENCAPS)}")
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"state {fields['state']!r}: one of {', '.join(STATES)}")
        if "extra" in fields:
            fields["extra"] = _extra(fields["extra"])
        with self._txn(True) as tx:
            b, bucket, i, row = self._locate(tx, lease_id)
            for k, v in fields.items():
                row[_F[k]] = v
            bucket.put(i, row)
            tx.put_bucket(b, bucket)
            return _lease(row)

    def remove(self, lease_id):
        """Remove without a secret (kernel rollback, admin); the lease or None."""
        with self._txn(True) as tx:
            try:
                b, bucket, i, row = self._locate(tx, lease_id)
            except NotFound:
                return None
            self._drop(tx, b, bucket, i, row)
            return _lease(row)

    def sweep(self, now=None):
        """Remove and return every lease with expires <= now, each exactly once.

        Buckets whose earliest expiry is later are skipped unparsed.  Also frees
        ids left behind by a crash (the lease count then disagrees)."""
        now = time.time() if now is None else now
        gone = []
        with self._txn(True) as tx:
            total = 0
            nexts = []
            for b in range(self.buckets):
                bucket, count, minexp = tx.bucket(b)
                if count and minexp <= now:
                    keep, lost, later = [], [], []
                    for line, exp in zip(bucket.lines, bucket.expiries()):
                        if exp <= now:
                            lost.append(line)
                        else:
                            keep.append(line)
                            later.append(exp)
                    gone.extend(_rows(lost, bucket.where))
                    bucket.lines = keep
                    count, minexp = len(keep), min(later, default=0.0)
                    tx.write(b"b%02x" % b, b"\n".join(keep), count, minexp)
                total += count
                if count:
                    nexts.append(minexp)
            ids = tx.ids()
            if (gone or ids.rebuilt or total != len(ids.tunnels)
                    or total != len(ids.sessions)):
                tx.flush()
                if total + len(gone) == len(ids.tunnels) == len(ids.sessions):
                    ids.drop(gone)
                else:
                    ids = self._rebuild_ids(tx, ids.cursor)
                ids.next_expiry = min(nexts, default=0.0)
                tx.put_ids(ids)
        return [_lease(r) for r in gone]

    def leases(self, client=None):
        """All leases, or one client's (one bucket read), oldest first."""
        rows = []
        with self._txn(False) as tx:
            if client is not None:
                client = _client(client)
                rows = tx.bucket(self._home(client) % self.buckets)[0].client_rows(client)
            else:
                for b in range(self.buckets):
                    rows.extend(tx.bucket(b)[0].rows())
        rows.sort(key=lambda r: (r[_F["created"]], r[_ID]))
        return [_lease(r) for r in rows]

    def count(self, service=None, client=None):
        """Leases, of one service and/or one client.  Without a client this
        comes from the ids record: cheap, and after a crash it may count a
        lease that was never granted, until the next sweep."""
        with self._txn(False) as tx:
            if client is not None:
                client = _client(client)
                bucket = tx.bucket(self._home(client) % self.buckets)[0]
                rows = bucket.client_rows(client)
                return sum(1 for r in rows if service is None or r[_SERVICE] == service)
            ids = tx.ids()
            if service is None:
                return len(ids.tunnels)
            return ids.services.get(service, 0)

    # health

    def check(self):
        """Read every record and check the invariants; a report dict.

        ok: no id held twice (exit ids anywhere, client ids per client), every
        id reserved, every lease in its bucket.  leaked_ids counts ids a crash
        left reserved for nobody (freed by the next sweep).  Raises Corrupt
        like the other calls when a record cannot be read."""
        with self._txn(False) as tx:
            exit_ids, peer_ids, services = set(), set(), {}
            dup, misplaced, n = [], [], 0
            for b in range(self.buckets):
                for row in tx.bucket(b)[0].rows():
                    n += 1
                    services[row[_SERVICE]] = services.get(row[_SERVICE], 0) + 1
                    if (int(row[_ID][:2], 16) % self.buckets != b
                            or self._home(row[_CLIENT]) % self.buckets != b):
                        misplaced.append(row[_ID])
                    for key, seen in ((("t", row[_TUNNEL]), exit_ids),
                                      (("s", row[_SESSION]), exit_ids),
                                      ((row[_CLIENT], "t", row[_PEER_TUNNEL]), peer_ids),
                                      ((row[_CLIENT], "s", row[_PEER_SESSION]), peer_ids)):
                        if key in seen:
                            dup.append(key)
                        seen.add(key)
            ids = tx.ids()
            unreserved = [x for kind, x in exit_ids
                          if not _has(ids.tunnels if kind == "t" else ids.sessions, x)]
            undercounted = [k for k, v in services.items() if ids.services.get(k, 0) < v]
            return {"path": self.path, "backend": self.backend, "schema": SCHEMA,
                    "buckets": self.buckets, "leases": n, "duplicate_ids": dup,
                    "unreserved_ids": unreserved, "misplaced": misplaced,
                    "leaked_ids": len(ids.tunnels) - n,
                    "ok": not (dup or unreserved or misplaced or undercounted)}

    def repair(self):
        """Keep every lease that still reads and start a fresh file with them.

        The old files are moved aside to <path>.corrupt-<time>*.  Ids of lost
        leases are not reserved: the caller's in_kernel veto and the
        dataplane's reconcile deal with tunnels the kernel still holds."""
        rows, lost, moved, kept = [], [], [], []
        with _FileLock(self.lock_path, self.lock_timeout, self.mode):
            try:
                if self.backend == "dbm.dumb":
                    self._fix_dumb_index()
                old = _Txn(self, False)
            except StoreError:
                old = None
            if old is not None:
                try:
                    try:
                        self._check_meta(old)          # the layout, when it still reads
                    except StoreError:
                        pass
                    names = sorted({k.split(b".")[0] for k in old.db.keys() if k[:1] == b"b"})
                    for name in names:
                        rec = old.read(name)
                        if rec is None:
                            lost.append(name.decode())
                            continue
                        for line in _Bucket(rec[2], self.path).lines:
                            try:
                                row = _row(line, self.path)
                            except Corrupt:
                                row = None
                            if _sane(row):
                                rows.append(row)
                            else:
                                lost.append(name.decode())
                finally:
                    old.close()
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for f in self._db_files():
                dst = f"{self.path}.corrupt-{stamp}{f[len(self.path):]}"
                os.replace(f, dst)
                moved.append(dst)
            self._meta_raw, self.layout = None, {}
            self._create()

            tx = _Txn(self, True)
            try:
                self._check_meta(tx)
                buckets, ids = {}, _Ids()
                for row in rows:
                    b = int(row[_ID][:2], 16) % self.buckets
                    if (self._home(row[_CLIENT]) % self.buckets != b
                            or _has(ids.tunnels, row[_TUNNEL])
                            or _has(ids.sessions, row[_SESSION])):
                        continue
                    ids.add(row)
                    buckets.setdefault(b, _Bucket(b"", self.path)).put(None, row)
                    kept.append(row)
                ids.next_expiry = min((r[_EXPIRES] for r in kept), default=0.0)
                tx.reserve({b"ids": _HEAD.size + len(ids.payload()), **{
                    b"b%02x" % b: _HEAD.size + len(bucket.payload()[0])
                    for b, bucket in buckets.items()}})
                tx.put_ids(ids)
                tx.flush()
                for b, bucket in buckets.items():
                    tx.put_bucket(b, bucket)
            finally:
                tx.close()
        return {"kept": len(kept), "dropped": len(rows) - len(kept),
                "lost_buckets": sorted(set(lost)), "moved_to": moved}


class _Call:
    """Context for one public call: lock, make sure the file exists, open, check."""

    def __init__(self, store, writable):
        self.store, self.writable = store, writable
        self.lock = _FileLock(store.lock_path, store.lock_timeout, store.mode)
        self.tx = None

    def __enter__(self):
        st = self.store
        self.lock.__enter__()
        try:
            if st.backend == "dbm.dumb":
                st._fix_dumb_index()
            if not st._complete():
                # Another process may have created the file since we chose a
                # backend: use what is there rather than start a second file.
                found = st._present()
                if found and found != [st.backend]:
                    st._use(st._choose_backend(st._wanted))
                    if st.backend == "dbm.dumb":
                        st._fix_dumb_index()
                if not st._complete():
                    st._meta_raw, st.layout = None, {}
                    st._create()
            self.tx = _Txn(st, self.writable)
            st._check_meta(self.tx)
            return self.tx
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc):
        try:
            if self.tx is not None:
                self.tx.close()
        finally:
            self.lock.__exit__()


# -- small helpers -------------------------------------------------------

def _hash(secret):
    import hashlib
    return hashlib.sha256(secret.encode()).hexdigest()


def _has(arr, x):
    i = bisect_left(arr, x)
    return i < len(arr) and arr[i] == x


def _free_peer(start, used):
    """The client's own id: same as the exit's when free there, else the next free."""
    x = start
    while x in used:
        x = x % U32 + 1
    return x


def _client(client):
    if not isinstance(client, str) or not client or len(client) > 64 or not all(
            c.isascii() and (c.isalnum() or c in ":.%-_[]") for c in client):
        raise BadRequest(f"bad client address {client!r}")
    return client.lower()


def _text(value, name, empty=False):
    if not isinstance(value, str) or (not value and not empty) or len(value) > 64 or not all(
            c.isprintable() and c not in "'\"\\" for c in value):
        raise BadRequest(f"bad {name} {value!r}")
    return value


def _lifetime(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0 < value < float("inf"):
        raise BadRequest(f"lifetime {value!r} must be a positive number of seconds")


def _sane(row):
    """A row repair() may keep: parses, and its id, client and ids look right."""
    try:
        int(row[_ID], 16)
        return (len(row[_ID]) == 16 and isinstance(row[_CLIENT], str)
                and all(isinstance(row[c], int) and 1 <= row[c] <= U32
                        for c in (_TUNNEL, _SESSION, _PEER_TUNNEL, _PEER_SESSION))
                and isinstance(row[_EXPIRES], (int, float)))
    except (TypeError, ValueError, IndexError):
        return False


def _int(value, name, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"{name} {value!r} must be an integer in {lo}-{hi}")
    return value


def _extra(extra):
    import json
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise ValueError("extra must be a dict")
    try:
        text = json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra must be JSON data: {e}") from None
    if len(text) > 4096:
        raise ValueError("extra is limited to 4096 bytes of JSON")
    return json.loads(text)
