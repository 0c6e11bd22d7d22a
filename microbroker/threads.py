"""Threads, events and a bounded semaphore on _thread alone, for what
`serve` does before it listens: threading imports functools, collections
and their imports, a fifth of serve's start under emulation. They do
what threading's classes of the same names do, as far as serve uses them.
"""

import _thread


class Event:
    """threading.Event without clear(): set once, waited for by many."""

    def __init__(self):
        self.flag = False
        self.mutex = _thread.allocate_lock()
        self.gate = _thread.allocate_lock()
        self.gate.acquire()          # released once, by set()

    def set(self):
        with self.mutex:
            if not self.flag:
                self.flag = True
                self.gate.release()

    def is_set(self):
        return self.flag

    def wait(self, timeout=None):
        """True once set; False if timeout (seconds) passed first."""
        if self.flag:
            return True
        if self.gate.acquire(True, -1 if timeout is None else max(timeout, 0)):
            self.gate.release()      # the next waiter goes through too
        return self.flag


class Slots:
    """threading.BoundedSemaphore: `n` slots, handed to waiters in the
    order they came; release() beyond `n` is a ValueError."""

    def __init__(self, n):
        self.n = self.free = n
        self.mutex = _thread.allocate_lock()
        self.waiters = []            # a held lock per waiter

    def acquire(self, blocking=True, timeout=-1):
        with self.mutex:
            if self.free:
                self.free -= 1
                return True
            if not blocking:
                return False
            waiter = _thread.allocate_lock()
            waiter.acquire()
            self.waiters.append(waiter)
        if waiter.acquire(True, timeout):
            return True              # release() handed its slot over
        with self.mutex:
            try:
                self.waiters.remove(waiter)
            except ValueError:
                return True          # handed over as the wait ended
        return False

    def release(self):
        with self.mutex:
            if self.waiters:
                self.waiters.pop(0).release()
            elif self.free >= self.n:
                raise ValueError("Slots released too many times")
            else:
                self.free += 1


class Thread:
    """threading.Thread(target, args) as a daemon: start, join, is_alive."""

    def __init__(self, target, args=()):
        self.target, self.args = target, args
        self.running = _thread.allocate_lock()

    def start(self):
        self.running.acquire()
        try:
            _thread.start_new_thread(self._run, ())
        except BaseException:
            self.running.release()
            raise

    def _run(self):
        try:
            self.target(*self.args)
        finally:
            self.running.release()

    def join(self, timeout=-1):
        if self.running.acquire(True, timeout):
            self.running.release()

    def is_alive(self):
        return self.running.locked()
