"""Lease store rules (issue 3), run on every dbm backend this Python has.

Concurrency and crash tests are in test_leases_hostile.py."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest

from microbroker import leases as L

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = 1_000_000.0


def have(name):
    try:
        __import__(name)
    except ImportError:
        return False
    return True


BACKENDS = [pytest.param(b, id=b.split(".")[1], marks=pytest.mark.skipif(
    not have(b), reason=f"{b} is not in this Python ({sys.executable})"))
    for b in L.BACKENDS]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "leases")


@pytest.fixture
def mk(path, backend):
    def make(**kw):
        kw.setdefault("backend", backend)
        return L.LeaseStore(path, **kw)
    return make


def grant(store, client="fc00::1", service="mesh", lifetime=600, now=T0, encap="ip", mtu=1450,
          **kw):
    return store.allocate(client, service, "l2tpv3", encap, "fc00::ff", mtu, lifetime,
                          now=now, **kw)


def files_of(path):
    d, base = os.path.split(path)
    return [os.path.join(d, f) for f in os.listdir(d) if f.startswith(base)]


def damage(store, name, which="newest"):
    """Flip a payload byte in the newest (or both) slots of a record, as a torn write would."""
    with store._open(True) as tx:
        tx.read(name)
        newest = tx.slots[name][0]
        for i in ((newest,) if which == "newest" else (0, 1)):
            key = name + (b".a", b".b")[i] + (b".0" if store.chunk else b"")
            raw = bytearray(tx.db[key])
            raw[4] ^= 0xFF                      # the checksum
            tx.db[key] = bytes(raw)
    store._meta_raw = None


def bucket_of(store, lease):
    return int(lease.lease_id[:2], 16) % store.buckets


def rewrite_meta(store, **changes):
    with store._open(True) as tx:
        meta = json.loads(tx.read(b"meta")[2])
        meta.update(changes)
        tx.write(b"meta", json.dumps(meta).encode())


# -- a lease ------------------------------------------------------------

def test_allocate_fills_every_field(mk, path, backend):
    st = mk()
    lease, secret, reused = grant(st, mtu=1450)
    assert reused is False
    assert re.fullmatch(r"[0-9a-f]{16}", lease.lease_id)
    assert re.fullmatch(r"[0-9a-f]{32}", secret)
    assert lease.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert (lease.client, lease.remote, lease.service) == ("fc00::1", "fc00::1", "mesh")
    assert (lease.kind, lease.encap, lease.local, lease.mtu) == ("l2tpv3", "ip", "fc00::ff", 1450)
    assert lease.tunnel_id >= 1 and lease.session_id >= 1
    assert lease.peer_tunnel_id >= 1 and lease.peer_session_id >= 1
    assert lease.ifname == f"mb{lease.tunnel_id}"
    assert (lease.created, lease.renewed, lease.expires) == (T0, T0, T0 + 600)
    assert lease.state == "pending"
    assert (lease.rx_packets, lease.rx_bytes, lease.tx_packets, lease.tx_bytes) == (0, 0, 0, 0)
    assert (lease.mac, lease.udp_port, lease.peer_udp_port, lease.extra) == ("", 0, 0, {})
    assert st.get(lease.lease_id) == lease
    # a new instance (a later CGI process) finds it and the backend by itself
    again = L.LeaseStore(path)
    assert again.backend == backend
    assert again.get(lease.lease_id) == lease


def test_only_a_hash_of_the_secret_is_stored(mk, path):
    st = mk()
    _, secret, _ = grant(st)
    for f in files_of(path):
        with open(f, "rb") as fh:
            assert secret.encode() not in fh.read(), f


def test_lease_class_matches_the_schema_row():
    code = L.Lease.__init__.__code__
    assert code.co_varnames[1:code.co_argcount] == L.FIELDS
    assert L.Lease.__slots__ == L.FIELDS


def test_lease_file_is_private(mk, path):
    st = mk()
    grant(st)
    for f in files_of(path):
        assert os.stat(f).st_mode & 0o077 == 0, f


# -- reuse ----------------------------------------------------------------

def test_same_client_same_service_gets_its_lease_back_with_a_new_secret(mk):
    st = mk()
    a, s1, _ = grant(st)
    b, s2, reused = grant(st, now=T0 + 10)
    assert reused is True
    assert b.lease_id == a.lease_id and b.tunnel_id == a.tunnel_id
    assert b.session_id == a.session_id and b.ifname == a.ifname
    assert s2 != s1
    assert b.expires == T0 + 10 + 600
    with pytest.raises(L.Forbidden):
        st.authorize(a.lease_id, s1, "fc00::1")
    assert st.authorize(a.lease_id, s2, "fc00::1").lease_id == a.lease_id
    assert st.count() == 1

    other_service, _, r1 = grant(st, service="other")
    other_client, _, r2 = grant(st, client="fc00::2")
    assert not r1 and not r2
    assert len({a.tunnel_id, other_service.tunnel_id, other_client.tunnel_id}) == 3
    assert st.count() == 3


def test_a_closing_lease_is_not_handed_back(mk):
    st = mk()
    a, _, _ = grant(st)
    st.update(a.lease_id, state="closing")
    b, _, reused = grant(st)
    assert not reused and b.lease_id != a.lease_id and b.tunnel_id != a.tunnel_id


# -- ids ------------------------------------------------------------------

def test_ids_are_unique_never_zero_and_run_out_cleanly(mk):
    st = mk(tunnel_ids=(1, 5), session_ids=(1, 5))
    got = [grant(st, client=f"fc00::{i}")[0] for i in range(5)]
    assert sorted(x.tunnel_id for x in got) == [1, 2, 3, 4, 5]
    assert sorted(x.session_id for x in got) == [1, 2, 3, 4, 5]
    with pytest.raises(L.Exhausted) as e:
        grant(st, client="fc00::99")
    assert e.value.code == "ids_exhausted" and "1-5" in str(e.value)
    assert st.count() == 5
    gone = got[2]
    lease, secret, _ = grant(st, client=gone.client)          # reuse, no new ids
    st.release(gone.lease_id, secret, gone.client)
    fresh, _, _ = grant(st, client="fc00::99")
    assert fresh.tunnel_id == gone.tunnel_id and fresh.session_id == gone.session_id


def test_session_ids_come_from_their_own_range(mk):
    st = mk(tunnel_ids=(100, 199), session_ids=(5000, 5009))
    got = [grant(st, client=f"fc00::{i}")[0] for i in range(10)]
    assert all(100 <= x.tunnel_id <= 199 for x in got)
    assert sorted(x.session_id for x in got) == list(range(5000, 5010))
    with pytest.raises(L.Exhausted, match="session"):
        grant(st, client="fc00::99")


def test_a_released_id_is_not_handed_out_again_at_once(mk):
    st = mk()
    a, s, _ = grant(st)
    st.release(a.lease_id, s, a.client)
    b, _, _ = grant(st, client="fc00::2")
    assert b.tunnel_id != a.tunnel_id


def test_ids_the_kernel_still_holds_are_skipped(mk):
    st = mk(tunnel_ids=(1, 10), session_ids=(1, 10))
    kernel = {(1, 1), (2, 2), (7, 3)}
    lease, _, _ = grant(st, exclude=kernel)
    assert lease.tunnel_id not in (1, 2, 7) and lease.session_id not in (1, 2, 3)

    with pytest.raises(L.Exhausted, match="kernel"):
        grant(st, client="fc00::2", exclude={(t, t) for t in range(1, 11)})
    assert st.count() == 1


def test_clients_propose_their_own_ids_and_collisions_are_named(mk):
    st = mk()
    a, _, _ = grant(st, service="s1", peer_tunnel_id=7, peer_session_id=9)
    assert (a.peer_tunnel_id, a.peer_session_id) == (7, 9)
    with pytest.raises(L.Conflict) as e:
        grant(st, service="s2", peer_tunnel_id=7)
    assert e.value.code == "id_conflict" and "tunnel_id 7" in str(e.value)
    with pytest.raises(L.Conflict, match="session_id 9"):
        grant(st, service="s2", peer_session_id=9)
    assert st.count() == 1
    # another client's kernel is another namespace
    b, _, _ = grant(st, client="fc00::2", service="s1", peer_tunnel_id=7, peer_session_id=9)
    assert (b.peer_tunnel_id, b.peer_session_id) == (7, 9)
    for bad in (0, -1, 2 ** 32, "7", True):
        with pytest.raises(L.BadRequest) as e:
            grant(st, client="fc00::3", peer_tunnel_id=bad)
        assert e.value.code == "bad_request" and isinstance(e.value, ValueError)


def test_default_client_ids_avoid_the_clients_own_proposals(mk):
    st = mk(tunnel_ids=(1, 100), session_ids=(1, 100))
    a, _, _ = grant(st, service="s1", peer_tunnel_id=2, peer_session_id=2)
    assert a.tunnel_id == 1
    b, _, _ = grant(st, service="s2")
    assert b.tunnel_id == 2
    assert b.peer_tunnel_id != 2 and b.peer_session_id != 2
    c, _, _ = grant(st, service="s3")
    peers = [(x.peer_tunnel_id, x.peer_session_id) for x in (a, b, c)]
    assert len({p[0] for p in peers}) == 3 and len({p[1] for p in peers}) == 3
    assert all(p[0] >= 1 and p[1] >= 1 for p in peers)


def test_interface_names_come_from_ids_and_fit_ifnamsiz(path, backend):
    for bad in ("", "a/b", "x y", "l2tp:"):
        with pytest.raises(ValueError):
            L.LeaseStore(path, ifname_prefix=bad, backend=backend)
    with pytest.raises(ValueError, match="15"):
        L.LeaseStore(path, ifname_prefix="longprefix", tunnel_ids=(1, L.U32), backend=backend)
    st = L.LeaseStore(path, ifname_prefix="l2tp", tunnel_ids=(4294967000, L.U32),
                      backend=backend)
    lease, _, _ = grant(st)
    assert lease.ifname == f"l2tp{lease.tunnel_id}" and len(lease.ifname) <= 15
    for client in ("fc00::1; reboot", "a" * 100, "", "fc00::1\n", None, "ф::1"):
        with pytest.raises(L.BadRequest):
            grant(st, client=client)


def test_bad_arguments_are_refused_before_touching_the_file(mk):
    st = mk()
    with pytest.raises(L.BadRequest):
        st.allocate("fc00::1", "mesh", "l2tpv3", "gre", "fc00::ff", 1450, 600)
    with pytest.raises(L.BadRequest):
        st.allocate("fc00::1", "mesh", "l2tpv3", "ip", "fc00::ff", 10, 600)
    for lifetime in (0, float("inf"), float("nan")):
        with pytest.raises(L.BadRequest):
            st.allocate("fc00::1", "mesh", "l2tpv3", "ip", "fc00::ff", 1450, lifetime)
    with pytest.raises(L.BadRequest):
        st.allocate("fc00::1", "me'sh", "l2tpv3", "ip", "fc00::ff", 1450, 600)
    assert st.count() == 0
    with pytest.raises(ValueError):
        L.LeaseStore(st.path + "x", tunnel_ids=(0, 10))
    with pytest.raises(ValueError):
        L.LeaseStore(st.path + "x", session_ids=(5, 2 ** 32))


# -- renew, release, sweep ---------------------------------------------------

def test_renew_pushes_expires_and_checks_secret_and_address(mk):
    st = mk()
    a, s, _ = grant(st)
    b = st.renew(a.lease_id, s, "fc00::1", 300, now=T0 + 100)
    assert (b.renewed, b.expires) == (T0 + 100, T0 + 400)
    assert st.get(a.lease_id).expires == T0 + 400
    with pytest.raises(L.Forbidden) as e:
        st.renew(a.lease_id, "0" * 32, "fc00::1", 300)
    assert e.value.code == "forbidden"
    with pytest.raises(L.Forbidden):
        st.renew(a.lease_id, s, "fc00::2", 300)
    with pytest.raises(L.Forbidden):
        st.renew(a.lease_id, None, "fc00::1", 300)
    for bad in ("0" * 16, "zz" * 8, "short", None):
        with pytest.raises(L.NotFound) as e:
            st.renew(bad, s, "fc00::1", 300)
        assert e.value.code == "not_found"
    with pytest.raises(L.BadRequest):
        st.renew(a.lease_id, s, "fc00::1", 0)
    assert st.get(a.lease_id).expires == T0 + 400
    st.update(a.lease_id, state="closing")
    with pytest.raises(L.NotFound, match="closing"):
        st.renew(a.lease_id, s, "fc00::1", 300)


def test_renew_by_service_lifetimes_in_one_transaction(mk):
    # The broker passes every offered service's lifetime: the lease's own
    # applies; a lease of a service not offered any more is only checked.
    st = mk()
    a, s, _ = grant(st)
    b = st.renew(a.lease_id, s, "fc00::1", {a.service: 500, "other": 9}, now=T0 + 100)
    assert b.expires == T0 + 600 == st.get(a.lease_id).expires
    b = st.renew(a.lease_id, s, "fc00::1", {"other": 9}, now=T0 + 200)
    assert (b.renewed, b.expires) == (T0 + 100, T0 + 600) == \
        (st.get(a.lease_id).renewed, st.get(a.lease_id).expires)
    with pytest.raises(L.Forbidden):
        st.renew(a.lease_id, "0" * 32, "fc00::1", {"other": 9})
    with pytest.raises(L.BadRequest):
        st.renew(a.lease_id, s, "fc00::1", {a.service: 0})


def test_release_ends_the_lease_and_frees_its_ids(mk):
    st = mk(tunnel_ids=(1, 1), session_ids=(1, 1))
    a, s, _ = grant(st)
    with pytest.raises(L.Forbidden):
        st.release(a.lease_id, "0" * 32, a.client)
    assert st.get(a.lease_id) == a
    gone = st.release(a.lease_id, s, a.client)
    assert gone == a
    with pytest.raises(L.NotFound):
        st.get(a.lease_id)
    with pytest.raises(L.NotFound):
        st.release(a.lease_id, s, a.client)
    assert st.count() == 0 and st.check()["ok"]
    b, _, _ = grant(st, client="fc00::2")
    assert b.tunnel_id == 1


def test_sweep_returns_every_expired_lease_exactly_once(mk):
    st = mk()
    got = {}
    for i in range(1, 11):
        lease, secret, _ = grant(st, client=f"fc00::{i}", lifetime=10 * i)
        got[lease.lease_id] = (lease, secret)
    assert st.sweep(now=T0 + 5) == []
    first = st.sweep(now=T0 + 30)                 # expires == now counts as expired
    assert sorted(x.expires - T0 for x in first) == [10, 20, 30]
    assert st.sweep(now=T0 + 30) == []
    for x in first:
        with pytest.raises(L.NotFound):
            st.get(x.lease_id)
    keep = next(lid for lid, (x, _) in got.items() if x.expires == T0 + 40)
    st.renew(keep, got[keep][1], got[keep][0].client, 1000, now=T0 + 35)
    second = st.sweep(now=T0 + 100)
    assert sorted(x.expires - T0 for x in second) == [50, 60, 70, 80, 90, 100]
    assert [x.lease_id for x in st.leases()] == [keep]
    assert st.count() == 1 and st.check()["ok"] and st.check()["leaked_ids"] == 0
    ids = {x.lease_id for x in first + second}
    assert len(ids) == 9 and keep not in ids


def test_an_expired_lease_asked_for_again_is_revived_not_doubled(mk):
    st = mk()
    a, _, _ = grant(st, lifetime=10)
    b, _, reused = grant(st, now=T0 + 50)
    assert reused and b.lease_id == a.lease_id and b.expires == T0 + 650
    assert st.sweep(now=T0 + 100) == []


# -- quotas ---------------------------------------------------------------

def test_per_client_quota(mk):
    st = mk(max_per_client=2)
    grant(st, service="s1", lifetime=100)
    grant(st, service="s2", lifetime=50)
    with pytest.raises(L.TooMany) as e:
        grant(st, service="s3", now=T0 + 10)
    assert e.value.code == "too_many" and 1 <= e.value.retry_after <= 41
    assert grant(st, service="s1")[2] is True              # reuse still works at the limit
    grant(st, client="fc00::2", service="s3")               # others are not affected
    st.sweep(now=T0 + 60)
    grant(st, service="s3", now=T0 + 60)


def test_total_quota(mk):
    st = mk(max_leases=3)
    for i in range(3):
        grant(st, client=f"fc00::{i}", lifetime=100 + i)
    with pytest.raises(L.Full) as e:
        grant(st, client="fc00::9", now=T0 + 20)
    assert e.value.code == "full" and 1 <= e.value.retry_after <= 81
    assert grant(st, client="fc00::1")[2] is True
    st.sweep(now=T0 + 100.5)
    grant(st, client="fc00::9", now=T0 + 101)


# -- update, remove, listing ------------------------------------------------

def test_update_changes_state_and_counters_only(mk):
    st = mk()
    a, _, _ = grant(st)
    b = st.update(a.lease_id, state="up", rx_packets=5, rx_bytes=700, tx_packets=3,
                  tx_bytes=300, seen=T0 + 5, mac="02:00:00:00:00:01",
                  peer_udp_port=4001, extra={"addr": ["fd00::2/64"]})
    assert st.get(a.lease_id) == b
    assert (b.state, b.rx_packets, b.tx_bytes, b.seen) == ("up", 5, 300, T0 + 5)
    assert b.extra == {"addr": ["fd00::2/64"]} and b.mac == "02:00:00:00:00:01"
    for field in ("tunnel_id", "session_id", "peer_tunnel_id", "client", "lease_id", "ifname",
                  "secret_hash", "remote", "nosuchfield", "udp_port"):
        with pytest.raises(ValueError):
            st.update(a.lease_id, **{field: 1})
    # What allocate() picked as unique stays as it picked it.
    with pytest.raises(ValueError, match="pool items"):
        st.update(a.lease_id, extra={"ipv4": "10.98.0.9"})
    # Not finite: JSON has no way to keep it (it would read back as null).
    nan, inf = float("nan"), float("inf")
    for bad in (dict(state="gone"), dict(rx_packets="x"), dict(rx_bytes=-1),
                dict(extra={"x": object()}), dict(encap="gre"), dict(seen=nan),
                dict(expires=inf), dict(extra={"x": inf}), dict(extra={"x": [nan]})):
        with pytest.raises(ValueError):
            st.update(a.lease_id, **bad)
    with pytest.raises(L.NotFound):
        st.update("0" * 16, state="up")
    assert st.get(a.lease_id) == b
    st.update(a.lease_id, expires=T0 + 1)                   # the broker may cut a lease short
    assert [x.lease_id for x in st.sweep(now=T0 + 2)] == [a.lease_id]


def test_remove_needs_no_secret(mk):
    st = mk()
    a, _, _ = grant(st)
    assert st.remove(a.lease_id) == a
    assert st.remove(a.lease_id) is None
    assert st.count() == 0 and st.check()["leaked_ids"] == 0


def test_counts_and_listing(mk):
    st = mk()
    for i, (client, service) in enumerate([("fc00::1", "a"), ("fc00::1", "b"),
                                           ("fc00::2", "a"), ("fc00::3", "a")]):
        grant(st, client=client, service=service, now=T0 + i)
    assert st.count() == 4
    assert st.count(service="a") == 3 and st.count(service="zz") == 0
    assert st.count(client="fc00::1") == 2
    assert st.count(service="a", client="fc00::1") == 1
    assert st.count(client="fc00::9") == 0
    assert [(x.client, x.service) for x in st.leases()] == [
        ("fc00::1", "a"), ("fc00::1", "b"), ("fc00::2", "a"), ("fc00::3", "a")]
    st.sweep(now=T0 + 1000)
    assert st.count() == 0 and st.count(service="a") == 0 and st.leases() == []


def test_counts_file_is_the_last_complete_line(mk, path):
    from microbroker.leases import counts
    st = mk()
    cp = counts.path_of(path)
    grant(st, client="fc00::1", service="a")
    grant(st, client="fc00::2", service="b")
    assert counts.read(cp) == (2, {"a": 1, "b": 1})
    with open(cp, "rb") as f:
        assert len(f.read().splitlines()) >= 2      # appended, not replaced
    # Killed mid-line: the line without its newline does not count, the one
    # before does; the next write ends it first and is read whole.
    with open(cp, "ab") as f:
        f.write(b'{"total":9,"serv')
    assert counts.read(cp) == (2, {"a": 1, "b": 1})
    grant(st, client="fc00::3", service="a")
    assert counts.read(cp) == (3, {"a": 2, "b": 1})
    # A last line that does not parse: the store is asked, and publishes.
    with open(cp, "ab") as f:
        f.write(b'{"total":9,"serv{"total":1}\n')
    assert counts.read(cp) is None
    assert st.counts() == (3, {"a": 2, "b": 1})
    assert counts.read(cp) == (3, {"a": 2, "b": 1})
    # The single line without a newline that an earlier version wrote.
    with open(cp, "wb") as f:
        f.write(b'{"total":3,"services":{"a":2,"b":1}}')
    assert counts.read(cp) is None
    assert st.counts() == (3, {"a": 2, "b": 1})
    assert counts.read(cp) == (3, {"a": 2, "b": 1})


def test_counts_do_not_wait_for_the_lock_once_read(mk, path, monkeypatch):
    """A counts file that does not read, the lock held by another process:
    a process that read the counts before answers with those at once
    (serve's offers, in its one front-door thread); one that never did
    waits its lock_timeout and says busy."""
    import fcntl
    from microbroker.leases import counts
    st = mk(lock_timeout=0.2)
    grant(st, client="fc00::1", service="a")
    assert counts.read(counts.path_of(path)) == (1, {"a": 1})
    with open(counts.path_of(path), "ab") as f:
        f.write(b'{"total":9,"serv{"total":1}\n')
    fd = os.open(path + ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert st.counts() == (1, {"a": 1})
        monkeypatch.setattr(counts, "_last", (None, None))
        with pytest.raises(L.Busy):
            st.counts()
    finally:
        os.close(fd)
    assert st.counts() == (1, {"a": 1})     # and the file is published again
    assert counts.read(counts.path_of(path)) == (1, {"a": 1})


def test_counts_read_again_whenever_the_file_changed(tmp_path):
    """read() keeps the last counts while the file's stat is the same: a
    rewrite renamed in with the same size and mtime is still seen, and a
    caller that changes what it got changes nothing for the next."""
    from microbroker.leases import counts
    cp = str(tmp_path / "leases.counts")
    with open(cp, "wb") as f:
        f.write(b'{"total":1,"services":{"a":1}}\n')
    got = counts.read(cp)
    assert got == (1, {"a": 1})
    got[1]["a"] = 7
    assert counts.read(cp) == (1, {"a": 1})
    when = os.stat(cp).st_mtime_ns
    with open(cp + ".new", "wb") as f:
        f.write(b'{"total":2,"services":{"b":2}}\n')
    os.utime(cp + ".new", ns=(when, when))
    os.replace(cp + ".new", cp)
    assert counts.read(cp) == (2, {"b": 2})
    with open(cp, "ab") as f:
        f.write(b'{"total":3,"services":{"b":3}}\n')
    os.utime(cp, ns=(when, when))
    assert counts.read(cp) == (3, {"b": 3})


def test_counts_go_on_when_the_file_cannot_be_rewritten(tmp_path, monkeypatch):
    """A rewrite past COMPACT that fails leaves no temporary file, and the
    lines are still appended: readers do not see counts stop."""
    from microbroker import linefile
    from microbroker.leases import counts
    cp = str(tmp_path / "leases.counts")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(linefile.posix, "replace", refuse)
    for i in range(1000):
        counts.write(cp, i, {"s": i}, 0o600)
    assert os.path.getsize(cp) > counts.COMPACT
    assert os.listdir(tmp_path) == ["leases.counts"]
    assert counts.read(cp) == (999, {"s": 999})


def test_counts_file_stays_small_and_whole_for_readers(tmp_path):
    """Past COMPACT bytes the file starts again as one line; a reader that
    takes no lock meanwhile sees only counts that were written, whole."""
    from microbroker.leases import counts
    cp = str(tmp_path / "leases.counts")
    stop, seen, bad = [], set(), []

    def reader():
        while not stop:
            # Once it has a line it never goes back to none (the first
            # append creates it empty, then writes).
            try:
                existed = os.path.getsize(cp) > 0
            except OSError:
                existed = False
            got = counts.read(cp)
            if got is None:
                if existed:
                    bad.append(None)
                continue
            total, services = got
            if services != {"s": total, "t": 2 * total}:
                bad.append(got)
            seen.add(total)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(3000):
            counts.write(cp, i, {"s": i, "t": 2 * i}, 0o600)
            assert os.path.getsize(cp) <= counts.COMPACT
    finally:
        stop.append(1)
        t.join()
    assert bad == []
    assert counts.read(cp) == (2999, {"s": 2999, "t": 5998})
    assert len(seen) > 1
    with open(cp, "rb") as f:
        assert f.read().count(b"\n") < 3000      # it was started anew


def test_hundreds_of_leases_in_shared_buckets(mk):
    """More leases than buckets: records grow through several size classes."""
    st = mk(fsync=False)
    got = {}
    for i in range(400):
        lease, secret, _ = grant(st, client=f"fc00::{i:x}", service=f"s{i % 3}")
        got[lease.lease_id] = (lease, secret)
    assert len({x.tunnel_id for x, _ in got.values()}) == 400
    assert len({x.ifname for x, _ in got.values()}) == 400
    for lid, (lease, secret) in list(got.items())[::7]:
        assert st.authorize(lid, secret, lease.client) == lease
    report = st.check()
    assert report["ok"] and report["leases"] == 400 and report["leaked_ids"] == 0
    assert st.count(service="s1") == len([1 for i in range(400) if i % 3 == 1])
    assert len(st.sweep(now=T0 + 10 ** 6)) == 400
    assert st.check()["leases"] == 0


def test_threads_sharing_a_store_do_not_collide(mk):
    st, st2 = mk(fsync=False), mk(fsync=False)
    held, errors = {}, []

    def worker(n):
        store = (st, st2)[n % 2]
        try:
            for i in range(25):
                lease, secret, _ = grant(store, client=f"fc00::{n}:{i}")
                held[lease.lease_id] = (lease, secret)
                if i % 3 == 0:
                    store.release(lease.lease_id, secret, lease.client)
                    del held[lease.lease_id]
                elif i % 3 == 1:
                    store.renew(lease.lease_id, secret, lease.client, 900)
        except Exception as e:            # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    live = st.leases()
    assert {x.lease_id for x in live} == set(held)
    assert len({x.tunnel_id for x in live}) == len(live)
    assert len({x.session_id for x in live}) == len(live)
    assert st.check()["ok"]


# -- backend, schema, damage ---------------------------------------------------

def test_default_backend_is_the_best_available(tmp_path):
    avail = L.available_backends()
    assert avail and list(avail) == [b for b in L.BACKENDS if b in avail]
    assert L.LeaseStore(str(tmp_path / "x")).backend == avail[0]


def test_the_backend_is_recorded_and_never_switched_silently(mk, path, backend):
    st = mk()
    grant(st)
    assert L.LeaseStore(path).backend == backend
    assert L.LeaseStore(path, backend=backend.split(".")[1]).backend == backend
    for other in L.available_backends():
        if other != backend:
            with pytest.raises(L.StoreError, match=re.escape(backend)):
                L.LeaseStore(path, backend=other)
    rewrite_meta(st, backend="dbm.other")
    with pytest.raises(L.Corrupt, match="dbm.other"):
        L.LeaseStore(path).count()


def test_instances_made_before_the_file_exists_never_start_a_second_file(path):
    avail = L.available_backends()
    if len(avail) < 2:
        pytest.skip("needs two dbm backends")
    early = L.LeaseStore(path)                          # would pick avail[0]
    asked = L.LeaseStore(path, backend=avail[0])        # insists on it
    maker = L.LeaseStore(path, backend=avail[-1])
    lease, _, _ = grant(maker)
    assert early.get(lease.lease_id) == lease            # found the file that is there
    assert early.backend == avail[-1]
    with pytest.raises(L.StoreError, match="asked for"):
        asked.count()
    assert L.LeaseStore(path).count() == 1


def test_secret_digest_is_sha256_and_matches_only_its_secret():
    from microbroker.leases import secret
    for s in ("", "0" * 32, "45dc3a04a1ca9f6738b8a89f0a02105a", "\xe9t\xe9"):
        assert secret.digest(s) == hashlib.sha256(s.encode()).hexdigest()
    d = secret.digest("ab" * 16)
    assert secret.matches("ab" * 16, d)
    for wrong, stored in (("ab" * 15 + "ac", d), ("ab" * 16, d[:-1]),
                          ("ab" * 16, d + "0"), ("ab" * 16, ""),
                          (None, d), (b"ab" * 16, d), ("ab" * 16, None)):
        assert not secret.matches(wrong, stored), (wrong, stored)


def test_secret_digest_without_cpythons_own_sha256_is_hashlibs():
    """Where _sha256 cannot be imported (3.12 on), hashlib's is used,
    with the same digests."""
    code = ("import sys; sys.path.insert(0, %r)\n"
            "sys.modules['_sha256'] = None\n"
            "from microbroker.leases import secret\n"
            "print('hashlib' in sys.modules, secret.digest('ab' * 16),"
            " secret.matches('ab' * 16, secret.digest('ab' * 16)))" % ROOT)
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [
        "True", hashlib.sha256(b"ab" * 16).hexdigest(), "True"]


def test_the_gnu_backend_is_dbm_gnu_itself():
    """dbfile takes _gdbm without the dbm package (which loads dbm.ndbm)."""
    if not have("dbm.gnu"):
        pytest.skip("needs dbm.gnu")
    import dbm.gnu
    from microbroker.leases import dbfile
    assert dbfile._module("dbm.gnu").open is dbm.gnu.open
    assert dbfile._module("dbm.gnu").error is dbm.gnu.error


def test_a_file_this_python_cannot_read_is_reported(tmp_path, monkeypatch):
    if not have("dbm.gnu"):
        pytest.skip("needs dbm.gnu to write the file")
    path = str(tmp_path / "leases")
    grant(L.LeaseStore(path, backend="gnu"))
    monkeypatch.setitem(sys.modules, "dbm.gnu", None)       # as on a Python without _gdbm
    with pytest.raises(L.StoreError, match="lacks") as e:
        L.LeaseStore(path)
    assert e.value.code == "store" and path in str(e.value)


def test_a_newer_schema_is_refused(mk, path):
    st = mk()
    grant(st)
    rewrite_meta(st, schema=L.SCHEMA + 1)
    with pytest.raises(L.StoreError, match="newer"):
        L.LeaseStore(path).count()


def test_not_a_lease_file(mk, path):
    st = mk()
    rewrite_meta(st, format="something-else")
    with pytest.raises(L.Corrupt, match="not a microbroker lease file"):
        L.LeaseStore(path).count()


def test_a_torn_slot_falls_back_to_the_previous_copy(mk):
    st = mk()
    a, s, _ = grant(st)
    st.renew(a.lease_id, s, a.client, 100, now=T0 + 1)       # newest copy: expires T0+101
    damage(st, b"b%02x" % bucket_of(st, a))
    assert st.get(a.lease_id).expires == T0 + 600              # the copy before the renew
    assert st.check()["ok"]
    st.renew(a.lease_id, s, a.client, 200, now=T0 + 2)        # writes over the damaged slot
    assert st.get(a.lease_id).expires == T0 + 202


def test_an_unreadable_bucket_is_reported_and_repair_keeps_the_rest(mk, path, backend):
    st = mk()
    mine, s, _ = grant(st)
    others = []
    for i in range(40):
        lease, _, _ = grant(st, client=f"fc00::{i + 2:x}")
        if bucket_of(st, lease) != bucket_of(st, mine):
            others.append(lease)
    damage(st, b"b%02x" % bucket_of(st, mine), which="both")
    with pytest.raises(L.Corrupt) as e:
        st.get(mine.lease_id)
    assert path in str(e.value) and "repair" in str(e.value) and e.value.code == "store"
    assert st.get(others[0].lease_id) == others[0]            # the rest still works
    with pytest.raises(L.Corrupt):
        st.sweep(now=T0)
    report = st.repair()
    assert report["kept"] >= len(others)
    assert all(os.path.exists(f) for f in report["moved_to"])
    for lease in others:
        assert st.get(lease.lease_id) == lease
    if report["lost_buckets"]:
        with pytest.raises(L.NotFound):
            st.get(mine.lease_id)
    else:
        # An older copy of the bucket that still verifies lay in space the
        # backend had not reused (always on dbm.dumb, which never reuses
        # space; sometimes on ndbm), and the raw scan found it: the same lease.
        assert backend != "dbm.gnu" and st.get(mine.lease_id).tunnel_id == mine.tunnel_id
    assert st.check()["ok"]
    fresh, _, _ = grant(st, client="fc00::ffff")
    assert fresh.tunnel_id not in {x.tunnel_id for x in others}


def test_a_garbage_file_is_reported_and_repair_starts_anew(mk, path, backend):
    st = mk()
    lease = grant(st)[0]
    main = {"dbm.gnu": path, "dbm.ndbm": path + ".db", "dbm.dumb": path + ".dir"}[backend]
    with open(main, "r+b") as f:
        f.write(b"\x00garbage" * 64)
    with pytest.raises(L.Corrupt) as e:
        L.LeaseStore(path, backend=backend).count()
    assert path in str(e.value)
    report = L.LeaseStore(path, backend=backend).repair()
    # The lease's own record lies elsewhere in the file and still verifies
    # (unless Berkeley DB keeps it on the page the garbage went to).
    assert report["kept"] == 1 or (backend == "dbm.ndbm" and report["kept"] == 0)
    assert report["moved_to"]
    st = L.LeaseStore(path, backend=backend)
    # Nothing but the lease granted: not what other files of this process
    # left in this one (Berkeley DB does).
    assert st.leases() == [lease][:report["kept"]] and st.check()["ok"]
    assert grant(st, client="fc00::2")[0].tunnel_id >= 1


# -- repair and copies of a record elsewhere in the file --------------------------
#
# The raw scan finds every slot that verifies, wherever it lies.  Besides a
# record's own two slots, the data file can hold other copies: dbm.dumb and
# Berkeley DB leave earlier values in space they no longer use, and Berkeley
# DB writes whatever its page buffers held before into a new page's unused
# space (seen on Debian's libdb: copies of other lease files this process had
# read).  plant() puts such a copy where the dbm API never reads but the scan
# does, on every backend: in the zero padding of an empty bucket's slot.

from microbroker.leases import record as R  # noqa: E402


def clients_in(st, b, n, skip=()):
    """n client addresses whose leases live in bucket b."""
    out = []
    for i in range(2, 1 << 16):
        c = f"fc00::{i:x}"
        if R.home(c) % st.buckets == b and c not in skip:
            out.append(c)
            if len(out) == n:
                return out
    raise AssertionError(f"no {n} clients for bucket {b}")


def empty_bucket(st, skip=()):
    with st._open(False) as tx:
        return next(b for b in range(st.buckets)
                    if b not in skip and tx.read(b"b%02x" % b)[2] == b"")


def plant(st, slot, skip=()):
    """Write the verifying slot bytes `slot` into the padding of an empty bucket's slot a."""
    host = empty_bucket(st, skip)
    key = b"b%02x.a" % host + (b".0" if st.chunk else b"")
    with st._open(True) as tx:
        raw = tx.db[key]
        assert R._unpack(raw)[3] == b"" and len(raw) >= 2 * R._HEAD.size + len(slot)
        tx.db[key] = raw[:R._HEAD.size] + slot + raw[R._HEAD.size + len(slot):]
    st._meta_raw = None
    return host


def slot_bytes(gen, payload, count, minexp):
    return R._pack(gen, payload, count, minexp, R._HEAD.size + len(payload))


def record_of(st, b):
    """(gen, count, minexp, payload) of bucket b's newest slot."""
    with st._open(False) as tx:
        count, minexp, payload = tx.read(b"b%02x" % b)
        return tx.slots[b"b%02x" % b][1], count, minexp, payload


def test_repair_prefers_a_record_the_dbm_reads_to_a_newer_looking_copy_elsewhere(mk):
    st = mk()
    b = 5
    first, second = clients_in(st, b, 2)
    other = grant(st, client="fc00::1")[0]
    old = grant(st, client=first)[0]
    gen, count, minexp, earlier = record_of(st, b)
    new = grant(st, client=second)[0]
    # A copy of the bucket from before `new`, its generation above the
    # record's own: what a file written anew (generations from 1 again) can
    # find left in it by an older file.
    plant(st, slot_bytes(gen + 10, earlier, count, minexp), skip={b})
    assert st.check()["ok"]
    report = st.repair()
    assert report["lost_buckets"] == [] and report["dropped"] == 0
    for lease in (other, old, new):
        assert st.get(lease.lease_id) == lease
    assert st.count() == 3 and st.check()["ok"]


def test_repair_does_not_take_the_ids_record_for_a_bucket(mk):
    # The ids record starts with the allocation cursor, little-endian: at
    # 0x3131 its first bytes read "11", a bucket's first lease id prefix.
    st = mk(tunnel_ids=(0x312E, 0x3200))
    b = 0x11 % st.buckets
    mine = [grant(st, client=clients_in(st, b, 1)[0])[0]]
    for c in ("fc00::1", "fc00::2"):
        mine.append(grant(st, client=c)[0])
    assert mine[-1].tunnel_id == 0x3130 and bucket_of(st, mine[0]) == b
    # The bucket unreadable, a copy of it elsewhere: only the scan can
    # bring it back, and the ids record (newer) must not be taken for it.
    gen, count, minexp, payload = record_of(st, b)
    damage(st, b"b%02x" % b, which="both")
    plant(st, slot_bytes(gen, payload, count, minexp), skip={b})
    report = st.repair()
    assert report["lost_buckets"] == [] and report["kept"] == 3
    for lease in mine:
        assert st.get(lease.lease_id) == lease
    assert st.check()["ok"]


def test_a_stale_copy_of_a_damaged_bucket_never_costs_a_current_lease(mk):
    # A released lease's ids are handed out again; an old copy of its bucket,
    # all that is left of that bucket after damage, still holds it.
    st = mk(tunnel_ids=(1, 1), session_ids=(1, 1))
    p_client, = clients_in(st, 0, 1)
    q_client, = clients_in(st, st.buckets - 1, 1)
    p, p_secret, _ = grant(st, client=p_client)
    gen, count, minexp, with_p = record_of(st, 0)
    st.release(p.lease_id, p_secret, p_client)
    q = grant(st, client=q_client)[0]
    assert (q.tunnel_id, q.session_id) == (p.tunnel_id, p.session_id) == (1, 1)
    damage(st, b"b00", which="both")
    plant(st, slot_bytes(gen, with_p, count, minexp), skip={0, st.buckets - 1})
    report = st.repair()
    assert st.get(q.lease_id) == q
    with pytest.raises(L.NotFound):
        st.get(p.lease_id)
    assert report["kept"] == 1 and st.check()["ok"]


def test_a_released_lease_in_a_stale_copy_is_not_brought_back(mk, backend):
    # Bucket 0 held p and r; p was released; then bucket 0 became unreadable
    # and only the copy from before the release is left. The ids record (read
    # through the dbm) no longer holds p's ids: r comes back, p does not.
    st = mk()
    n = 1 if backend == "dbm.dumb" else 2       # what fits a padding there
    cs = clients_in(st, 0, n)
    p, p_secret, _ = grant(st, client=cs[0])
    r = grant(st, client=cs[1])[0] if n == 2 else None
    gen, count, minexp, before = record_of(st, 0)
    st.release(p.lease_id, p_secret, cs[0])
    damage(st, b"b00", which="both")
    plant(st, slot_bytes(gen, before, count, minexp), skip={0})
    report = st.repair()
    with pytest.raises(L.NotFound):
        st.get(p.lease_id)
    assert report["dropped"] == 1
    if r is not None:
        assert st.get(r.lease_id) == r and report["kept"] == 1
    assert st.check()["ok"]


def foreign_row(st, lease, client, tunnel):
    """The row of a lease that an older file held: lease's ids, another id and client."""
    row = list(lease.row())
    row[R._ID] = "%02x%s" % (R.home(client), "0123456789abcd")
    row[R._CLIENT] = row[R._F["remote"]] = client
    row[R._TUNNEL] = row[R._SESSION] = tunnel
    return R._row_bytes(row)


def test_repair_never_takes_a_damaged_bucket_back_from_an_older_file(mk, backend):
    st = mk()
    lease = grant(st)[0]
    b = bucket_of(st, lease)
    # An older file's copy of this bucket, with another lease of the same
    # client and ids: generations below this file's first.
    planted = foreign_row(st, lease, lease.client, lease.tunnel_id)
    plant(st, slot_bytes(7, planted, 1, lease.expires), skip={b})
    damage(st, b"b%02x" % b, which="both")
    report = st.repair()
    got = st.leases()
    assert got in ([lease], []) and report["kept"] == len(got) and st.check()["ok"]
    if backend == "dbm.gnu":
        assert got == []                # gdbm leaves no older copy of its own


def test_repair_of_a_file_the_dbm_cannot_open_puts_its_own_copies_first(mk, path, backend):
    st = mk()
    lease = grant(st)[0]
    # An older file's lease in a bucket scanned before this one's, holding
    # the same exit ids.
    client, = clients_in(st, 0, 1)
    planted = foreign_row(st, lease, client, lease.tunnel_id)
    plant(st, slot_bytes(7, planted, 1, lease.expires), skip={0, bucket_of(st, lease)})
    main = {"dbm.gnu": path, "dbm.ndbm": path + ".db", "dbm.dumb": path + ".dir"}[backend]
    with open(main, "r+b") as f:
        f.write(b"\x00garbage" * 64)
    report = L.LeaseStore(path, backend=backend).repair()
    st = L.LeaseStore(path, backend=backend)
    assert st.leases() == [lease] and report["kept"] == 1 and st.check()["ok"]


def test_the_ids_record_is_rebuilt_from_the_leases(mk):
    st = mk(tunnel_ids=(1, 4), session_ids=(1, 4))
    held = {grant(st, client=f"fc00::{i}")[0].tunnel_id for i in range(3)}
    damage(st, b"ids", which="both")
    assert st.count() == 3 and st.check()["ok"]             # rebuilt on the fly
    st.sweep(now=T0)                                          # and written back
    with st._open(False) as tx:
        assert tx.read(b"ids") is not None
    fresh, _, _ = grant(st, client="fc00::9")
    assert fresh.tunnel_id not in held
    assert st.check()["ok"] and st.count() == 4


def test_a_held_lock_times_out_as_locked(mk, path):
    import fcntl
    st = mk(lock_timeout=0.2)
    grant(st)
    fd = os.open(path + ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(L.Locked) as e:
            st.count()
        assert e.value.code == "store"
    finally:
        os.close(fd)
    assert st.count() == 1


# -- dbm.dumb's own index after a crash in its commit ------------------------------

dumb_only = pytest.mark.skipif(not have("dbm.dumb"), reason="needs dbm.dumb")


@dumb_only
def test_dumb_index_missing_or_torn_is_restored_from_its_backup(path):
    st = L.LeaseStore(path, backend="dumb")
    got = [grant(st, client=f"fc00::{i}")[0] for i in range(5)]
    d, bak = path + ".dir", path + ".bak"

    def same():
        st2 = L.LeaseStore(path)
        assert sorted(x.lease_id for x in st2.leases()) == sorted(x.lease_id for x in got)
        assert st2.check()["ok"]

    # 1. killed between rename(.dir, .bak) and the new .dir
    os.replace(d, bak)
    same()
    # 2. killed while writing the new .dir: a torn prefix, mid-line or at a line end
    for cut in (lambda text: text[:len(text) // 2],
                lambda text: b"".join(text.splitlines(True)[:-3]), lambda text: b""):
        shutil.copy(d, bak)
        with open(d, "rb") as f:
            text = f.read()
        with open(d, "wb") as f:
            f.write(cut(text))
        same()


@dumb_only
def test_dumb_index_without_a_good_backup_is_corrupt(path):
    st = L.LeaseStore(path, backend="dumb")
    grant(st)
    with open(path + ".dir", "r+b") as f:
        f.truncate(100)
    if os.path.exists(path + ".bak"):
        os.unlink(path + ".bak")
    with pytest.raises(L.Corrupt, match="index"):
        L.LeaseStore(path).count()
    report = L.LeaseStore(path).repair()
    # Without an index the raw scan of .dat still finds the lease's record.
    assert report["moved_to"] and report["kept"] == 1
    assert L.LeaseStore(path).count() == 1


@dumb_only
def test_dumb_interrupted_creation_starts_again(path):
    with open(path + ".dat", "wb") as f:
        f.write(b"\0" * 1024)
    st = L.LeaseStore(path)
    assert st.backend == "dbm.dumb" and st.count() == 0
    assert os.path.exists(path + ".dat.incomplete")


# -- other interpreters, imports ------------------------------------------------

def other_python():
    exe = shutil.which("python3")
    if not exe:
        return None
    real = subprocess.run([exe, "-c", "import sys; print(sys.executable)"],
                          capture_output=True, text=True).stdout.strip()
    if not real or os.path.realpath(real) == os.path.realpath(sys.executable):
        return None
    return exe


def test_works_under_the_python3_on_path(tmp_path):
    """The pyenv python3 on PATH here has only dbm.dumb (a stripped-down router Python)."""
    exe = other_python()
    if exe is None:
        pytest.skip("python3 on PATH is this interpreter")
    code = """if 1:
        import sys, time
        from microbroker import leases as L
        st = L.LeaseStore(sys.argv[1])
        lease, secret, _ = st.allocate("fc00::1", "mesh", "l2tpv3", "ip", "fc00::ff", 1450, 60)
        st.renew(lease.lease_id, secret, "fc00::1", 120)
        assert st.allocate("fc00::1", "mesh", "l2tpv3", "ip", "fc00::ff", 1450, 60)[2]
        assert st.check()["ok"] and st.count() == 1
        assert len(st.sweep(now=time.time() + 1000)) == 1
        print(st.backend, ",".join(L.available_backends()))
    """
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([exe, "-c", code, str(tmp_path / "a")], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    backend, avail = r.stdout.split()
    assert backend == avail.split(",")[0]
    if have("dbm.gnu") and "dbm.gnu" not in avail:
        # a file written by a Python with dbm.gnu: a clear error there, not a silent new file
        grant(L.LeaseStore(str(tmp_path / "g"), backend="gnu"))
        r = subprocess.run([exe, "-c", code, str(tmp_path / "g")], capture_output=True,
                           text=True, env=env, timeout=60)
        assert r.returncode != 0 and "lacks" in r.stderr and "StoreError" in r.stderr


def test_imports_only_the_standard_library():
    if not hasattr(sys, "stdlib_module_names"):
        pytest.skip("needs Python 3.10's sys.stdlib_module_names")
    code = """if 1:
        import sys, json
        before = set(sys.modules)
        import microbroker.leases
        print(json.dumps(sorted(set(sys.modules) - before)))
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), check=True)
    new = {m.split(".")[0] for m in json.loads(r.stdout)}
    assert new <= set(sys.stdlib_module_names) | {"microbroker"}


# -- repair: every record whose checksum verifies (issue 14 item 2) -------

DATA_FILE = {"dbm.gnu": "", "dbm.ndbm": ".db", "dbm.dumb": ".dat"}


def forty(st):
    leases = [grant(st, client=f"fc00::{i + 1:x}",
                    pools=[("ipv4", "10.98.0.0/24", 32)])[0] for i in range(40)]
    st.update(leases[0].lease_id, state="up")           # a second generation
    return {x.lease_id: x for x in st.leases()}


def kept_exactly(st, before):
    after = {x.lease_id: x for x in st.leases()}
    assert st.check()["ok"]
    for lease_id, lease in after.items():
        assert lease == before[lease_id]                 # nothing half-kept
    return len(after)


def test_repair_after_4_kib_zeroed_mid_file_keeps_what_verifies(mk, path, backend):
    st = mk(fsync=False)
    before = forty(st)
    main = path + DATA_FILE[backend]
    size = os.path.getsize(main)
    at = (size // 2) & ~4095
    with open(main, "r+b") as f:
        f.seek(at)
        f.write(bytes(4096))
    report = mk(fsync=False).repair()
    n = kept_exactly(mk(fsync=False), before)
    assert n == report["kept"]
    # Only records that lay in the zeroed 4 KiB can be gone: a bucket record
    # is far smaller than the file, so most of the 40 stay.
    assert n >= 30, report


@pytest.mark.skipif(not have("dbm.gnu"), reason="dbm.gnu is not in this Python")
def test_repair_of_a_gdbm_file_gdbm_refuses_to_open_keeps_all(path):
    st = L.LeaseStore(path, backend="gnu", fsync=False)
    before = forty(st)
    with open(path, "r+b") as f:
        f.write(bytes(512))                              # its header
    with pytest.raises(L.Corrupt):
        L.LeaseStore(path, backend="gnu").count()
    report = L.LeaseStore(path, backend="gnu").repair()
    assert report["kept"] == 40
    assert kept_exactly(L.LeaseStore(path, backend="gnu"), before) == 40


@pytest.mark.skipif(not have("dbm.gnu"), reason="dbm.gnu is not in this Python")
def test_repair_never_iterates_a_damaged_gdbm_file(path, monkeypatch):
    # Iterating the keys of a damaged file sets gdbm's "needs recovery",
    # after which every fetch fails: repair reads each record by name.
    st = L.LeaseStore(path, backend="gnu", fsync=False)
    before = forty(st)
    import dbm.gnu
    real = dbm.gnu.open

    class NoKeys:
        def __init__(self, db):
            self.db = db

        def keys(self):
            raise AssertionError("repair iterated the keys")

        firstkey = keys

        def __getattr__(self, name):
            return getattr(self.db, name)

        def __getitem__(self, k):
            return self.db[k]

        def __setitem__(self, k, v):
            self.db[k] = v

    monkeypatch.setattr(dbm.gnu, "open", lambda *a: NoKeys(real(*a)))
    assert L.LeaseStore(path, backend="gnu").repair()["kept"] == 40
    monkeypatch.undo()
    assert kept_exactly(L.LeaseStore(path, backend="gnu"), before) == 40


@dumb_only
def test_repair_with_a_dumb_index_damaged_before_its_last_line_keeps_all(path):
    st = L.LeaseStore(path, backend="dumb", fsync=False)
    before = forty(st)
    with open(path + ".dir", "rb") as f:
        lines = f.read().split(b"\n")
    # The last line (meta.b) intact, so the index looks complete.
    lines[1] = b"'b01.a', (999999, 512)"
    lines[2] = b"garbage"
    with open(path + ".dir", "wb") as f:
        f.write(b"\n".join(lines))
    report = L.LeaseStore(path, backend="dumb").repair()
    assert report["kept"] == 40, report
    assert kept_exactly(L.LeaseStore(path, backend="dumb"), before) == 40


def test_check_finds_anything_held_twice(mk):
    st = mk()
    a, _, _ = grant(st, pools=[("ipv4", "10.98.0.0/24", 32)], udp_ports=(5000, 5009))
    b, _, _ = grant(st, client="fc00::2", pools=[("ipv4", "10.98.0.0/24", 32)],
                    udp_ports=(5000, 5009))
    assert (a.extra["ipv4"], b.extra["ipv4"]) == ("10.98.0.1", "10.98.0.2")
    assert (a.udp_port, b.udp_port) == (5000, 5001)
    assert st.check()["ok"]
    # What the old separate calls could leave: b with a's items.
    from microbroker.leases import record as R
    with st._open(True) as tx:
        n = R.home("fc00::2") % st.buckets
        bucket = tx.bucket(n)[0]
        i, row = bucket.find(b.lease_id)
        row[R._EXTRA] = dict(a.extra)
        row[R._UDP_PORT] = a.udp_port
        bucket.put(i, row)
        tx.put_bucket(n, bucket)
    report = st.check()
    assert not report["ok"]
    assert "10.98.0.1" in report["duplicate_items"]
    assert "udp 5000 mesh" in report["duplicate_items"]
