"""Admission for `microbroker serve`: per source address a cap on open
connections and a token bucket of requests (SourceLimits), the one
thread that answers refused connections with a short 429 or 503
(Refuser), and the gate in front of lease builds (WorkGate).
Knows nothing of http.server: server.py asks and hands over. Made
before serve listens, so on the interpreter's C modules alone, like
frontdoor.py.
"""

import _socket
import _thread
import os
import select
import time
from _collections import deque

from microbroker.broker import BrokerError
from microbroker.threads import Thread
from microbroker.web import answer_format

ANSWER_GRACE = 1.0          # an answer due at the deadline may take this
REFUSE_TIME = 1.0           # a refused connection is read this long, then
REFUSE_MAX = 256            # closed; at most this many at once


class SourceLimits:
    """Per source address: connections open now (at most `cap`) and a
    token bucket of requests (`rate` per second, `burst` at once; rate 0:
    no limit). Every request counts, whatever it asks: a token or secret
    guessed wrongly costs a request like any other."""

    TRACKED = 4096      # addresses kept; full buckets are forgotten first

    def __init__(self, cap, rate, burst, clock=time.monotonic):
        self.cap, self.rate, self.burst = cap, rate, burst
        self.clock = clock
        self.lock = _thread.allocate_lock()
        self.open = {}       # address -> connections open
        self.buckets = {}    # address -> [tokens, when]

    def admit(self, source):
        """Take a connection and a request for source: None, or the
        BrokerError (too_many) to answer with."""
        with self.lock:
            n = self.open.get(source, 0)
            if n >= self.cap:
                return BrokerError("too_many", "too many connections from "
                                   "your address (at most %d)" % self.cap,
                                   max(1, int(ANSWER_GRACE)))
            if self.rate:
                now = self.clock()
                b = self.buckets.get(source)
                if b is None:
                    if len(self.buckets) >= self.TRACKED:
                        self._forget(now)
                    b = self.buckets[source] = [float(self.burst), now]
                else:
                    b[0] = min(float(self.burst),
                               b[0] + (now - b[1]) * self.rate)
                    b[1] = now
                if b[0] < 1.0:
                    wait = (1.0 - b[0]) / self.rate
                    return BrokerError("too_many", "too many requests from "
                                       "your address, at most %g per second"
                                       % self.rate, max(1, -int(-wait // 1)))
                b[0] -= 1.0
            self.open[source] = n + 1
            return None

    def release(self, source):
        with self.lock:
            n = self.open.get(source, 0) - 1
            if n > 0:
                self.open[source] = n
            else:
                self.open.pop(source, None)

    def _forget(self, now):
        full = [a for a, (tokens, when) in self.buckets.items()
                if tokens + (now - when) * self.rate >= self.burst]
        for a in full:
            del self.buckets[a]
        if len(self.buckets) >= self.TRACKED:
            # As many addresses as that, all busy: start again rather than
            # grow without bound.
            self.buckets.clear()


class WorkGate:
    """At most `slots` lease or renew requests at once, let in in the
    order they came; one not let in within `wait` seconds, or with a queue
    ahead of it that takes longer to drain, is answered 503 busy with a
    Retry-After from that queue.

    Without it a storm of lease requests takes turns at the lease file's
    lock in no order: some wait past the client's timeout, the client asks
    again, and the work done for the first ask is wasted. Use as
    `with gate:`."""

    def __init__(self, slots, wait, clock=time.monotonic):
        self.slots, self.wait, self.clock = slots, wait, clock
        self.mutex = _thread.allocate_lock()
        self.busy = 0
        self.queue = deque()                 # a locked lock per waiter
        self.took = 0.1                      # seconds a request takes, smoothed
        self.since = {}                      # thread -> when it got in

    def __enter__(self):
        with self.mutex:
            if self.busy < self.slots and not self.queue:
                self.busy += 1
                self.since[_thread.get_ident()] = self.clock()
                return self
            ahead = len(self.queue) + 1
            if self._drain(ahead) > self.wait:
                # It would not get in in time: say so now, not after the wait.
                raise self._busy(ahead)
            waiter = _thread.allocate_lock()
            waiter.acquire()
            self.queue.append(waiter)
        if not waiter.acquire(True, self.wait):
            with self.mutex:
                try:
                    self.queue.remove(waiter)
                except ValueError:
                    waiter = None        # __exit__ handed us its slot just now
            if waiter is not None:
                raise self._busy(ahead)
        self.since[_thread.get_ident()] = self.clock()
        return self

    def _drain(self, ahead):
        """Seconds until `ahead` requests are through, at the recent pace."""
        return ahead * self.took / self.slots

    def _busy(self, ahead):
        return BrokerError("busy", "%d lease requests ahead of this one; try again"
                           % ahead, max(1, int(self._drain(ahead) + 0.999)))

    def __exit__(self, *exc):
        took = self.clock() - self.since.pop(_thread.get_ident())
        with self.mutex:
            self.took = 0.8 * self.took + 0.2 * took
            if self.queue:
                self.queue.popleft().release()     # the slot passes on
            else:
                self.busy -= 1


class Refuser:
    """Refused connections, all in one thread: the request line is read
    (for the answer format it asks for), the answer sent, then what the
    client still sends is read so that closing does not reset the
    connection before the answer was seen; REFUSE_TIME in all, at most
    REFUSE_MAX connections at once (beyond that, closed straight away)."""

    def __init__(self, answer):
        self.answer = answer     # (BrokerError, fmt) -> bytes
        self.poll = select.epoll()
        self.lock = _thread.allocate_lock()
        self.socks = {}      # socket -> [deadline, error, head so far]
        self.fds = {}        # its descriptor -> socket
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.poll.register(self.wake_r, select.EPOLLIN)
        self.stopping = False
        self.thread = Thread(self._run)

    def start(self):
        self.thread.start()

    def refuse(self, sock, error, line=None):
        """Answer `error` on sock; `line`: its request line, when it was
        read already (else it is read here, for the answer's format)."""
        with self.lock:
            if self.stopping or len(self.socks) >= REFUSE_MAX:
                self._send(sock, error, line or b"")
                sock.close()
                return
            sock.setblocking(False)
            if line is not None:
                self._send(sock, error, line)
                error = None     # answered: only read until it closes
            self.socks[sock] = [time.monotonic() + REFUSE_TIME, error, b""]
            self.fds[sock.fileno()] = sock
            self.poll.register(sock.fileno(), select.EPOLLIN)
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def _send(self, sock, error, line):
        target = line.split(b" ")[1:2]
        query = target[0].partition(b"?")[2] if target else b""
        fmt = answer_format(query.decode("latin-1"))
        try:
            sock.setblocking(False)
            sock.send(self.answer(error, fmt))   # fits an empty buffer
            sock.shutdown(_socket.SHUT_WR)
        except OSError:
            pass

    def _run(self):
        while True:
            with self.lock:
                if self.stopping:
                    break
                now = time.monotonic()
                for sock, st in list(self.socks.items()):
                    if st[0] <= now:
                        self._close(sock)
                left = min((st[0] for st in self.socks.values()),
                           default=now + 5) - now
            for fd, _ in self.poll.poll(max(left, 0.01)):
                if fd == self.wake_r:
                    try:
                        os.read(fd, 4096)
                    except OSError:
                        pass
                    continue
                with self.lock:
                    sock = self.fds.get(fd)
                if sock is None:
                    continue     # closed since this poll began
                try:
                    more = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    more = b""
                with self.lock:
                    st = self.socks.get(sock)
                    if st is None:
                        continue
                    if st[1] is not None:
                        head = st[2] + more
                        if b"\n" in head or not more or len(head) > 8192:
                            self._send(sock, st[1], head.split(b"\n")[0])
                            st[1] = None
                        else:
                            st[2] = head
                    if not more:
                        self._close(sock)
        with self.lock:
            for sock in list(self.socks):
                self._close(sock)

    def _close(self, sock):
        st = self.socks.pop(sock)
        if st[1] is not None:    # no request line came: the default format
            self._send(sock, st[1], b"")
        del self.fds[sock.fileno()]
        self.poll.unregister(sock.fileno())
        sock.close()

    def stop(self):
        """Stop the thread (started or not) and close what it watched;
        again: nothing."""
        if self.poll is None:
            return
        with self.lock:
            self.stopping = True
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass
        self.thread.join()
        self.poll.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        self.poll = None
