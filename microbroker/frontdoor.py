"""The listeners of `microbroker serve`: sockets bound, connections
accepted and admitted (limits.py), and every request head read by one
thread over epoll, so a client that trickles its head holds no
thread of its own.

A plain offer (GET of /offer or /, headers and nothing else) is
answered in that thread: no thread is started for it, and it does not
wait behind the lease requests that arrived in the same burst. Every
other request goes, once its head is in (or its request line shows it
malformed), with the bytes read so far to a thread of its own and
server.py's http.server handler, which reads and judges the rest.
This module does not import http.server: offers are answered while it
is still being imported at start-up. Nor socket, selectors or threading:
their enums and collections are a third of serve's start before it
listens (under emulation); _socket, select.epoll and threads.py are what
they wrap.
"""

import _socket
import _thread
import errno
import os
import select
import time

from microbroker.broker import BrokerError, log
from microbroker.config import parse_listen
from microbroker.limits import ANSWER_GRACE
from microbroker.threads import Thread
from microbroker.web import REASONS, show

HARD_HEADER_LIMIT = 65536   # beyond this we stop reading, whatever the config
BACKLOG = 128               # a burst of SYNs is queued, not dropped and retried
ACCEPT_PAUSE = 0.5          # seconds without accepting when out of descriptors
# Connections beyond max_connections that may still be plain offers: a
# storm's lease requests, each holding a slot until its answer, must not
# leave a client that only asks for the offer refused.
SPARE_FOR_OFFERS = 16
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                   b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_VISIBLE = frozenset(range(0x21, 0x7f))
_VALUE = _VISIBLE | {0x20, 0x09}
HTTP_MAX_HEADERS = 100      # http.client's _MAXHEADERS: lines after the
                            # request line, the blank one too; more is a 413
# A body, or a request about one, is http.server's to read.
_BODY_HEADERS = (b"content-length", b"transfer-encoding", b"expect")


def encode_answer(answer):
    """An App answer as the bytes of one HTTP/1.1 response."""
    status, headers, body = answer
    head = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "Error"))]
    head += ["%s: %s" % h for h in headers]
    head += ["Content-Length: %d" % len(body), "Connection: close", "", ""]
    return "\r\n".join(head).encode("latin-1") + body


def request_line(line):
    """(method, target) of a request line (CRLF included) as wget and
    uclient-fetch send one, else None."""
    parts = line[:-2].split(b" ")
    if len(parts) != 3 or not line.endswith(b"\r\n"):
        return None
    method, target, version = parts
    if not method or not set(method) <= _TCHAR or \
            version not in (b"HTTP/1.1", b"HTTP/1.0") or \
            not target.startswith(b"/") or not set(target) <= _VISIBLE:
        return None
    return method.decode("ascii"), target.decode("ascii")


def lax_request_line(line):
    """(method, target) of a request line as server.py's handler takes
    one (any method, LF or CRLF, any byte in the target), else None: a
    line it refuses before reading a header."""
    try:
        method, target, version = line.decode("latin-1") \
            .rstrip("\r\n").split(" ")
    except ValueError:
        return None
    if version not in ("HTTP/1.0", "HTTP/1.1") or not target.startswith("/"):
        return None
    return method, target


def plain_offer_line(line):
    """(method, target) if the request line asks for an offer the way
    wget and uclient-fetch do, else None."""
    got = request_line(line)
    if got is None or got[0] != "GET" or \
            got[1].partition("?")[0] not in ("/", "/offer"):
        return None
    return got


def join_header(headers, name, value):
    """A header line into {lowercase name: value}, the way both paths
    pass headers to App: a repeated name's values joined by ", "."""
    name, value = name.lower(), value.strip()
    headers[name] = headers[name] + ", " + value if name in headers \
        else value


def plain_headers(lines):
    """The header lines of a plain offer as the handler would pass them
    to App ({lowercase name: value}, repeats joined), or None for
    anything the fast path leaves to http.server: a body, an odd byte, a
    line that is not `name: value`."""
    headers = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or not set(name) <= _TCHAR or \
                not set(value) <= _VALUE:
            return None
        if name.lower() in _BODY_HEADERS:
            return None
        join_header(headers, name.decode("ascii"), value.decode("ascii"))
    return headers


def _too_many():
    return BrokerError("unavailable", "too many connections, try again", 5)


class _Conn:
    __slots__ = ("sock", "addr", "local", "deadline", "buf", "out", "fast",
                 "watched", "spare")

    def __init__(self, sock, addr, local, deadline):
        self.sock, self.addr, self.local = sock, addr, local
        self.deadline = deadline
        self.watched = False     # registered with epoll
        self.spare = False       # admitted beyond max_connections: offers only
        self.buf = b""
        self.out = None      # the rest of an answer the socket did not take
        self.fast = None     # (method, target) of an offer; False: other


class FrontDoor:
    """Every listener of one broker and the thread that reads heads.
    `slots` (a BoundedSemaphore), `sources` (limits.SourceLimits) and
    `refuser` (limits.Refuser) admit connections; `slow(sock, addr,
    head, deadline, head_limit)` answers what the fast path does not, in
    a thread of its own; the admission is released here after it."""

    def __init__(self, app, listen, slots, sources, refuser, slow):
        self.app = app
        self.listen = list(listen)
        self.slots, self.sources, self.refuser = slots, sources, refuser
        self.slow = slow
        cfg = app.config
        self.timeout = cfg.timeout
        self.head_limit = max(HARD_HEADER_LIMIT, cfg.max_header)
        self.spare_left = SPARE_FOR_OFFERS     # the reading thread's alone
        self.sockets = []
        self.local = {}         # listening socket -> its address, or None
        self.poll = None
        self.watch = {}         # fd -> what it is: a listening socket, a
                                # _Conn, or None (the wake-up pipe)
        self.conns = {}
        self.paused = None      # monotonic time to accept again
        self.stopping = False
        self.thread = None
        self.wake_r = self.wake_w = None

    def bind(self):
        """Bind every listen address; returns [(host, port)] as bound.
        An IPv6 wildcard takes IPv4 too unless an IPv4 listener shares
        its port."""
        parsed = [parse_listen(t) for t in self.listen]
        v4ports = {port for fam, _, port in parsed if fam == 4}
        bound = []
        try:
            for fam, host, port in parsed:
                family = _socket.AF_INET6 if fam == 6 else _socket.AF_INET
                try:
                    s = _socket.socket(family, _socket.SOCK_STREAM)
                except OSError as e:
                    if e.errno == errno.EAFNOSUPPORT and len(parsed) > 1:
                        log("warning", "no IPv%d here, not listening on "
                            "%s", fam, host)
                        continue
                    raise OSError(e.errno, "cannot listen on [%s]:%d: %s"
                                  % (host, port, e.strerror))
                self.sockets.append(s)
                try:
                    s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
                    if family == _socket.AF_INET6:
                        v6only = not (host == "::" and port not in v4ports)
                        s.setsockopt(_socket.IPPROTO_IPV6,
                                     _socket.IPV6_V6ONLY, 1 if v6only else 0)
                    s.bind((host, port))
                    s.listen(BACKLOG)
                except OSError as e:
                    raise OSError(e.errno, "cannot listen on [%s]:%d: %s"
                                  % (host, port, e.strerror))
                s.setblocking(False)
                bound.append(s.getsockname()[:2])
                # A wildcard's connections are asked where they arrived.
                self.local[s] = None if host in ("::", "0.0.0.0") \
                    else bound[-1][0]
        except BaseException:
            self.close()
            raise
        return bound

    def start(self):
        """The reading thread, from now on (after bind())."""
        self.poll = select.epoll()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self._watch(self.wake_r, None)
        for s in self.sockets:
            self._watch(s.fileno(), s)
        self.thread = Thread(self._run)
        self.thread.start()

    def _watch(self, fd, what, events=select.EPOLLIN):
        self.poll.register(fd, events)
        self.watch[fd] = what

    def _unwatch(self, fd):
        self.poll.unregister(fd)
        del self.watch[fd]

    def stop(self):
        """No more accepting or reading; heads not yet read are dropped."""
        self.stopping = True
        if self.thread is not None:
            try:
                os.write(self.wake_w, b"x")
            except OSError:
                pass
            self.thread.join()
            self.thread = None
        self.close()

    def close(self):
        for conn in list(self.conns.values()):
            self._done(conn)
        for s in self.sockets:
            s.close()
        self.sockets = []
        for fd in (self.wake_r, self.wake_w):
            if fd is not None:
                os.close(fd)
        self.wake_r = self.wake_w = None
        if self.poll is not None:
            self.poll.close()
            self.poll = None
        self.watch = {}

    def _run(self):
        while not self.stopping:
            try:
                self._step()
            except Exception as e:
                log("error", "front door: %s: %s", type(e).__name__, e)
                time.sleep(0.01)    # not a loop that logs as fast as it can

    def _step(self):
        now = time.monotonic()
        for conn in [c for c in self.conns.values() if c.deadline <= now]:
            self._done(conn)     # too slow: nobody left to answer
        if self.paused is not None and self.paused <= now:
            self.paused = None
            for s in self.sockets:
                self._watch(s.fileno(), s)
        due = min([c.deadline for c in self.conns.values()] +
                  ([self.paused] if self.paused else []), default=now + 5)
        for fd, _events in self.poll.poll(max(due - now, 0.001)):
            if fd not in self.watch:
                continue     # gone since this poll began
            data = self.watch[fd]
            if data is None:
                try:
                    os.read(self.wake_r, 512)
                except OSError:
                    pass
            elif isinstance(data, _Conn):
                try:
                    if data.out is not None:    # an answer being sent
                        self._flush(data)
                    else:
                        self._read(data)
                except Exception as e:
                    # That connection goes, not the service's ears.
                    log("error", "request from %s: %s: %s", data.addr[0],
                        type(e).__name__, e)
                    if data.sock in self.conns:
                        self._done(data)
            elif self.paused is None:
                self._accept(data)

    def _accept(self, lsock):
        # Everything queued now, not one per wake-up: a burst is read in
        # the order it came rather than left waiting in the backlog.
        while True:
            try:
                fd, addr = lsock._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                               errno.ENOMEM):
                    # The queue stays readable: without a pause this
                    # thread would spin until a descriptor is free.
                    log("warning", "cannot accept: %s", e.strerror)
                    self.paused = time.monotonic() + ACCEPT_PAUSE
                    for s in self.sockets:
                        self._unwatch(s.fileno())
                return      # ECONNABORTED and the like: that one is gone
            # What socket.socket.accept() makes of the descriptor (blocking:
            # accept4 gave it no O_NONBLOCK).
            try:
                sock = _socket.socket(lsock.family, _socket.SOCK_STREAM, 0, fd)
            except OSError:
                os.close(fd)
                continue
            self._admit(sock, addr, self.local.get(lsock))

    def _admit(self, sock, addr, local):
        # Per source address a bounded number of connections and of
        # requests per second, and a bounded number in all: the rest get a
        # short 429 or 503 and hold nothing.
        source = addr[0]
        refused = self.sources.admit(source)
        spare = False
        if refused is None and not self.slots.acquire(blocking=False):
            if self.spare_left > 0:
                self.spare_left -= 1
                spare = True
            else:
                self.sources.release(source)
                refused = _too_many()
        if refused is not None:
            log("debug", "%s: refused: %s", source, refused.message)
            self.refuser.refuse(sock, refused)
            return
        # Socket calls release the interpreter lock, and under a storm
        # each costs a wait to take it back: the socket stays blocking
        # (MSG_DONTWAIT instead of a mode switch), and a head that is in
        # already (most are, by the time a burst is accepted) is read and
        # answered without the selector.
        conn = _Conn(sock, addr, local, time.monotonic() + self.timeout)
        conn.spare = spare
        self.conns[sock] = conn
        self._read(conn)
        if sock in self.conns and not conn.watched:
            self._watch(sock.fileno(), conn)
            conn.watched = True

    def _read(self, conn):
        try:
            more = conn.sock.recv(65536, _socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self._done(conn)
        if not more:
            if conn.buf:        # half-closed inside the head: it is answered
                self._hand_off(conn)
            else:
                self._done(conn)
            return
        conn.buf += more
        buf = conn.buf
        if len(buf) > self.head_limit:
            return self._hand_off(conn)
        if conn.fast is None:
            end = buf.find(b"\n")
            if end < 0:
                return
            line = buf[:end + 1]
            # Only a line the handler refuses at once goes before the rest
            # of its head: the handler reads a head holding one of
            # server.PARSE_AT_ONCE turns, which a trickle must not hold.
            if lax_request_line(line) is None:
                return self._hand_off(conn)
            conn.fast = plain_offer_line(line) or False
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if b"\n\n" in buf or b"\n\r\n" in buf:
                self._hand_off(conn)     # bare LFs: http.server judges
            return
        # The whole head is in: whatever http.server then does with it,
        # it does not wait for a client to send it.
        if not conn.fast:
            return self._hand_off(conn)
        lines = buf[:end].split(b"\r\n")[1:]
        headers = plain_headers(lines)
        if headers is None or len(buf) != end + 4 or \
                len(lines) + 1 > HTTP_MAX_HEADERS:
            return self._hand_off(conn)
        self._answer(conn, headers)

    def _answer(self, conn, headers):
        method, target = conn.fast
        path, _, query = target.partition("?")
        local = conn.local
        if local is None:
            try:
                local = conn.sock.getsockname()[0]
            except OSError:
                return self._done(conn)
        answer = self.app.handle(method, path, query, headers, b"",
                                 conn.addr[0], local, 0)
        log("debug", "%s %s %s -> %d", conn.addr[0], method, show(target),
            answer[0])
        conn.out = encode_answer(answer)
        conn.deadline = max(conn.deadline, time.monotonic() + ANSWER_GRACE)
        self._flush(conn)

    def _flush(self, conn):
        try:
            n = conn.sock.send(conn.out, _socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            return self._done(conn)
        conn.out = conn.out[n:]
        if not conn.out:
            # All of the request was read: close() sends the answer, then
            # FIN (no reset), as shutdown() would.
            return self._done(conn)
        if conn.watched:
            self.poll.modify(conn.sock.fileno(), select.EPOLLOUT)
        else:
            self._watch(conn.sock.fileno(), conn, select.EPOLLOUT)
            conn.watched = True

    def _done(self, conn):
        self._forget(conn)
        conn.sock.close()
        self._release(conn)

    def _forget(self, conn):
        del self.conns[conn.sock]
        if conn.watched and self.poll is not None:
            self._unwatch(conn.sock.fileno())
            conn.watched = False

    def _release(self, conn):
        if conn.spare:
            self.spare_left += 1
        else:
            self.slots.release()
        self.sources.release(conn.addr[0])

    def _hand_off(self, conn):
        self._forget(conn)
        if conn.spare:      # not an offer after all: as if refused at once
            self._release(conn)
            self.refuser.refuse(conn.sock, _too_many(),
                                conn.buf.partition(b"\n")[0])
            return
        try:
            _thread.start_new_thread(self._slow, (conn,))
        except (RuntimeError, MemoryError):
            # No thread to be had: say so and hold nothing (the connection
            # is no longer ours to release once forgotten).
            self._release(conn)
            self.refuser.refuse(conn.sock, _too_many())

    def _slow(self, conn):
        try:
            self.slow(conn.sock, conn.addr, conn.buf, conn.deadline,
                      self.head_limit)
        except Exception as e:
            log("error", "request from %s failed: %s: %s", conn.addr[0],
                type(e).__name__, e)
        finally:
            try:
                conn.sock.close()
            finally:
                self._release(conn)
