"""check-leases and repair-leases: the store's invariants, and a fresh file
with every lease whose record still verifies.

repair() reads what it can two ways and keeps the newest copy of each
bucket: through the dbm (each record by name, never by iterating the keys:
iterating a damaged dbm.gnu file puts it into "needs recovery", after which
every fetch fails), and by a raw scan of the backend's data file for slots
whose checksum verifies (record.py), which works where the dbm will not
open at all and where dbm.dumb's index (.dir, or .bak) points wrong.
"""

import os
import time

from microbroker.leases.dbfile import _BUCKETS, SCHEMA, Records, StoreError
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
    the file (earlier values, or what a backend left in space it reused) can
    be older than it whatever their generation says, so they only stand in
    for buckets the dbm cannot read, newest copy first, and only with leases
    whose ids the ids record still holds (when it reads).  Leases from
    records the dbm read are kept first; of two leases holding the same id,
    UDP port or pool item the first kept wins.  Ids of lost leases are not
    reserved: the broker's exclude set and the dataplane's reconcile deal with
    tunnels the kernel still holds."""
    lost, moved, kept = [], [], []
    with _FileLock(store.lock_path, store.lock_timeout, store.mode):
        buckets = _BUCKETS[store.backend]
        current = {}                    # bucket -> payload read through the dbm
        live = None                     # (tunnels, sessions) of the ids record
        top = 0                         # the highest generation seen
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
                    buckets = store.buckets
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
                        live = (ids.tunnels, ids.sessions)
                    except Exception:
                        pass
            finally:
                try:
                    old.close()
                except Exception:
                    pass
        copies = {}                     # bucket -> [(gen, rows)] for buckets the dbm lost
        for gen, payload in _scan(store):
            top = max(top, gen)
            got = _bucket_rows(payload, buckets, store.path)
            if got is not None and got[0] not in current:
                copies.setdefault(got[0], []).append((gen, got[1]))
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
        for b in sorted(copies):
            # Newest copy first; an older one adds what the newer lacks only
            # when the ids record can tell a live lease from a released one.
            ordered = sorted(copies[b], key=lambda c: -c[0])
            for gen, found in ordered if live is not None else ordered[:1]:
                for row in found:
                    if live is None or (has(live[0], row[_TUNNEL])
                                        and has(live[1], row[_SESSION])):
                        rows.append(row)
                    else:
                        stale.add(row[_ID])     # released (or never this file's)
        for b in range(buckets):
            if b not in current and b not in copies:
                lost.append("b%02x" % b)

        stamp = time.strftime("%Y%m%d-%H%M%S")
        for f in store._db_files():
            dst = f"{store.path}.corrupt-{stamp}{f[len(store.path):]}"
            os.replace(f, dst)
            moved.append(dst)
        store._meta_raw, store.layout = None, {}
        store._create()

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
            # Generations go on from the old file's: copies of it that the
            # new file may hold in unused space stay older than its records.
            for name in [b"ids"] + [b"b%02x" % b for b in out]:
                tx.read(name)
                tx.slots[name][1] = max(tx.slots[name][1], top)
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
