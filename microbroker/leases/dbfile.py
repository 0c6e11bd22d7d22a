"""The lease file on disk: dbm backends, crash safety, fsync; its lock is
lock.py.

Works on dbm.gnu, dbm.ndbm and dbm.dumb (chosen in that order, recorded in
the file, never switched silently).  The number of dbm keys is fixed and
small whatever the number of leases (ids, bNN, meta; see record.py), because
dbm.dumb rereads its whole key index on every open and rewrites it on every
close; meta is created last, so it is the last line of a dbm.dumb index.

Crash safety.  Every record has two slots (record.py); a write goes to the
slot that does not hold the newest valid copy, so a write torn by kill -9 or
power loss only damages that slot.  The backends' own structures must never
be caught half-updated either: on dbm.gnu and dbm.ndbm every record has a
fixed size, so every write is in place (see _CHUNK), and a record that
outgrows it has the file rebuilt under a new name and renamed over the old
one; dbm.dumb slots are padded to powers of two, so it mostly writes in
place too.  dbm.dumb's own index (.dir) can be torn or missing after a crash
inside its commit; it is checked on every open and restored from dbm.dumb's
.bak copy, the index of the last complete commit.  A file that still cannot
be read raises Corrupt naming it; `microbroker repair-leases` (check.py)
keeps every record that verifies.

Concurrency.  Every call takes an exclusive flock on `<path>.lock` (plus an
in-process lock for threads), each wait bounded by lock_timeout (Busy, with
a retry_after, past it), opens the dbm file, works, syncs, closes and
releases, so CGI processes and server threads interleave safely.
"""

import posix
import sys
import time

from microbroker import jsonlite
from microbroker.posixfs import exists as _exists, is_file as _isfile
from microbroker.leases.errors import Busy, Corrupt, StoreError
from microbroker.leases.lock import BUSY_RETRY, _FileLock
from microbroker.leases.record import (
    _CHUNK, _HEAD, _MINCAP, _UNIT, Bucket, Holdings, _capacity, _fixed_cap,
    _meta_payload, _pack, _put_slot, _sorted_json, _unpack)

SCHEMA = 1
FORMAT = "microbroker-leases"
BACKENDS = ("dbm.gnu", "dbm.ndbm", "dbm.dumb")    # preference order

# dbm.dumb pays per key on every open, the others do not; more buckets make
# each record (and so each renew) smaller.  Must divide 256 (see record.home).
_BUCKETS = {"dbm.dumb": 32, "dbm.gnu": 128, "dbm.ndbm": 128}

# -- backends ------------------------------------------------------------

def available_backends():
    """The dbm backends this Python has, in preference order."""
    out = []
    for name in BACKENDS:
        try:
            _module(name)
        except ImportError:
            continue
        out.append(name)
    return out


def _module(name):
    """The backend's module; ImportError if this Python lacks it."""
    if name == "dbm.gnu" and name not in sys.modules:
        # Lib/dbm/gnu.py is `from _gdbm import *`, but importing it runs the
        # dbm package, which loads dbm.ndbm and its C library: ~2 ms of a CGI
        # request.  The package is the fallback, should _gdbm ever be renamed.
        try:
            import _gdbm
            return _gdbm
        except ImportError:
            pass
    return __import__(name, fromlist=["open"])


def _norm_backend(name):
    if name is None:
        return None
    full = name if name.startswith("dbm.") else "dbm." + name
    if full not in BACKENDS:
        raise ValueError(f"unknown dbm backend {name!r}; one of {', '.join(BACKENDS)}")
    return full


def _clock_gen(now=None):
    """A slot generation from the clock: microseconds since the epoch.

    A write takes the larger of this and one more than the record's newest,
    so each record's generations only grow, and (while the clock holds)
    generations order writes across records and files too: repair can tell
    a copy written before the ids record from one written after, and a
    file's own copies from an older file's. A clock behind the file's
    generations (a router without an RTC, before NTP) loses that order
    for scanned copies only; slots a and b are still told apart."""
    return int((time.time() if now is None else now) * 1e6)


def _fsync(path):
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        posix.fsync(fd)
    finally:
        posix.close(fd)


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



class Records:
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
            self.slots[name] = [1, self.store.first_gen, lens]    # next write: slot a
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
        gen = max(gen + 1, _clock_gen())
        _put_slot(self.db, name + (b".a", b".b")[target],
                  _pack(gen, payload, count, minexp, cap), st.chunk, need)
        lens[target] = cap
        self.slots[name] = [target, gen, lens]
        self.wrote = True

    def reserve(self, needs):
        """Make room for several records at once ({name: bytes}): one rebuild, not many."""
        st = self.store
        if st.fixed and any(n > st.layout.get(name, 0) for name, n in needs.items()):
            self.grow(needs)

    def grow(self, needs):
        """Rebuild the file (gnu, ndbm) with room for `needs` and half as much again
        as every record uses now, under a new name, and rename it over the old one."""
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
        meta = jsonlite.loads(raw)
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
        return Bucket(rec[2], f"{self.store.path} bucket {b}"), rec[0], rec[1]

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
        ids = Holdings(rec[2], rec[1])
        if not ids.complete:
            # Written before held items were kept: derive them once.
            ids = self.store._rebuild_ids(self, ids.cursor)
            ids.rebuilt = True
        return ids

    def put_ids(self, ids):
        self.write(b"ids", ids.payload(), len(ids.tunnels), float(ids.next_expiry))



class _LockedOpen:
    """Context for one public call: lock, make sure the file exists, open, check."""

    def __init__(self, store, writable, wait=True):
        self.store, self.writable = store, writable
        self.lock = _FileLock(store.lock_path, store.lock_timeout if wait
                              else 0, store.mode)
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
            self.tx = Records(st, self.writable)
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



class LeaseFile:
    """The dbm file at `path`: its backend, its records, its lock."""

    def __init__(self, path, backend=None, lock_timeout=5.0, fsync=True, mode=0o600):
        self.path = posix.fspath(path)
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
        self.first_gen = 0                      # the file's lowest generation, from meta
        self._meta_raw = None


    def __repr__(self):
        return f"LeaseStore({self.path!r}, backend={self.backend!r})"

    # files and backends

    def _present(self):
        """Backends whose files exist at self.path."""
        p, ex = self.path, _exists
        found = []
        if _isfile(p):
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
                _module(have)
            except ImportError:
                raise StoreError(f"{self.path}: the lease file was written with {have}, which "
                                 f"this Python ({sys.executable}) lacks; run the broker with a "
                                 f"Python that has it, or move the file away to start anew",
                                 self.path) from None
            return have
        if wanted:
            try:
                _module(wanted)
            except ImportError:
                raise StoreError(f"backend {wanted} is not available in this Python", self.path)
            return wanted
        # The first that imports: importing dbm.dumb loads ast and enum.
        for name in BACKENDS:
            try:
                _module(name)
            except ImportError:
                continue
            return name
        raise StoreError("no dbm backend in this Python", self.path)

    def _suffixes(self):
        return {"dbm.gnu": ("",), "dbm.ndbm": (".db", ".pag", ".dir"),
                "dbm.dumb": (".dat", ".dir", ".bak")}[self.backend]

    def _complete(self):
        p, ex = self.path, _exists
        if self.backend == "dbm.gnu":
            return _isfile(p)
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
                posix.fsync(dst.fileno())
            posix.replace(tmp, d)
            self._fsync_dir()
            return
        if not _exists(d) and not _exists(bak):
            if _exists(dat):
                # Creation renames .dat before .dir: it was interrupted, nothing to keep.
                posix.replace(dat, dat + ".incomplete")
            return
        raise Corrupt(f"{self.path}: the dbm.dumb index ({d}) is damaged and has no good "
                      f"backup; `microbroker repair-leases` starts a new file", self.path)

    def _fsync_dir(self):
        if not self.fsync:
            return
        path = self.path if self.path.startswith("/") else posix.getcwd() + "/" + self.path
        fd = posix.open(path.rpartition("/")[0] or "/", posix.O_RDONLY)
        try:
            posix.fsync(fd)
        finally:
            posix.close(fd)

    def _open_db(self, flag, path=None):
        path = path or self.path
        try:
            return self._mod.open(path, flag, self.mode)
        except Exception as e:
            import errno
            if e.args and e.args[0] in (errno.EAGAIN, errno.EWOULDBLOCK):  # dbm.gnu's own lock
                raise Busy(f"{path}: locked by a process outside microbroker ({e})",
                           self.path, BUSY_RETRY) from e
            raise Corrupt(f"{path}: cannot open the {self.backend} lease file ({e}); "
                          f"`microbroker repair-leases` moves it aside and starts anew",
                          self.path) from e

    def _db_files(self, path=None, synced=False):
        """The backend's files; synced=True leaves out dbm.dumb's .bak (the
        previous index, renamed, already on disk)."""
        path = path or self.path
        return [path + s for s in self._suffixes()
                if not (synced and s == ".bak") and _exists(path + s)]

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
            if _isfile(tmp + s):
                posix.unlink(tmp + s)
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
            posix.replace(f, self.path + f[len(tmp):])
        self._fsync_dir()

    def _create(self, first_gen=0):
        """Build an empty store under a temporary name, then rename it into place.

        Its generations start at the clock (or first_gen, if higher; see
        _clock_gen), recorded in meta: above those of any file written
        before, whose copies a backend may leave in the new file's unused
        space (Berkeley DB writes what its page buffers held before), so the
        raw scan of repair can tell them from the file's own."""
        k = _BUCKETS[self.backend]
        names = self._names(k)
        now = time.time()
        gen = max(int(first_gen), _clock_gen(now))
        meta = {"format": FORMAT, "schema": SCHEMA, "backend": self.backend,
                "buckets": k, "created": now, "first_gen": gen}
        payloads = {name: b"" for name in names}
        payloads[b"ids"] = Holdings().payload()
        if self.fixed:
            caps = {name: _fixed_cap(_HEAD.size + len(p), self.unit)
                    for name, p in payloads.items()}
            payloads[b"meta"] = _meta_payload(meta, caps, self.unit)
        else:
            payloads[b"meta"] = _sorted_json(meta)
            caps = {name: _capacity(_HEAD.size + len(p), 0) for name, p in payloads.items()}
        # Both slots exist from the start, so later writes keep the key set fixed.
        slots = {name: [(gen + 1, 0, 0.0, p), (gen, 0, 0.0, p)] for name, p in payloads.items()}
        self._build(self.path + ".new", names, slots, caps)
        self._install(self.path + ".new")

    def _open(self, writable, wait=True):
        """wait=False: Busy at once when another holds the lock."""
        return _LockedOpen(self, writable, wait)

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
        first = meta.get("first_gen", 0)
        self.first_gen = first if isinstance(first, int) and first > 0 else 0
        self.buckets = k
        self._meta_raw = raw

    def _rebuild_ids(self, tx, keep_cursor=0):
        """The ids record derived from the leases themselves."""
        ids = Holdings()
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

