"""The lease file's lock: an exclusive flock on `<path>.lock` for one call,
plus an in-process lock so that threads of one server exclude each other
too; each wait bounded (Busy past it)."""

import posix
import time
import _thread

from microbroker.leases.errors import Busy

DEFAULT_LOCK_WAIT = 5.0       # seconds, when a caller gives None
BUSY_RETRY = 2                # Retry-After for a lock not had in time

_thread_locks = {}
_thread_locks_guard = _thread.allocate_lock()


def _thread_lock(path):
    with _thread_locks_guard:
        lock = _thread_locks.get(path)
        if lock is None:
            lock = _thread_locks[path] = _thread.allocate_lock()
        return lock


def _reset_thread_locks():
    # A child forked while another thread held a lock would wait forever.
    global _thread_locks_guard
    _thread_locks.clear()
    _thread_locks_guard = _thread.allocate_lock()


if hasattr(posix, "register_at_fork"):
    posix.register_at_fork(after_in_child=_reset_thread_locks)


class _FileLock:
    """Exclusive flock on <path>.lock for one call; flock (not lockf) so that
    two opens in one process exclude each other too."""

    def __init__(self, path, timeout, mode):
        self.path, self.timeout, self.mode = path, timeout, mode
        self.fd = None
        self.tlock = _thread_lock(path)

    def __enter__(self):
        import fcntl
        # Never unbounded: a stopped process holding the lock must not
        # hold every request behind it.
        timeout = DEFAULT_LOCK_WAIT if self.timeout is None else max(self.timeout, 0)
        deadline = time.monotonic() + timeout
        if not self.tlock.acquire(True, timeout):
            raise Busy(f"{self.path}: held by another thread for {timeout} s", self.path,
                       BUSY_RETRY)
        try:
            self.fd = posix.open(self.path, posix.O_RDWR | posix.O_CREAT | posix.O_CLOEXEC, self.mode)
            delay = 0.0002
            while True:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return self
                except BlockingIOError:
                    pass
                if time.monotonic() >= deadline:
                    raise Busy(f"{self.path}: held by another process for "
                               f"{timeout} s", self.path, BUSY_RETRY)
                time.sleep(delay)
                delay = min(delay * 2, 0.01)
        except BaseException:
            self._release()
            raise

    def _release(self):
        if self.fd is not None:
            posix.close(self.fd)           # drops the flock
            self.fd = None
        self.tlock.release()

    def __exit__(self, *exc):
        self._release()
