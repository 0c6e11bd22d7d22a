"""The lease API: allocate, renew, release, sweep and the lookups, each one
locked read-modify-write of the lease file (dbfile.py).

A lease lives in the bucket of its client, so everything about one client
(reuse, per-client quota, the client's own ids) reads one bucket; the first
byte of a lease id is the client's hash byte, so get/renew/release find the
bucket from the id alone.  Everything a lease holds that must be unique (the
exit's tunnel and session ids, its UDP port, its pool items) is in the ids
record (Holdings) and is picked, checked against every quota and written in
the one transaction of allocate(); renew and lookups never read it.

Invariant across records: everything a lease holds is in the ids record
(written and synced before the lease, and dropped only after the lease is
gone); a crash in between leaves an id or item that nobody holds, which the
next sweep finds (the lease count no longer matches) and frees.

Beside the file, `<path>.counts` says how many leases there are, in total
and per service: a line appended (counts.py) by every call that changes
that, read without any lock by offers.  It may lag one crashed call behind.

Records are kept from the exit's side: tunnel_id/session_id are the exit's
ids, peer_* the client's.
"""

import posix
import time
from _bisect import bisect_left     # (bisect.py re-exports it; see record.py)

from microbroker import jsonlite
from microbroker.leases.dbfile import LeaseFile
from microbroker.leases.errors import (
    BadRequest, Busy, Conflict, Exhausted, Forbidden, Full, NotFound, PoolExhausted,
    RateLimited, TooMany)
from microbroker.leases.record import (
    _CLIENT, _EXPIRES, _F, _ID, _PEER_SESSION, _PEER_TUNNEL, _RENEWED, _SECRET,
    _SERVICE, _SESSION, _STATE, _TUNNEL, FIELDS, U32, _lease, _rows, has,
    held_items, home, udp_item)
from microbroker.leases.secret import digest, matches

STATES = ("pending", "up", "closing")
ENCAPS = ("ip", "udp")
IFNAMSIZ = 16                                    # including the trailing NUL

# What update() may not touch: identity, ids, and what ids derive.
_NUMBERS = {"mtu", "udp_port", "peer_udp_port", "created", "renewed", "expires",
            "rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "seen"}
_FIXED = {"lease_id", "secret_hash", "client", "remote", "service", "tunnel_id",
          "peer_tunnel_id", "session_id", "peer_session_id", "ifname", "udp_port"}


class LeaseStore(LeaseFile):
    """Leases in one dbm file; every method is one locked read-modify-write."""

    def __init__(self, path, tunnel_ids=(1, 0xFFFF), session_ids=(1, 0xFFFF),
                 max_leases=0, max_per_client=0, ifname_prefix="mb",
                 backend=None, lock_timeout=5.0, fsync=True, mode=0o600):
        self.tunnel_ids = self._range(tunnel_ids, "tunnel_ids")
        self.session_ids = self._range(session_ids, "session_ids")
        self.max_leases = int(max_leases or 0)
        self.max_per_client = int(max_per_client or 0)
        from microbroker.names import check_prefix
        check_prefix(ifname_prefix, self.tunnel_ids[1])
        self.ifname_prefix = ifname_prefix
        LeaseFile.__init__(self, path, backend, lock_timeout, fsync, mode)

    @staticmethod
    def _range(r, name):
        lo, hi = int(r[0]), int(r[1])
        if not 1 <= lo <= hi <= U32:
            raise ValueError(f"{name} {r!r}: need 1 <= lo <= hi <= {U32}")
        return lo, hi

    def __repr__(self):
        return f"LeaseStore({self.path!r}, backend={self.backend!r})"

    _home = staticmethod(home)

    def _bucket_of_id(self, lease_id):
        if not (isinstance(lease_id, str) and len(lease_id) == 16
                and all(c in "0123456789abcdef" for c in lease_id)):
            raise NotFound(f"no lease {lease_id!r}")
        return int(lease_id[:2], 16) % self.buckets

    # public API

    def allocate(self, client, service, kind, encap, local, mtu, lifetime,
                 peer_tunnel_id=None, peer_session_id=None, exclude=(), now=None,
                 mac="", udp_ports=None, peer_udp_port=0, pools=(), limits=(),
                 rate=None, extra=None):
        """A lease for (client, service): (lease, secret, reused).

        The client's live lease for the same service comes back (reused=True)
        with a new secret, the old one then stops working.  A new lease gets,
        in this one locked transaction: free exit ids not in `exclude` (the
        kernel's (tunnel_id, session_id) pairs, gathered by the caller before
        the call), the lowest free UDP port of `udp_ports` (lo, hi), one free
        item of every pool in `pools` ((extra key, pool, length), e.g.
        ("ipv4", "10.98.0.0/24", 32)), within max_per_client, max_leases,
        every (services, most, message) of `limits`, and `rate`
        ((leases per second, burst): a token bucket shared by every process)."""
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
        peer_udp_port = _int(peer_udp_port or 0, "peer_udp_port", 0, 65535)
        mac = _text(mac or "", "mac", True)
        extra = _extra(extra)
        now = time.time() if now is None else now
        secret = posix.urandom(16).hex()
        hb = home(client)
        with self._open(True) as tx:
            b = hb % self.buckets
            bucket, _, _ = tx.bucket(b)
            mine = bucket.client_rows(client)

            for row in mine:
                if row[_SERVICE] == service and row[_STATE] != "closing":
                    row[_SECRET] = digest(secret)
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
            wait = max(1, int(ids.next_expiry - now) + 1)
            if self.max_leases and len(ids.tunnels) >= self.max_leases:
                raise Full(f"all {self.max_leases} leases are taken", retry_after=wait)
            for names, most, message in limits:
                if sum(ids.services.get(n, 0) for n in names) >= most:
                    raise Full(message, retry_after=wait)
            if rate:
                self._take_token(ids, rate, now)

            t, s = self._pick(ids, exclude)
            if pt is None:
                pt = _free_peer(t, {r[_PEER_TUNNEL] for r in mine})
            if ps is None:
                ps = _free_peer(s, {r[_PEER_SESSION] for r in mine})
            udp_port = 0
            if udp_ports:
                udp_port = self._pick_port(ids, service, udp_ports)
                peer_udp_port = peer_udp_port or udp_port
            for key, pool, length in pools:
                extra[key] = self._pick_item(ids, key, pool, length)

            lease_id = self._new_id(hb, bucket)
            row = [None] * len(FIELDS)
            values = dict(
                lease_id=lease_id, secret_hash=digest(secret), client=client,
                service=service, kind=kind, encap=encap, local=local, remote=client,
                tunnel_id=t, peer_tunnel_id=pt, session_id=s, peer_session_id=ps,
                ifname=f"{self.ifname_prefix}{t}", mtu=mtu, mac=mac,
                udp_port=udp_port, peer_udp_port=peer_udp_port,
                created=now, renewed=now, expires=now + lifetime, state="pending",
                rx_packets=0, rx_bytes=0, tx_packets=0, tx_bytes=0, seen=0.0,
                extra=extra)
            for k, v in values.items():
                row[_F[k]] = v

            # What it holds first, durable, then the lease (see the module docstring).
            ids.add(row)
            ids.cursor = t + 1
            ids.next_expiry = min(ids.next_expiry or row[_EXPIRES], row[_EXPIRES])
            tx.put_ids(ids)
            tx.flush()
            _test_pause("allocate")
            bucket.put(None, row)
            tx.put_bucket(b, bucket)
            self._publish(ids)
            return _lease(row), secret, False

    def _pick(self, ids, exclude):
        """Free exit (tunnel_id, session_id), skipping ids the kernel still holds."""
        tlo, thi = self.tunnel_ids
        slo, shi = self.session_ids
        busy_t = {t for t, _ in exclude}
        busy_s = {s for _, s in exclude}
        for t in _free_ids(ids.tunnels, tlo, thi, ids.cursor):
            if t in busy_t:
                continue
            # 1:1 from the tunnel id where free, so ids match with equal ranges.
            pref = slo + (t - tlo) % (shi - slo + 1)
            s = next((x for x in _free_ids(ids.sessions, slo, shi, pref)
                      if x not in busy_s), None)
            if s is None:
                raise Exhausted(f"no free session id in {slo}-{shi}"
                                + (f" ({len(busy_s)} in the kernel)" if busy_s else ""))
            return t, s
        raise Exhausted(f"no free tunnel id in {tlo}-{thi}"
                        + (f" ({len(busy_t)} in the kernel)" if busy_t else ""))

    @staticmethod
    def _pick_port(ids, service, ports):
        lo, hi = ports
        for port in range(lo, hi + 1):
            if udp_item(port, service) not in ids.held:
                return port
        raise Exhausted(f"no free UDP port left for service {service} ({lo}-{hi})")

    @staticmethod
    def _pick_item(ids, key, pool, length):
        from microbroker.addresses import pool_items
        for item in pool_items(pool, length):
            if item.encode() not in ids.held:
                return item
        raise PoolExhausted(f"no free {'address' if key == 'ipv4' else key} left in "
                            f"{key} pool {pool}")

    @staticmethod
    def _take_token(ids, rate, now):
        """One token of the new-lease bucket: `per_second` come back, up to `burst`."""
        per_second, burst = rate
        tokens = burst if ids.tokens < 0 else ids.tokens
        tokens = min(burst, tokens + max(0.0, now - ids.stamp) * per_second)
        if tokens < 1:
            raise RateLimited("new leases are coming faster than this exit grants "
                              "them; ask again later",
                              retry_after=max(1, int((1 - tokens) / per_second) + 1))
        ids.tokens, ids.stamp = tokens - 1, now

    def _publish(self, ids):
        """Write <path>.counts for offers that take no lock (counts.py;
        loaded here: a renew, which changes no count, never needs it)."""
        from microbroker.leases import counts
        counts.write(counts.path_of(self.path), len(ids.tunnels), ids.services,
                     self.mode)

    def counts(self):
        """(total, {service: leases}) without taking the lock: from <path>.counts
        when it reads, else from the ids record (locked, then published).
        A process that read the counts before does not wait for the lock:
        it takes those while another holds it (serve answers offers in one
        thread, which must not stop for a lease being built)."""
        from microbroker.leases import counts
        got = counts.read(counts.path_of(self.path))
        if got is not None:
            return got
        seen = counts.last()
        try:
            with self._open(False, wait=seen is None) as tx:
                ids = tx.ids()
                self._publish(ids)
                return len(ids.tunnels), dict(ids.services)
        except Busy:
            if seen is None:
                raise
            return seen

    @staticmethod
    def _new_id(home, bucket):
        while True:
            lease_id = "%02x%s" % (home, posix.urandom(7).hex())
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
        if not matches(secret, row[_SECRET]) or _client(client) != row[_CLIENT]:
            raise Forbidden("wrong secret or address for this lease")

    def authorize(self, lease_id, secret, client):
        """The lease if secret and client address match; NotFound or Forbidden."""
        with self._open(False) as tx:
            _, _, _, row = self._locate(tx, lease_id)
            self._check(row, secret, client)
            return _lease(row)

    def renew(self, lease_id, secret, client, lifetime, now=None):
        """Heartbeat: expires = now + lifetime. `lifetime` may be a dict
        {service: seconds}: a lease of a service not in it is only
        authorized, and comes back unchanged."""
        lifetimes = lifetime if isinstance(lifetime, dict) else None
        for v in lifetimes.values() if lifetimes is not None else (lifetime,):
            _lifetime(v)
        now = time.time() if now is None else now
        with self._open(True) as tx:
            b, bucket, i, row = self._locate(tx, lease_id)
            self._check(row, secret, client)
            if row[_STATE] == "closing":
                raise NotFound(f"lease {lease_id} is closing")
            if lifetimes is not None:
                if row[_SERVICE] not in lifetimes:
                    return _lease(row)
                lifetime = lifetimes[row[_SERVICE]]
            row[_RENEWED] = now
            row[_EXPIRES] = now + lifetime
            bucket.put(i, row)
            tx.put_bucket(b, bucket)
            return _lease(row)

    def release(self, lease_id, secret, client):
        """End a lease; returns it, gone from the store, for teardown."""
        with self._open(True) as tx:
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
        self._publish(ids)

    def get(self, lease_id):
        with self._open(False) as tx:
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
        with self._open(True) as tx:
            b, bucket, i, row = self._locate(tx, lease_id)
            held = held_items(row)
            for k, v in fields.items():
                row[_F[k]] = v
            if held_items(row) != held:
                raise ValueError("update: pool items are fixed when the lease is allocated")
            bucket.put(i, row)
            tx.put_bucket(b, bucket)
            return _lease(row)

    def remove(self, lease_id):
        """Remove without a secret (kernel rollback, admin); the lease or None."""
        with self._open(True) as tx:
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
        with self._open(True) as tx:
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
                if (not ids.rebuilt and
                        total + len(gone) == len(ids.tunnels) == len(ids.sessions)):
                    ids.drop(gone)
                else:
                    old, ids = ids, self._rebuild_ids(tx, ids.cursor)
                    ids.tokens, ids.stamp = old.tokens, old.stamp
                ids.next_expiry = min(nexts, default=0.0)
                tx.put_ids(ids)
                self._publish(ids)
        return [_lease(r) for r in gone]

    def leases(self, client=None):
        """All leases, or one client's (one bucket read), oldest first."""
        rows = []
        with self._open(False) as tx:
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
        with self._open(False) as tx:
            if client is not None:
                client = _client(client)
                bucket = tx.bucket(self._home(client) % self.buckets)[0]
                rows = bucket.client_rows(client)
                return sum(1 for r in rows if service is None or r[_SERVICE] == service)
            ids = tx.ids()
            if service is None:
                return len(ids.tunnels)
            return ids.services.get(service, 0)

    # health (check.py)

    def check(self):
        """Read every record and check the invariants; a report dict (check.py)."""
        from microbroker.leases.check import check
        return check(self)

    def repair(self):
        """Keep every lease whose record verifies, in a fresh file (check.py)."""
        from microbroker.leases.check import repair
        return repair(self)


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


def _int(value, name, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"{name} {value!r} must be an integer in {lo}-{hi}")
    return value


def _extra(extra):
    """A checked copy of `extra`: JSON data (no NaN), at most 4096 bytes of it."""
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise ValueError("extra must be a dict")
    extra = _json_copy(extra, 0)
    if len(jsonlite.dumps(extra)) > 4096:
        raise ValueError("extra is limited to 4096 bytes of JSON")
    return extra


def _json_copy(v, depth):
    if depth > 16:
        raise ValueError("extra must be JSON data: nested too deep")
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"extra must be JSON data: {v!r} is not a JSON number")
        return v
    if isinstance(v, (list, tuple)):
        return [_json_copy(x, depth + 1) for x in v]
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise ValueError(f"extra must be JSON data: key {k!r} is not a string")
            out[k] = _json_copy(x, depth + 1)
        return out
    raise ValueError(f"extra must be JSON data: {type(v).__name__} is not")


def _free_ids(used, lo, hi, start):
    """Yield the ids in [lo, hi] missing from the sorted list `used`, from start round."""
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



def _test_pause(step):
    """Tests only: MICROBROKER_TEST_PAUSE=STEP:SECONDS holds the race window
    open at STEP."""
    from microbroker.posixfs import decoded
    want = decoded(posix.environ.get(b"MICROBROKER_TEST_PAUSE", b""))
    if want and want.partition(":")[0] == step:
        time.sleep(float(want.partition(":")[2]))
