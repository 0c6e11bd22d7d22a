"""Lease store benchmark: 10,000 live leases, one call per request as a CGI process does.

    python bench/leases.py [--leases N] [--ops N] [--no-fsync] [--backend NAME ...]

Every operation takes the lock, opens the file, works, syncs and closes, like
one CGI request.  sqlite3 (standard library too) is measured in the same run
as a reference row: one connection per request, WAL journal, synchronous=FULL.
Times are medians; the machine is shared and noisy, so compare rows, not runs.
"""

import argparse
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from microbroker import leases as L  # noqa: E402
from microbroker.leases import dbfile as D, record as R, store as S  # noqa: E402

LIFETIME = 3600.0


def client_addr(i):
    return "fc00::%x:%x" % (i >> 16, i & 0xFFFF)


def bulk_load(store, n, now):
    """Fill a fresh store with n leases in one call (allocate() one by one would
    take minutes on dbm.dumb; the records are exactly what allocate writes)."""
    store.count()                                  # creates the file
    with store._open(True) as tx:
        buckets = {}
        ids = R.Holdings()
        for i in range(n):
            client = client_addr(i)
            home = store._home(client)
            b = home % store.buckets
            t = s = i + 1
            row = [None] * len(L.FIELDS)
            values = dict(
                lease_id="%02x%s" % (home, os.urandom(7).hex()), secret_hash=S._hash("x" * 32),
                client=client, service="mesh", kind="l2tpv3", encap="ip", local="fc00::1",
                remote=client, tunnel_id=t, peer_tunnel_id=t, session_id=s, peer_session_id=s,
                ifname=f"mb{t}", mtu=1450, mac="", udp_port=0, peer_udp_port=0, created=now,
                renewed=now, expires=now + LIFETIME + random.random(), state="up",
                rx_packets=0, rx_bytes=0, tx_packets=0, tx_bytes=0, seen=0.0, extra={})
            for k, v in values.items():
                row[R._F[k]] = v
            buckets.setdefault(b, R.Bucket(b"", "")).put(None, row)
            ids.add(row)
        ids.cursor = n + 1
        ids.next_expiry = now + LIFETIME
        tx.reserve({b"ids": R._HEAD.size + len(ids.payload()), **{
            b"b%02x" % b: R._HEAD.size + len(bucket.payload()[0])
            for b, bucket in buckets.items()}})
        tx.put_ids(ids)
        tx.flush()
        for b, bucket in buckets.items():
            tx.put_bucket(b, bucket)


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def file_size(path):
    d = os.path.dirname(path)
    base = os.path.basename(path)
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
               if f.startswith(base) and not f.endswith(".lock"))


def bench_dbm(backend, n, ops, fsync):
    d = tempfile.mkdtemp(prefix="mbbench-")
    try:
        path = os.path.join(d, "leases")
        store = L.LeaseStore(path, tunnel_ids=(1, 0xFFFFFF), session_ids=(1, 0xFFFFFF),
                             backend=backend, fsync=fsync)
        now = time.time()
        bulk_load(store, n, now)
        held = [(lease.lease_id, lease.client) for lease in random.sample(store.leases(), ops)]
        res = {}

        it = iter(range(n, n + 10 * ops))
        new = []

        def alloc():
            lease, secret, _ = store.allocate(client_addr(next(it)), "mesh", "l2tpv3", "ip",
                                              "fc00::1", 1450, LIFETIME)
            new.append(lease.lease_id)
        res["allocate"] = timed(alloc, ops)

        # renew needs the secret: give the sampled leases a known one first
        secrets = {}
        for lease_id, client in held:
            lease, secret, _ = store.allocate(client, "mesh", "l2tpv3", "ip", "fc00::1",
                                              1450, LIFETIME)
            secrets[lease_id] = (secret, client)
        cycle = iter(list(secrets.items()) * 3)

        def renew():
            lease_id, (secret, client) = next(cycle)
            store.renew(lease_id, secret, client, LIFETIME)
        res["renew"] = timed(renew, ops)

        cycle2 = iter(list(secrets.items()) * 3)

        def lookup():
            lease_id, (secret, client) = next(cycle2)
            store.authorize(lease_id, secret, client)
        res["lookup"] = timed(lookup, ops)

        for lease_id in new:
            store.remove(lease_id)
        res["leases"] = store.count()
        res["size"] = file_size(path)
        res["sweep_none"] = timed(store.sweep, 5)
        t0 = time.perf_counter()
        gone = store.sweep(now + 10 * LIFETIME)
        res["sweep_all"] = time.perf_counter() - t0
        assert len(gone) == n, (len(gone), n)
        return res
    finally:
        shutil.rmtree(d, ignore_errors=True)


def bench_sqlite(n, ops):
    d = tempfile.mkdtemp(prefix="mbbench-")
    try:
        path = os.path.join(d, "leases.sqlite")

        def connect():
            db = sqlite3.connect(path, isolation_level=None, timeout=5)
            db.execute("PRAGMA synchronous=FULL")
            return db

        db = connect()
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE lease (lease_id TEXT PRIMARY KEY, client TEXT, service TEXT,"
                   " tunnel_id INTEGER UNIQUE, session_id INTEGER UNIQUE, expires REAL, row TEXT)")
        db.execute("CREATE INDEX lease_client ON lease (client)")
        db.execute("CREATE INDEX lease_expires ON lease (expires)")
        now = time.time()
        rowtext = "x" * 330                      # about the size of a dbm row
        db.execute("BEGIN")
        db.executemany("INSERT INTO lease VALUES (?,?,?,?,?,?,?)",
                       (("%016x" % i, client_addr(i), "mesh", i + 1, i + 1,
                         now + LIFETIME + random.random(), rowtext) for i in range(n)))
        db.execute("COMMIT")
        db.close()
        ids = ["%016x" % i for i in random.sample(range(n), ops)]
        res = {}
        it = iter(range(n, n + 10 * ops))

        def request(fn):
            def run():
                db = connect()
                db.execute("BEGIN IMMEDIATE")
                fn(db)
                db.execute("COMMIT")
                db.close()
            return run

        def alloc(db):
            i = next(it)
            c = client_addr(i)
            db.execute("SELECT count(*) FROM lease WHERE client=?", (c,)).fetchone()
            db.execute("SELECT count(*) FROM lease").fetchone()
            t = db.execute("SELECT max(tunnel_id) FROM lease").fetchone()[0] + 1
            db.execute("INSERT INTO lease VALUES (?,?,?,?,?,?,?)",
                       ("%016x" % i, c, "mesh", t, t, time.time() + LIFETIME, rowtext))
        res["allocate"] = timed(request(alloc), ops)
        cyc = iter(ids * 3)
        res["renew"] = timed(request(lambda db: db.execute(
            "UPDATE lease SET expires=? WHERE lease_id=?", (time.time() + LIFETIME, next(cyc)))),
            ops)
        cyc2 = iter(ids * 3)
        res["lookup"] = timed(request(lambda db: db.execute(
            "SELECT row FROM lease WHERE lease_id=?", (next(cyc2),)).fetchone()), ops)
        request(lambda db: db.execute("DELETE FROM lease WHERE lease_id >= ?", ("%016x" % n,)))()
        res["leases"] = n
        res["size"] = file_size(path)

        def sweep(t):
            def fn(db):
                rows = db.execute("SELECT row FROM lease WHERE expires <= ?", (t,)).fetchall()
                db.execute("DELETE FROM lease WHERE expires <= ?", (t,))
                return rows
            return fn
        res["sweep_none"] = timed(request(sweep(time.time())), 5)
        t0 = time.perf_counter()
        request(sweep(now + 10 * LIFETIME))()
        res["sweep_all"] = time.perf_counter() - t0
        return res
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--leases", type=int, default=10000)
    ap.add_argument("--ops", type=int, default=300, help="operations timed per column")
    ap.add_argument("--no-fsync", action="store_true", help="LeaseStore(fsync=False)")
    ap.add_argument("--backend", action="append", help="dbm backend(s); default all available")
    args = ap.parse_args()
    backends = args.backend or L.available_backends()
    print(f"python {sys.version.split()[0]} ({sys.executable}), {args.leases} live leases, "
          f"{args.ops} ops per column, fsync={'off' if args.no_fsync else 'on'}; medians")
    head = ("backend", "buckets", "allocate", "renew", "lookup", "sweep none", "sweep all",
            "file")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    rows = []
    for b in backends:
        rows.append((b, D._BUCKETS[D._norm_backend(b)],
                     bench_dbm(b, args.leases, args.ops, not args.no_fsync)))
    rows.append(("sqlite3 (reference)", "-", bench_sqlite(args.leases, args.ops)))
    for name, k, r in rows:
        def per(sec):
            return f"{sec * 1000:.3f} ms ({1 / sec:,.0f}/s)"
        print(f"| {name} | {k} | {per(r['allocate'])} | {per(r['renew'])} | {per(r['lookup'])} "
              f"| {r['sweep_none'] * 1000:.1f} ms | {r['sweep_all'] * 1000:.1f} ms "
              f"| {r['size'] / 1e6:.2f} MB |")


if __name__ == "__main__":
    main()
