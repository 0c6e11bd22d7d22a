"""`serve`'s limits: per-source connections and request rate, one
deadline per request, a busy lease store answered 503 busy."""

import fcntl
import itertools
import json
import os
import socket
import threading
import time

import pytest

from frontdoors import ServeDoor, read_to_eof, trickle
from microbroker import web
from microbroker.broker import BrokerError
from microbroker.limits import SourceLimits, WorkGate

CONFIG = """
config broker
	option dataplane 'none'
	option state_dir '%(state)s'
	option max_body '512'
	option sweep_interval '3600'
%(extra)s

config service 'v4'
	option family '4'
"""

BAD = "127.0.0.1"      # every loopback client unless it binds elsewhere
GOOD = "127.0.0.2"


def config(tmp_path, **opts):
    extra = "".join("\toption %s '%s'\n" % kv for kv in opts.items())
    path = tmp_path / "microbroker"
    path.write_text(CONFIG % {"state": tmp_path / "state", "extra": extra})
    return str(path)


def connect(door, source):
    s = socket.socket()
    s.settimeout(10)
    s.bind((source, 0))
    s.connect(("127.0.0.1", door.port))
    return s


def ask(door, source, data=b"GET /offer HTTP/1.1\r\n\r\n"):
    s = connect(door, source)
    try:
        s.sendall(data)
        return read_answer(s)
    finally:
        s.close()


def form(route, **fields):
    body = "&".join("%s=%s" % kv for kv in fields.items()).encode()
    return (b"POST %s HTTP/1.1\r\nContent-Type: application/x-www-form-"
            b"urlencoded\r\nContent-Length: %d\r\n\r\n%s"
            % (route.encode(), len(body), body))


def read_answer(s):
    raw = read_to_eof(s)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1]) if lines[0] else 0
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return status, headers, body


# ---------------------------------------------------------------- the limits

class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_source_limits_bucket():
    clock = Clock()
    lim = SourceLimits(cap=100, rate=2.0, burst=3, clock=clock)
    for _ in range(3):
        assert lim.admit("a") is None
        lim.release("a")
    e = lim.admit("a")
    assert (e.code, e.retry_after) == ("too_many", 1)
    assert "2 per second" in e.message
    assert lim.admit("b") is None          # each address its own bucket
    clock.t += 0.5                         # one token back
    assert lim.admit("a") is None
    assert lim.admit("a") is not None
    clock.t += 10                          # never more than the burst
    assert [lim.admit("a") is None for _ in range(4)] == [1, 1, 1, 0]


def test_source_limits_connections_and_release():
    lim = SourceLimits(cap=2, rate=0, burst=1)
    assert lim.admit("a") is None and lim.admit("a") is None
    e = lim.admit("a")
    assert e.code == "too_many" and "connections" in e.message
    assert lim.admit("b") is None
    lim.release("a")
    assert lim.admit("a") is None
    lim.release("a"), lim.release("a"), lim.release("b")
    assert lim.open == {}


def test_source_limits_forget_full_buckets_first():
    clock = Clock()
    lim = SourceLimits(cap=10, rate=1.0, burst=5, clock=clock)
    lim.TRACKED = 3
    lim.admit("old")
    lim.release("old")
    clock.t += 10                          # "old" is full again
    for a in ("x", "y"):
        for _ in range(5):
            lim.admit(a)
            lim.release(a)
    lim.admit("new")
    assert set(lim.buckets) == {"x", "y", "new"}
    assert lim.admit("x") is not None      # still remembered as spent


# ---------------------------------------------------------------- on the wire

def test_flood_gets_429_and_others_are_served(tmp_path):
    with ServeDoor(config(tmp_path, request_rate=2,
                          request_burst=5)) as door:
        got = [ask(door, BAD)[0] for _ in range(12)]
        assert got[:5] == [200] * 5
        assert got[5:] == [429] * 7
        st, headers, body = ask(door, BAD, b"GET /offer?format=sh HTTP/1.1"
                                b"\r\n\r\n")
        assert st == 200 and b"STATUS='429'" in body
        assert b"ERROR='too_many'" in body and b"RETRY_AFTER='1'" in body
        st, headers, body = ask(door, BAD)
        assert st == 429 and headers["Retry-After"] == "1"
        # a token guess is a request like any other
        st, _, _ = ask(door, BAD, form("/lease", service="v4", token="abcd"))
        assert st == 429
        assert ask(door, GOOD)[0] == 200


def test_connection_cap_per_source(tmp_path):
    with ServeDoor(config(tmp_path, source_connections=3,
                          request_rate=0)) as door:
        hold = [connect(door, BAD) for _ in range(3)]
        for s in hold:
            s.sendall(b"GET /offer HTTP/1.1\r\n")   # never finished
        time.sleep(0.2)     # (accepted in order; nothing depends on it)
        st, headers, body = ask(door, BAD)
        assert st == 429 and b"too many connections" in body
        assert headers["Retry-After"]
        assert ask(door, GOOD)[0] == 200
        hold[0].close()
        deadline = time.monotonic() + 10
        while ask(door, BAD)[0] != 200:   # its slot comes back
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for s in hold[1:]:
            s.close()


def test_drain_ends_at_its_bound(tmp_path):
    """After a 413 the body is drained for DRAIN_TIME at most, not for as
    long as a client trickles (it used to be 2 s per recv, unbounded)."""
    with ServeDoor(config(tmp_path, timeout=30, request_rate=0)) as door:
        s = connect(door, BAD)
        s.sendall(b"POST /lease HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
        s.settimeout(0.3)
        start = time.monotonic()
        head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 413 ")
        closed = trickle(s, itertools.repeat(ord("x")), until=start + 20)
        s.close()
        assert closed is not None and closed - start < 10


def test_deadline_covers_the_whole_request(tmp_path):
    """A chunked body trickled a byte at a time is cut at `timeout`."""
    with ServeDoor(config(tmp_path, timeout=1, request_rate=0)) as door:
        s = connect(door, BAD)
        s.sendall(b"POST /lease HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: application/x-www-form-urlencoded\r\n\r\n")
        s.settimeout(0.2)
        closed = trickle(s, b"1\r\ns\r\n" * 100)
        s.close()
        assert closed is not None   # 600 bytes at >= 0.2 s: 120 s


def test_store_lock_held_answers_busy(tmp_path):
    with ServeDoor(config(tmp_path, request_rate=0)) as door:
        store = door.app.broker.store
        store.lock_timeout = 0.2
        fd = os.open(store.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            req = form("/lease", service="v4")
            st, headers, out = ask(door, GOOD, req)
            assert st == 503 and headers["Retry-After"] == str(
                web.BUSY_RETRY)
            assert b'"busy"' in out
        finally:
            os.close(fd)
        st, _, _ = ask(door, GOOD, req)
        assert st == 200


def test_releases_do_not_wait_behind_lease_builds(tmp_path):
    """Every slot of the work gate held by builds: a new lease and a renew
    (whose heal may build) wait, here long enough to be answered busy,
    while a release, which builds nothing, is answered at once: a storm of
    clients stopping is not told to come back later."""
    with ServeDoor(config(tmp_path, request_rate=0)) as door:
        st, _, out = ask(door, GOOD, form("/lease", service="v4"))
        assert st == 200
        held = json.loads(out)
        ids = {"lease_id": held["lease_id"], "secret": held["secret"]}
        gate = door.app.gate
        gate.wait = 0.2
        done = threading.Event()

        def build():                  # a lease build holding one slot
            with gate:
                done.wait(30)
        builds = [threading.Thread(target=build) for _ in range(gate.slots)]
        for t in builds:
            t.start()
        try:
            deadline = time.monotonic() + 10
            while gate.busy < gate.slots and time.monotonic() < deadline:
                time.sleep(0.01)
            assert gate.busy == gate.slots
            st, _, out = ask(door, "127.0.0.3", form("/lease", service="v4"))
            assert st == 503 and b'"busy"' in out
            st, _, out = ask(door, GOOD, form("/renew", **ids))
            assert st == 503 and b'"busy"' in out
            st, _, out = ask(door, GOOD, form("/release", **ids))
            assert st == 200 and json.loads(out)["released"] is True
        finally:
            done.set()
            for t in builds:
                t.join()
        assert door.app.broker.store.count() == 0


@pytest.mark.parametrize("exc,status,code", [
    (RuntimeError("x"), 500, "internal"),
    (RecursionError(), 500, "internal"),
])
def test_http_error_unknown_is_internal(exc, status, code):
    assert web.http_error(exc)[:2] == (status, code)


def test_http_error_by_class():
    from microbroker import leases
    assert web.http_error(leases.Locked("held", "/x"))[:2] == (503, "busy")
    assert web.http_error(leases.Full("full", 30)) == (503, "full", "full",
                                                       30)
    assert web.http_error(leases.NotFound("gone"))[:2] == (404, "not_found")
    assert web.http_error(leases.Corrupt("bad", "/x"))[:2] == (500, "store")
    try:
        try:
            raise leases.Locked("held", "/x")
        except leases.Locked:
            raise web.BrokerError("store", "wrapped")
    except web.BrokerError as e:
        assert web.http_error(e)[:2] == (503, "busy")


@pytest.mark.parametrize("opt,value", [
    ("request_rate", "-1"), ("request_rate", "\u0665"),
    ("request_burst", "0"), ("source_connections", "0"), ("timeout", "0")])
def test_limits_are_checked(tmp_path, opt, value):
    from microbroker import config as mbconfig
    cfg = mbconfig.load(config(tmp_path, **{opt: value}))
    assert [m for _, m in cfg.problems if m.startswith(opt)], cfg.problems


def test_limit_defaults(tmp_path):
    from microbroker import config as mbconfig
    cfg = mbconfig.load(config(tmp_path))
    assert (cfg.source_connections, cfg.request_rate, cfg.request_burst,
            cfg.timeout) == (8, 5.0, 20, 10)


def test_the_work_gate_lets_writers_in_in_arrival_order():
    gate = WorkGate(1, 30.0)
    order = []

    def writer(name):
        with gate:
            order.append(name)
    gate.__enter__()                      # one request in: the rest wait
    threads = []
    for name in ("b", "c", "d"):
        t = threading.Thread(target=writer, args=(name,))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 10
        while len(gate.queue) < len(threads) and time.monotonic() < deadline:
            time.sleep(0.001)
    assert len(gate.queue) == 3
    gate.__exit__(None, None, None)
    for t in threads:
        t.join(10)
    assert order == ["b", "c", "d"]
    assert gate.busy == 0 and not gate.queue


def test_a_writer_not_let_in_in_time_is_answered_busy_and_leaves_no_trace():
    gate = WorkGate(1, 0.05)
    with gate:
        with pytest.raises(BrokerError) as e:
            with gate:
                pass
        assert e.value.code == "busy" and e.value.retry_after >= 1
        assert not gate.queue
    assert gate.busy == 0
    with gate:                           # free again, at once
        assert gate.busy == 1


def test_a_writer_behind_a_queue_longer_than_the_wait_is_answered_at_once():
    gate = WorkGate(1, 1.0)
    gate.took = 0.4                          # seconds a request has been taking
    gate.__enter__()
    blocked = [threading.Thread(target=lambda: gate.__enter__() and gate.__exit__(None, None, None))
               for _ in range(2)]
    for t in blocked:                        # 2 ahead: 0.8 s to drain, within the wait
        t.start()
    deadline = time.monotonic() + 10
    while len(gate.queue) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    t0 = time.monotonic()
    with pytest.raises(BrokerError) as e:    # a third: 1.2 s, past it
        gate.__enter__()
    assert time.monotonic() - t0 < 0.5
    assert e.value.code == "busy" and e.value.retry_after == 2
    assert len(gate.queue) == 2
    gate.__exit__(None, None, None)
    for t in blocked:
        t.join(10)
    assert gate.busy == 0 and not gate.queue
