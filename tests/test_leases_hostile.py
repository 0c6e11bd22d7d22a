"""Hostile lease store tests (issue 3): racing processes, crashes at every write,
kill -9 at random instants.  Run on every dbm backend this Python has.

fsync=False in most of these: page cache survives a killed process, so it
changes nothing about kill -9 and makes the runs several times faster (the
fsync paths are covered in test_leases.py)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback

import pytest

from microbroker import leases as L
from test_leases import BACKENDS, ROOT, T0

# Operations per process in the 8-process race; dbm.dumb rereads its index on
# every open (~3-5 ms an operation here), so it runs a shorter race.
RACE_OPS = {"dbm.gnu": 500, "dbm.ndbm": 500, "dbm.dumb": 150}


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def forked(fn, *args):
    """Run fn(*args) in a forked child; returns its pid.  Exit 0 if it returned,
    1 with a traceback on stderr if it raised."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait(pid):
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def assert_sound(store):
    report = store.check()
    assert report["ok"], report
    live = store.leases()
    assert len({x.tunnel_id for x in live}) == len(live)
    assert len({x.session_id for x in live}) == len(live)
    return live


# -- 8 processes racing ----------------------------------------------------------

def race_worker(n, path, backend, ops, out):
    rnd = random.Random(n)
    st = L.LeaseStore(path, backend=backend, tunnel_ids=(1, 64), session_ids=(1, 64),
                      max_leases=56, max_per_client=2, fsync=False, lock_timeout=120)
    ephemeral = n == 7                       # its leases expire at once; others sweep them
    clients = [f"fc00::{n}:{i}" for i in range(6)]
    held, grants, ends, swept, outcomes = {}, [], {}, [], {}
    for k in range(ops):
        r = rnd.random()
        if n in (3, 5) and k % 20 == 0:
            t0 = time.time()
            for x in st.sweep():
                swept.append([x.lease_id, x.tunnel_id, x.session_id, x.client, t0])
        elif r < 0.4 or not held:
            client, service = rnd.choice(clients), rnd.choice("abc")
            propose = rnd.randint(1, 4) if rnd.random() < 0.3 else None
            mine = [lid for lid, h in held.items()
                    if (h["client"], h["service"]) == (client, service)]
            try:
                lease, secret, reused = st.allocate(
                    client, service, "l2tpv3", "ip", "fc00::ff", 1450,
                    0.02 if ephemeral else 3600, peer_tunnel_id=propose)
            except L.LeaseError as e:
                assert e.code in ("too_many", "full", "ids_exhausted", "id_conflict"), e
                outcomes[e.code] = outcomes.get(e.code, 0) + 1
                continue
            back = time.time()
            if not ephemeral:
                # one live lease per (client, service): asked again, the same one comes back
                assert reused == bool(mine) and (not mine or mine == [lease.lease_id])
            if propose is not None and not reused:
                assert lease.peer_tunnel_id == propose
            if not reused:
                grants.append([lease.lease_id, lease.tunnel_id, lease.session_id, back])
            held[lease.lease_id] = dict(secret=secret, client=client, service=service,
                                        expires=lease.expires)
            outcomes["granted"] = outcomes.get("granted", 0) + 1
        elif r < 0.75:
            lid = rnd.choice(list(held))
            h = held[lid]
            try:
                lease = st.renew(lid, h["secret"], h["client"], 0.02 if ephemeral else 3600)
            except L.NotFound:
                assert ephemeral
                del held[lid]
                continue
            h["expires"] = lease.expires
        elif r < 0.85:
            lid = rnd.choice(list(held))
            h = held[lid]
            try:
                lease = st.authorize(lid, h["secret"], h["client"])
            except L.NotFound:
                assert ephemeral
                del held[lid]
                continue
            assert lease.expires == h["expires"]
        else:
            lid = rnd.choice(list(held))
            h = held.pop(lid)
            ends[lid] = time.time()
            try:
                st.release(lid, h["secret"], h["client"])
            except L.NotFound:
                assert ephemeral
    with open(out, "w") as f:
        json.dump(dict(held=held, grants=grants, ends=ends, swept=swept, outcomes=outcomes), f)


def test_eight_processes_race_without_duplicates_or_lost_updates(tmp_path, backend):
    path = str(tmp_path / "leases")
    ops = RACE_OPS[backend]
    L.LeaseStore(path, backend=backend).count()
    pids = [forked(race_worker, n, path, backend, ops, str(tmp_path / f"w{n}.json"))
            for n in range(8)]
    assert [wait(pid) for pid in pids] == [0] * 8
    res = [json.load(open(tmp_path / f"w{n}.json")) for n in range(8)]

    st = L.LeaseStore(path)
    live = assert_sound(st)
    assert st.check()["leaked_ids"] == 0 and st.count() == len(live)
    by_id = {x.lease_id: x for x in live}
    for n, r in enumerate(res[:7]):
        mine = {x.lease_id for x in live if x.client.startswith(f"fc00::{n}:")}
        assert mine == set(r["held"]), f"worker {n}: lost or phantom leases"
        for lid, h in r["held"].items():
            assert st.authorize(lid, h["secret"], h["client"]).expires == h["expires"]
    assert {x.lease_id for x in live if x.client.startswith("fc00::7:")} <= set(res[7]["held"])

    # every expired lease went to exactly one sweeper, and only expired ones
    swept = [s for r in res for s in r["swept"]]
    assert len({s[0] for s in swept}) == len(swept)
    assert all(s[3].startswith("fc00::7:") for s in swept)
    assert not {s[0] for s in swept} & set(by_id)

    # no id was ever held by two leases at once: [returned, end call) certainly
    # lies inside the lease's life, so two such spans of one id must not meet
    ends = {}
    for r in res:
        ends.update(r["ends"])
    for s in swept:
        ends[s[0]] = min(ends.get(s[0], s[4]), s[4])
    spans = {}
    for r in res:
        for lid, t, s, back in r["grants"]:
            end = ends.get(lid, float("inf"))
            spans.setdefault(("t", t), []).append((back, end, lid))
            spans.setdefault(("s", s), []).append((back, end, lid))
    for key, group in spans.items():
        group.sort()
        for (b1, e1, l1), (b2, e2, l2) in zip(group, group[1:]):
            assert not (b2 < e1 and b1 < e2), f"{key} held by {l1} and {l2} at once"
    granted = sum(r["outcomes"].get("granted", 0) for r in res)
    assert granted > 8 * ops // 10
    assert sum(len(r["grants"]) for r in res) > 64        # ids were recycled


def sweep_worker(path, n, out):
    st = L.LeaseStore(path, fsync=False, lock_timeout=60)
    got = []
    for k in range(45):
        got += [x.lease_id for x in st.sweep(now=T0 + 7 * k + n)]
    with open(out, "w") as f:
        json.dump(got, f)


def test_concurrent_sweeps_hand_out_each_expired_lease_once(tmp_path, backend):
    path = str(tmp_path / "leases")
    st = L.LeaseStore(path, backend=backend, fsync=False)
    want = set()
    for i in range(300):
        lease, _, _ = st.allocate(f"fc00::{i:x}", "mesh", "l2tpv3", "ip", "fc00::ff", 1450,
                                  1 + i, now=T0)
        want.add(lease.lease_id)
    pids = [forked(sweep_worker, path, n, str(tmp_path / f"s{n}")) for n in range(4)]
    assert [wait(pid) for pid in pids] == [0] * 4
    got = [lid for n in range(4) for lid in json.load(open(tmp_path / f"s{n}"))]
    got += [x.lease_id for x in st.sweep(now=T0 + 1000)]
    assert len(got) == len(set(got)) and set(got) == want
    assert st.count() == 0 and st.check()["leaked_ids"] == 0


# -- a crash at every write -------------------------------------------------------

class Crash:
    """Patches for a forked child: die at the k-th write (after it, or in the
    middle of it: half new bytes over the old ones), after a flush, or inside
    dbm.dumb's own index commit."""

    def __init__(self, mode, k):
        self.mode, self.k, self.n = mode, k, 0

    def install(self):
        crash = self
        write, flush = L.Records.write, L.Records.flush

        def patched_write(tx, *a):
            if crash.mode not in ("after", "torn", "torn_close"):
                return write(tx, *a)
            crash.n += 1
            if crash.n != crash.k:
                return write(tx, *a)
            if crash.mode == "after":
                write(tx, *a)
                os._exit(9)
            real = tx.db

            class Tear:
                def __getitem__(self, key):
                    return real[key]

                def __setitem__(self, key, value):
                    try:
                        old = real[key]
                    except KeyError:
                        old = b""
                    half = len(value) // 2
                    torn = value[:half] + old[half:len(value)]
                    real[key] = torn + bytes(len(value) - len(torn))
            tx.db = Tear()
            write(tx, *a)
            if crash.mode == "torn_close":
                real.close()            # the torn bytes reach the file on every backend
            os._exit(9)

        def patched_flush(tx):
            flush(tx)
            if crash.mode == "flush":
                crash.n += 1
                if crash.n == crash.k:
                    os._exit(9)

        L.Records.write, L.Records.flush = patched_write, patched_flush
        install = L.LeaseStore._install

        def patched_install(store, tmp):
            if crash.mode == "install":
                crash.n += 1
                if crash.n == crash.k:       # 1: the new file built, not renamed yet
                    os._exit(9)
            install(store, tmp)
            if crash.mode == "install" and crash.n + 1 == crash.k:
                os._exit(9)                  # 2: renamed, the call not finished
        L.LeaseStore._install = patched_install
        if crash.mode == "commit":
            import dbm.dumb
            commit = dbm.dumb._Database._commit

            def patched_commit(db):
                if db._index is None or not db._modified:
                    return
                crash.n += 1
                if crash.n != crash.k:
                    return commit(db)
                # dbm.dumb's own steps, killed half way through writing the new index
                try:
                    os.unlink(db._bakfile)
                except OSError:
                    pass
                os.rename(db._dirfile, db._bakfile)
                lines = ["%r, %r\n" % (key.decode("Latin-1"), pos)
                         for key, pos in db._index.items()]
                with open(db._dirfile, "w", encoding="Latin-1") as f:
                    f.write("".join(lines)[:len("".join(lines)) // 2])
                os._exit(9)
            # (sync is another name for _commit there: the store's flush uses it)
            dbm.dumb._Database._commit = dbm.dumb._Database.sync = patched_commit


SCENARIOS = ("allocate", "reuse", "renew", "release", "sweep", "grow")


def crash_setup(path, backend):
    st = L.LeaseStore(path, backend=backend, fsync=False)
    secrets = {}
    for i in range(12):
        lease, secret, _ = st.allocate(f"fc00::{i:x}", "mesh", "l2tpv3", "ip", "fc00::ff",
                                       1450, 100 if i % 3 else 10, now=T0)
        secrets[lease.lease_id] = secret
    return st, secrets


def crash_op(st, scenario, target, secret):
    if scenario == "allocate":
        st.allocate("fc00::abc", "mesh", "l2tpv3", "ip", "fc00::ff", 1450, 100, now=T0)
    elif scenario == "reuse":
        st.allocate(target.client, "mesh", "l2tpv3", "ip", "fc00::ff", 1450, 500, now=T0 + 1)
    elif scenario == "renew":
        st.renew(target.lease_id, secret, target.client, 500, now=T0 + 1)
    elif scenario == "release":
        st.release(target.lease_id, secret, target.client)
    elif scenario == "sweep":
        st.sweep(now=T0 + 50)
    else:
        # a lease that needs a bigger record: the file is rebuilt (gnu, ndbm)
        with st._open(True) as tx:
            tx.reserve({b"b%02x" % (int(target.lease_id[:2], 16) % st.buckets): 200000})
        crash_op(st, "allocate", target, secret)


def crash_modes(backend):
    modes = [("after", k) for k in (1, 2)] + [("torn", k) for k in (1, 2)]
    modes += [("torn_close", k) for k in (1, 2)] + [("flush", 1)]
    if backend == "dbm.dumb":
        modes += [("commit", k) for k in (1, 2)]
    else:
        modes += [("install", k) for k in (1, 2)]
    return modes


def test_a_crash_at_any_write_leaves_a_consistent_store(tmp_path, backend):
    cases, crashed = 0, set()
    for scenario in SCENARIOS:
        for mode, k in crash_modes(backend):
            path = str(tmp_path / f"{scenario}-{mode}-{k}" / "leases")
            os.makedirs(os.path.dirname(path))
            st, secrets = crash_setup(path, backend)
            before = {x.lease_id: x for x in st.leases()}
            target = next(x for x in before.values() if x.expires == T0 + 100)

            def child():
                Crash(mode, k).install()
                crash_op(L.LeaseStore(path, fsync=False), scenario, target,
                         secrets[target.lease_id])
                os._exit(3)                 # the operation finished before the crash point
            code = wait(forked(child))
            if code == 3:
                continue
            assert code == 9, (scenario, mode, k, code)
            cases += 1
            crashed.add((scenario, mode, k))

            st = L.LeaseStore(path)
            live = assert_sound(st)
            after = {x.lease_id: x for x in live}
            where = (scenario, mode, k)
            changed = {lid for lid in before if after.get(lid) != before[lid]}
            extra = set(after) - set(before)
            if scenario in ("allocate", "grow"):
                assert not changed and len(extra) <= 1, where
                assert all(after[lid].client == "fc00::abc" for lid in extra), where
            elif scenario in ("reuse", "renew"):
                assert not extra and changed <= {target.lease_id}, where
                assert after[target.lease_id].expires in (T0 + 100, T0 + 501), where
            elif scenario == "release":
                assert not extra and changed <= {target.lease_id}, where
                assert target.lease_id not in after or after[target.lease_id] == target, where
            else:
                expired = {lid for lid, x in before.items() if x.expires <= T0 + 50}
                assert not extra and changed <= expired, where
                assert all(lid not in after for lid in changed), where
            # and it carries on: leaked ids are freed, new leases get fresh ids
            st.sweep(now=T0)
            assert st.check()["leaked_ids"] == 0, where
            st.allocate("fc00::def", "mesh", "l2tpv3", "ip", "fc00::ff", 1450, 100, now=T0)
            assert_sound(st)
    assert cases >= 30
    special = [("commit", 1), ("commit", 2)] if backend == "dbm.dumb" else [
        ("install", 1), ("install", 2)]
    for mode, k in special:
        assert ("allocate" if mode == "commit" else "grow", mode, k) in crashed
    assert ("allocate", "torn", 2) in crashed and ("release", "torn", 2) in crashed
    assert ("allocate", "flush", 1) in crashed and ("release", "flush", 1) in crashed


# -- kill -9 at random instants ------------------------------------------------------

WRITER = r"""
import os, random, sys, time
from microbroker import leases as L
path, gen, fsync = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
log = os.open(path + ".log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
def note(*words):
    os.write(log, (" ".join(map(str, words)) + "\n").encode())
st = L.LeaseStore(path, fsync=fsync, tunnel_ids=(1, 5000), session_ids=(1, 5000))
held, i = {}, 0
note("S", gen)
while True:
    r = random.random()
    if len(held) < 4 or r < 0.45:
        i += 1
        client = "fc00::%x:%x" % (gen, i)          # fresh clients: no reuse across restarts
        lease, secret, _ = st.allocate(client, "mesh", "l2tpv3", "ip", "fc00::ff", 1450, 3600)
        note("G", lease.lease_id, secret, client, repr(lease.expires))
        held[lease.lease_id] = (secret, client)
    elif r < 0.8:
        lid = random.choice(list(held))
        lease = st.renew(lid, held[lid][0], held[lid][1], 3600)     # expires only grows
        note("N", lid, repr(lease.expires))
    else:
        lid = random.choice(list(held))
        secret, client = held.pop(lid)
        note("R", lid)
        st.release(lid, secret, client)
        note("D", lid)
"""


def read_log(path):
    granted, expires, releasing, done = {}, {}, set(), set()
    with open(path + ".log") as f:
        for line in f:
            w = line.split()
            if w[0] == "G":
                granted[w[1]] = (w[2], w[3])
                expires[w[1]] = float(w[4])
            elif w[0] == "N":
                expires[w[1]] = max(expires[w[1]], float(w[2]))
            elif w[0] == "R":
                releasing.add(w[1])
            elif w[0] == "D":
                done.add(w[1])
    return granted, expires, releasing, done


@pytest.mark.parametrize("cycles", [20])
def test_kill_9_at_random_instants_loses_no_granted_lease(tmp_path, backend, cycles):
    path = str(tmp_path / "leases")
    L.LeaseStore(path, backend=backend).count()
    env = dict(os.environ, PYTHONPATH=ROOT)
    rnd = random.Random(backend)
    for gen in range(cycles):
        size = os.path.getsize(path + ".log") if os.path.exists(path + ".log") else 0
        proc = subprocess.Popen([sys.executable, "-c", WRITER, path, str(gen), str(gen % 2)],
                                env=env, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while (not os.path.exists(path + ".log") or os.path.getsize(path + ".log") <= size + 60):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline
            time.sleep(0.002)
        time.sleep(rnd.uniform(0, 0.12))
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()

        st = L.LeaseStore(path)
        live = {x.lease_id: x for x in assert_sound(st)}
        granted, expires, releasing, done = read_log(path)
        for lid, (secret, client) in granted.items():
            if lid in done:
                assert lid not in live, f"cycle {gen}: released lease {lid} is back"
            elif lid not in releasing:
                assert lid in live, f"cycle {gen}: granted lease {lid} lost"
                assert st.authorize(lid, secret, client).expires >= expires[lid]
        assert len(set(live) - set(granted)) <= gen + 1   # at most one unlogged grant a kill
    st.sweep(now=time.time() + 10 ** 6)
    assert st.count() == 0 and st.check()["leaked_ids"] == 0


def test_cli_checks_and_repairs_a_damaged_lease_file(tmp_path):
    """What an operator runs when the broker says the lease file is corrupt."""
    state = tmp_path / "state"
    cfg = tmp_path / "microbroker"
    cfg.write_text("config broker\n\toption state_dir '%s'\n\toption dataplane 'none'\n"
                   "config service 'v6'\n" % state)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "microbroker", "-c", str(cfg)] +
                              list(args), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=60)

    state.mkdir()
    st = L.LeaseStore(str(state / "leases"))
    for i in range(6):
        st.allocate("fc00::%x" % (i + 2), "v6", "l2tpv3", "ip", "fc00::1", 1280, 600)
    p = cli("check-leases")
    assert p.returncode == 0 and json.loads(p.stdout)["leases"] == 6, p.stderr
    main = {"dbm.gnu": "", "dbm.ndbm": ".db", "dbm.dumb": ".dir"}[st.backend]
    with open(str(state / "leases") + main, "r+b") as f:
        f.write(b"\x00garbage" * 64)
    p = cli("check-leases")
    assert p.returncode == 1 and "microbroker repair-leases" in p.stderr, p.stderr
    p = cli("repair-leases")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["moved_to"] and all(os.path.exists(f) for f in report["moved_to"])
    assert "reconcile" in p.stderr
    p = cli("check-leases")
    assert p.returncode == 0 and json.loads(p.stdout)["ok"], p.stderr


RACE_CONFIG = """
config broker
	option state_dir '%(state)s'
	option dataplane 'none'
	option max_leases '400'
	option max_per_client '4'
	option lease_rate '0'
	option idle_grace '0'

config service 'l2'
	option endpoint 'fc00::1'
	option encap 'udp'
	option udp_port '5000'
	option prefix_pool 'fd00:beef::/56'
	option prefix_length '64'
	option ipv4_pool '198.51.100.0/24'
	option ipv4_gateway '192.0.2.1'

config service 'l3'
	option kind 'ip6tnl'
	option endpoint 'fc00::1'
	option prefix_pool 'fd00:cafe::/120'
	option prefix_length '128'
	option ipv4_pool '10.98.0.0/24'
"""


def _race_broker(tmp_path):
    from microbroker import config as mbconfig, wiring
    path = tmp_path / "microbroker"
    if not path.exists():
        # Forked workers race here: each writes its own file and renames
        # it, so none reads another's half-written one (the defaults).
        tmp = tmp_path / ("microbroker.%d" % os.getpid())
        tmp.write_text(RACE_CONFIG % {"state": tmp_path / "state"})
        os.replace(tmp, path)
    cfg = mbconfig.load(str(path))
    assert cfg.problems == []
    return wiring.make_broker(cfg)


def _lease_many(tmp_path, worker, n, backend_name):
    b = _race_broker(tmp_path)
    for i in range(n):
        for svc in ("l2", "l3"):
            try:
                b.lease("fc00::%x:%x" % (worker + 1, i + 1), svc)
            except Exception as e:      # only store refusals, never a duplicate
                if getattr(e, "code", None) not in ("busy", "full"):
                    raise


def assert_nothing_held_twice(store):
    live = assert_sound(store)
    for what in ("tunnel_id", "session_id", "ifname"):
        assert len({getattr(x, what) for x in live}) == len(live), what
    ports = [(x.service, x.udp_port) for x in live if x.udp_port]
    assert len(set(ports)) == len(ports)
    items = [x.extra[k] for x in live for k in ("prefix", "ipv4") if x.extra.get(k)]
    assert len(set(items)) == len(items)
    assert not [i for i in items if i.endswith((".0", ".255")) or i.startswith(
        ("fd00:beef::/", "fd00:cafe::/"))], "a pool's network or broadcast address"
    return live


def test_concurrent_cgi_leases_hold_nothing_twice_with_the_race_window_open(
        tmp_path, monkeypatch):
    # Each broker call is what a CGI process does; the pauses hold open the
    # windows between the store's write of the ids and of the lease, and
    # between allocation and the kernel build, where two processes used to
    # pick the same pool item and UDP port.
    monkeypatch.setenv("MICROBROKER_TEST_PAUSE", "build:0.01")
    pids = [forked(_lease_many, tmp_path, w, 6, "") for w in range(6)]
    assert [wait(p) for p in pids] == [0] * 6
    b = _race_broker(tmp_path)
    live = assert_nothing_held_twice(b.store)
    assert len(live) == 6 * 6 * 2
    assert {x.state for x in live} == {"up"}


def test_kill_9_during_concurrent_cgi_leases_leaves_a_consistent_file(
        tmp_path, monkeypatch):
    monkeypatch.setenv("MICROBROKER_TEST_PAUSE", "allocate:0.003")
    rng = random.Random(7)
    for round_ in range(12):
        pids = [forked(_lease_many, tmp_path, round_ * 4 + w, 3, "") for w in range(4)]
        time.sleep(rng.uniform(0.005, 0.05))
        for p in pids:
            os.kill(p, signal.SIGKILL)
        for p in pids:
            wait(p)
        b = _race_broker(tmp_path)
        assert_nothing_held_twice(b.store)
    b.store.sweep(now=time.time() + 10 ** 6)
    report = b.store.check()
    assert report["ok"] and report["leases"] == 0 and report["leaked_ids"] == 0
