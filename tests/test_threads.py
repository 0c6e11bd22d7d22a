"""threads.py: what serve's admission and start-up lean on before it
listens, held to threading's behaviour where serve uses it."""

import _thread
import time

import pytest

from microbroker.threads import Event, Slots, Thread


def until(cond, timeout=30):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_slots_are_bounded_and_refuse_without_waiting():
    s = Slots(2)
    assert s.acquire(False) and s.acquire(False)
    assert not s.acquire(False)
    assert not s.acquire(True, 0.01)         # timed out: still none free
    s.release()
    assert s.acquire(False)
    s.release()
    s.release()
    with pytest.raises(ValueError):
        s.release()                          # more than it holds
    assert s.free == 2


def test_a_released_slot_goes_to_the_first_waiter_in_order():
    s = Slots(1)
    assert s.acquire()
    got = []

    def wait(name):
        if s.acquire(True, 30):
            got.append(name)

    a = Thread(wait, ("a",))
    a.start()
    until(lambda: len(s.waiters) == 1)
    b = Thread(wait, ("b",))
    b.start()
    until(lambda: len(s.waiters) == 2)
    s.release()
    a.join(30)
    assert got == ["a"] and b.is_alive()
    s.release()
    b.join(30)
    assert got == ["a", "b"] and s.free == 0


def test_an_event_lets_every_waiter_through_once_set():
    e = Event()
    assert not e.is_set() and e.wait(0) is False
    through = []
    threads = [Thread(lambda: through.append(e.wait(30))) for _ in range(5)]
    for t in threads:
        t.start()
    e.set()
    e.set()                                  # a second set changes nothing
    for t in threads:
        t.join(30)
    assert through == [True] * 5 and e.wait() and e.is_set()


def test_a_thread_is_alive_until_its_target_returns_and_join_waits():
    go = _thread.allocate_lock()
    go.acquire()
    t = Thread(go.acquire)
    assert not t.is_alive()
    t.start()
    assert t.is_alive()
    t.join(0.01)
    assert t.is_alive()
    go.release()
    t.join(30)
    assert not t.is_alive()


def test_a_thread_that_cannot_start_is_not_alive(monkeypatch):
    def no_thread(*args):
        raise RuntimeError("can't start new thread")
    t = Thread(lambda: None)
    monkeypatch.setattr(_thread, "start_new_thread", no_thread)
    with pytest.raises(RuntimeError):
        t.start()
    assert not t.is_alive()
