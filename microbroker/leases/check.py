"""check-leases and repair-leases: the store's invariants, and a fresh file
with every lease whose record still verifies.

repair() reads what it can two ways: through the dbm (each record by name,
never by iterating the keys: iterating a damaged dbm.gnu file puts it into
"needs recovery", after which every fetch fails), and by a raw scan of the
backend's data file for slots whose checksum verifies (record.py), which
works where the dbm will not open at all and where dbm.dumb's index (.dir,
or .bak) points wrong.  What the dbm reads is the record; scanned copies
stand in only for what it cannot read.
"""

import os
import time

from microbroker.leases.dbfile import _BUCKETS, FORMAT, SCHEMA, Records, StoreError
from microbroker.leases.errors import Corrupt
from microbroker.leases.lock import _FileLock
from microbroker.leases.record import (
    _CLIENT, _EXPIRES, _HEAD, _ID, _IFNAME, _MAGIC, _PEER_SESSION, _PEER_TUNNEL,
    _SERVICE, _SESSION, _TUNNEL, U32, Bucket, Holdings, _row, _unpack, has,
    held_items, home)


def check(store):
    """Read every record and check the invariants; a report dict.

    ok: nothing allocated is held twice (exit ids, interface names, UDP
    ports, pool items anywhere; client ids per client), everything held is
    in the ids record, every lease in its bucket.  leaked_ids counts ids a
    crash left reserved for nobody (freed by the next sweep).  Raises
    Corrupt like the other calls when a record cannot be read."""
    with store._open(False) as tx:
        exit_ids, peer_ids, names, items, services = set(), set(), set(), set(), {}
        dup, dup_names, dup_items, misplaced, n = [], [], [], [], 0
        rows = []
        for b in range(store.buckets):
            for row in tx.bucket(b)[0].rows():
                n += 1
                rows.append(row)
                services[row[_SERVICE]] = services.get(row[_SERVICE], 0) + 1
                if (int(row[_ID][:2], 16) % store.buckets != b
                        or home(row[_CLIENT]) % store.buckets != b):
                    misplaced.append(row[_ID])
                for key, seen in ((("t", row[_TUNNEL]), exit_ids),
                                  (("s", row[_SESSION]), exit_ids),
                                  ((row[_CLIENT], "t", row[_PEER_TUNNEL]), peer_ids),
                                  ((row[_CLIENT], "s", row[_PEER_SESSION]), peer_ids)):
                    if key in seen:
                        dup.append(key)
                    seen.add(key)
                if row[_IFNAME] in names:
                    dup_names.append(row[_IFNAME])
                names.add(row[_IFNAME])
                for item in held_items(row):
                    if item in items:
                        dup_items.append(item.decode())
                    items.add(item)
        ids = tx.ids()
        unreserved = [x for kind, x in exit_ids
                      if not has(ids.tunnels if kind == "t" else ids.sessions, x)]
        unreserved += sorted(i.decode() for i in items - ids.held)
        undercounted = [k for k, v in services.items() if ids.services.get(k, 0) < v]
        return {"path": store.path, "backend": store.backend, "schema": SCHEMA,
                "buckets": store.buckets, "leases": n, "duplicate_ids": dup,
                "duplicate_ifnames": dup_names, "duplicate_items": dup_items,
                "unreserved_ids": unreserved, "misplaced": misplaced,
                "leaked_ids": len(ids.tunnels) - n,
                "ok": not (dup or dup_names or dup_items or unreserved or misplaced
                           or undercounted)}


def repair(store):
    """Keep every lease whose record verifies and start a fresh file with them.

    The old files are moved aside to <path>.corrupt-<time>*.  A bucket the
    dbm still reads is kept as read: copies the raw scan finds elsewhere in
    the file (earlier values, or what a backend left in space it reused, even
    of other files) can be older than it whatever their generation says, so
    they only stand in for buckets the dbm cannot read: the newest copy of
    each, none from below the file's first generation, and of a copy older
    than the ids record only leases whose ids it holds.  Leases from records
    the dbm read are kept first, then those of copies, newest first; of two
    leases holding the same id, UDP port or pool item the first kept wins.  Ids of lost leases are not
    reserved: the broker's exclude set and the dataplane's reconcile deal with
    tunnels the kernel still holds."""
    lost, moved, kept = [], [], []
    with _FileLock(store.lock_path, store.lock_timeout, store.mode):
        buckets = _BUCKETS[store.backend]
        current = {}                    # bucket -> payload read through the dbm
        live = None                     # (tunnels, sessions) of the ids record
        since = None                    # a scanned ids record's generation
        top = 0                         # the highest generation seen
        floor = None                    # the file's first generation (meta)
        try:
            if store.backend == "dbm.dumb":
                store._fix_dumb_index()
            old = Records(store, False)
        except StoreError:
            old = None
        if old is not None:
            try:
                try:
                    store._check_meta(old)          # the layout, when it still reads
                    buckets, floor = store.buckets, store.first_gen
                except StoreError:
                    pass
                for name in [b"b%02x" % b for b in range(buckets)] + [b"ids"]:
                    try:
                        rec = old.read(name)
                    except Exception:   # a damaged dbm may fail any fetch
                        continue
                    if rec is None:
                        continue
                    top = max(top, old.slots[name][1])
                    if name != b"ids":
                        current[int(name[1:], 16)] = rec[2]
                        continue
                    try:
                        ids = Holdings(rec[2])
                        live, since = (ids.tunnels, ids.sessions), None
                    except Exception:
                        pass
            finally:
                try:
                    old.close()
                except Exception:
                    pass
        copies, metas, holdings = [], [], []    # (gen, ...) of what the scan found
        for gen, payload in _scan(store):
            top = max(top, gen)
            if payload.startswith(b"{"):
                metas.append((gen, payload))
                continue
            got = _bucket_rows(payload, buckets, store.path)
            if got is None:
                if live is None and _is_ids(payload):
                    holdings.append((gen, payload))
            elif got[0] not in current:
                copies.append((gen, got[0], got[1]))
        if floor is None:
            floor = _first_gen(metas, store.backend)
        # Copies from below the file's first generation are another file's.
        # Newest first: a file's generations start above those of every file
        # written before it (dbfile._create), so across buckets too the
        # file's own copies come before what an older file left in it.
        copies = sorted((c for c in copies if c[0] >= floor), key=lambda c: -c[0])
        holdings = [h for h in holdings if h[0] >= _CLOCK_GENS and h[0] >= floor]
        if live is None and holdings:
            # A scanned ids record can be an older one (on Berkeley DB the
            # current one may span chunks): it judges only copies older than
            # itself, which clock generations tell (dbfile._clock_gen).
            since, payload = max(holdings)
            ids = Holdings(payload)
            live = (ids.tunnels, ids.sessions)
        rows, stale = [], set()
        for b in sorted(current):
            for line in Bucket(current[b], store.path).lines:
                try:
                    row = _row(line, store.path)
                except Corrupt:
                    row = None
                if _sane(row):
                    rows.append(row)
                else:
                    lost.append("b%02x" % b)
        taken = set()
        for gen, b, found in copies:
            # The newest copy of a bucket is the latest state found: a lease
            # that lives now and is in an older copy is in that one too.
            if b in taken:
                continue
            taken.add(b)
            # The ids record holds the ids of every lease alive when it was
            # written: a lease of an older copy without them has been released.
            judged = live is not None and (since is None or gen <= since)
            for row in found:
                if not judged or (has(live[0], row[_TUNNEL])
                                  and has(live[1], row[_SESSION])):
                    rows.append(row)
                else:
                    stale.add(row[_ID])     # released (or never this file's)
        for b in range(buckets):
            if b not in current and b not in taken:
                lost.append("b%02x" % b)

        stamp = time.strftime("%Y%m%d-%H%M%S")
        for f in store._db_files():
            dst = f"{store.path}.corrupt-{stamp}{f[len(store.path):]}"
            os.replace(f, dst)
            moved.append(dst)
        store._meta_raw, store.layout = None, {}
        # Generations go on from the old file's: its copies that the new file
        # may hold in unused space stay below the new file's first.
        store._create(top + 1)

        tx = Records(store, True)
        try:
            store._check_meta(tx)
            out, ids, seen = {}, Holdings(), set()
            for row in rows:
                b = int(row[_ID][:2], 16) % store.buckets
                if row[_ID] in seen:
                    continue            # an older copy of a lease already taken
                seen.add(row[_ID])
                if (home(row[_CLIENT]) % store.buckets != b
                        or has(ids.tunnels, row[_TUNNEL])
                        or has(ids.sessions, row[_SESSION])
                        or ids.held.intersection(held_items(row))):
                    continue
                ids.add(row)
                out.setdefault(b, Bucket(b"", store.path)).put(None, row)
                kept.append(row)
            ids.next_expiry = min((r[_EXPIRES] for r in kept), default=0.0)
            tx.reserve({b"ids": _HEAD.size + len(ids.payload()), **{
                b"b%02x" % b: _HEAD.size + len(bucket.payload()[0])
                for b, bucket in out.items()}})
            tx.put_ids(ids)
            tx.flush()
            for b, bucket in out.items():
                tx.put_bucket(b, bucket)
        finally:
            tx.close()
        store._publish(ids)
    return {"kept": len(kept), "dropped": len(seen | stale) - len(kept),
            "lost_buckets": sorted(set(lost)), "moved_to": moved}


def _first_gen(metas, backend):
    """The first generation the newest meta copy of this backend's file names (0: none)."""
    from microbroker import jsonlite
    for gen, payload in sorted(metas, key=lambda m: -m[0]):
        try:
            meta = jsonlite.loads(payload)
            if meta["format"] != FORMAT or meta["backend"] != backend:
                continue
        except Exception:
            continue
        first = meta.get("first_gen", 0)
        return first if isinstance(first, int) and first > 0 else 0
    return 0


# Generations at least this large come from the clock (2005 and later, in
# microseconds), not from a counter started at 1.
_CLOCK_GENS = 1 << 50


def _is_ids(payload):
    """Is a scanned payload the ids record (it reads back to the same bytes)?"""
    try:
        return Holdings(payload).payload() == payload
    except Exception:
        return False


def _bucket_rows(payload, buckets, where):
    """(bucket, rows) if a scanned payload is a non-empty bucket record: every
    line a sane lease row of one bucket (the ids record's binary start can
    look like a lease id's hex prefix); else None."""
    lines = Bucket(payload, where).lines
    if not lines or payload.startswith(b"{"):
        return None
    try:
        rows = [_row(line, where) for line in lines]
    except Exception:           # (our own slot, but not a bucket's)
        return None
    if not all(_sane(row) for row in rows):
        return None
    b = int(rows[0][_ID][:2], 16) % buckets
    if any(int(row[_ID][:2], 16) % buckets != b or home(row[_CLIENT]) % buckets != b
           for row in rows):
        return None
    return b, rows


def _scan(store):
    """(gen, payload) of every slot in the backend's data files whose checksum
    verifies, wherever it lies (Berkeley DB's chunked slots only when a
    record fits one chunk)."""
    files = {"dbm.gnu": ("",), "dbm.ndbm": (".db", ".pag"),
             "dbm.dumb": (".dat",)}[store.backend]
    for sfx in files:
        try:
            with open(store.path + sfx, "rb") as f:
                data = f.read()
        except OSError:
            continue
        i = data.find(_MAGIC)
        while i >= 0:
            if i + _HEAD.size <= len(data):
                length = _HEAD.unpack_from(data, i)[3]
                slot = _unpack(data[i:i + _HEAD.size + length])
                if slot is not None:
                    yield slot[0], slot[3]
            i = data.find(_MAGIC, i + 1)


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
