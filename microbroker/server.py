"""The standalone front door: `microbroker serve`.

An `http.server` service: ThreadingHTTPServer listeners and a
BaseHTTPRequestHandler subclass. http.server reads the request line and
the headers; every decision about the request, errors included, is
web.App's, shared with the CGI entry, so both doors answer byte for byte
the same. http.server never answers on its own: its HTML error pages
(send_error), its `Server:`/`Date:` headers and its stderr log lines are
all replaced, and its own request-line dispatch (do_GET and friends, 501
for other methods) is not used: the method is App's to judge.

What http.server does not do by itself, and this module adds: one
deadline for the whole request (a client trickling a byte at a time is
dropped), a byte limit on the request head as a whole, strict header
lines (no folding), a bounded number of connections (the rest get a short
503; per source address, limits.py), a body over max_body refused without
being read.

One request per connection (what wget and uclient-fetch do). IPv6 and
IPv4 listeners; an IPv6 wildcard also takes IPv4 (mapped addresses are
normalised by web.py) unless an IPv4 listener shares its port.
"""

import errno
import http.client
import http.server
import io
import os
import signal
import socket
import socketserver
import sys
import threading
import time

from microbroker import jsonlite
from microbroker.broker import BrokerError, log
from microbroker.config import parse_listen
from microbroker.limits import ANSWER_GRACE, Refuser, SourceLimits, WorkGate
from microbroker.web import REASONS, answer_format, show

HARD_HEADER_LIMIT = 65536   # beyond this we stop reading, whatever the config
DRAIN_LIMIT = 1 << 20       # bytes read after refusing a body
DRAIN_TIME = 1.0            # seconds for that, within the request's deadline
# Lease, renew and release requests at once (the rest wait in order): a few
# overlap one's kernel round trips with another's Python; more only share
# one interpreter lock. A wait well inside a client's 10 s timeout.
WORK_SLOTS = 4
WORK_WAIT = 4.0             # seconds


def unquote_path(path):
    """Percent-decode a request path the way a CGI server fills
    PATH_INFO; None if it is not valid."""
    if "%" not in path:
        return path
    parts = path.split("%")
    out = [parts[0].encode("latin-1", "replace")]
    for p in parts[1:]:
        h = p[:2]
        if len(h) != 2 or not all(c in "0123456789abcdefABCDEF" for c in h):
            return None
        out.append(bytes((int(h, 16),)))
        out.append(p[2:].encode("latin-1", "replace"))
    try:
        return b"".join(out).decode("utf-8")
    except UnicodeDecodeError:
        return None


_DIGITS = frozenset(b"0123456789")
_HEXDIGITS = frozenset(b"0123456789abcdefABCDEF")
CHUNK_LINE_LIMIT = 1024     # a chunk-size line, or one trailer line
TRAILER_LIMIT = 4096        # all trailer lines together


def is_digits(s):
    """ASCII digits only (str.isdigit also takes '\xb2' and other
    scripts' digits, which int() may then refuse)."""
    return bool(s) and s.isascii() and s.isdigit()


def read_chunked(rfile, limit):
    """A chunked body (RFC 9112 section 7.1) from rfile -> bytes. Raises
    BrokerError too_large once the data passes `limit` bytes (the rest is
    not read), bad_request when the stream is malformed or ends early.
    Chunk extensions and trailer fields are read and ignored."""
    def line():
        s = rfile.readline(CHUNK_LINE_LIMIT + 1)
        if not s.endswith(b"\n"):
            if len(s) > CHUNK_LINE_LIMIT:
                raise BrokerError("bad_request", "chunk size line too long")
            raise BrokerError("bad_request", "chunked body ends early")
        return s[:-2] if s.endswith(b"\r\n") else s[:-1]

    out, size = [], 0
    while True:
        h = line().partition(b";")[0].rstrip(b" \t")
        if not h or len(h) > 8 or not set(h) <= _HEXDIGITS:
            raise BrokerError("bad_request", "bad chunk size in chunked "
                              "body")
        n = int(h, 16)
        if n == 0:
            break
        size += n
        if size > limit:
            raise BrokerError("too_large", "request body exceeds %d bytes"
                              % limit)
        data = rfile.read(n)
        if len(data) != n:
            raise BrokerError("bad_request", "chunked body ends early")
        out.append(data)
        if line():
            raise BrokerError("bad_request", "chunk data longer than its "
                              "size")
    left = TRAILER_LIMIT
    while True:
        t = line()
        if not t:
            return b"".join(out)
        left -= len(t)
        if left < 0:
            raise BrokerError("too_large", "chunked body trailer exceeds "
                              "%d bytes" % TRAILER_LIMIT)


def encode_answer(answer):
    """An App answer as the bytes of one HTTP/1.1 response."""
    status, headers, body = answer
    head = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "Error"))]
    head += ["%s: %s" % h for h in headers]
    head += ["Content-Length: %d" % len(body), "Connection: close", "", ""]
    return "\r\n".join(head).encode("latin-1") + body


class _SocketInput(io.RawIOBase):
    """The socket as a raw stream with one deadline for the whole
    request, checked before every recv: a client trickling a byte at a
    time cannot hold a connection slot for long."""

    def __init__(self, sock, timeout):
        io.RawIOBase.__init__(self)
        self.sock = sock
        self.deadline = time.monotonic() + timeout

    def readable(self):
        return True

    def readinto(self, b):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("request took too long")
        self.sock.settimeout(left)
        return self.sock.recv_into(b)


class _RequestInput(io.BufferedReader):
    """The handler's rfile. While the request head is read (`head` is a
    list) every line is kept for checking and counted against one budget
    for the whole head; past it, LineTooLong, which http.server answers
    through send_error (-> 413 too_large)."""

    def __init__(self, sock, timeout, head_limit):
        io.BufferedReader.__init__(self, _SocketInput(sock, timeout))
        self.head = []
        self.head_left = head_limit

    def readline(self, limit=-1):
        line = io.BufferedReader.readline(self, limit)
        if self.head is not None:
            self.head.append(line)
            self.head_left -= len(line)
            if self.head_left < 0:
                raise http.client.LineTooLong("request head")
        return line


def _check_head(lines):
    """The header lines as read (request line first): None if the client
    went away before the blank line, else a BrokerError or False (fine).
    Stricter than http.client: a folded or malformed line is refused, not
    joined to its neighbour or taken for the start of the body."""
    if not lines or lines[-1] not in (b"\r\n", b"\n"):
        return None
    for line in lines[1:-1]:
        if line[:1] in (b" ", b"\t"):
            return BrokerError("bad_request", "folded header lines are not "
                               "accepted")
        name, colon, _ = line.decode("latin-1").partition(":")
        if not colon or not name or name != name.strip():
            return BrokerError("bad_request", "malformed header line")
    return False


class _Handler(http.server.BaseHTTPRequestHandler):
    """One request per connection, read by http.server, answered by
    web.App."""

    protocol_version = "HTTP/1.1"   # our status lines, 100 Continue included
    server_version = "microbroker"  # never sent: we write no Server header
    sys_version = ""

    def setup(self):
        http.server.BaseHTTPRequestHandler.setup(self)
        srv = self.server
        self.rfile.close()
        self.rfile = _RequestInput(self.connection, srv.timeout_s, max(
            HARD_HEADER_LIMIT, srv.app.config.max_header))
        self.fmt = "json"
        self.request_version = "HTTP/1.1"   # for answers before parse_request

    def handle(self):
        self.close_connection = True
        try:
            self.handle_one_request()
        except (OSError, ValueError):
            pass  # timeouts, resets: nobody left to answer
        except Exception as e:
            # http.server's own parsing broke on something: still answer.
            log("error", "request from %s: %s: %s", self.client_address[0],
                type(e).__name__, e)
            try:
                self._error(e, self.fmt)
            except (OSError, ValueError):
                pass

    def handle_one_request(self):
        app = self.server.app
        try:
            line = self.rfile.readline(self.rfile.head_left + 1)
        except http.client.LineTooLong:
            return self._error(BrokerError("too_large", "request line too "
                                           "long"))
        if not line:
            return
        # Stricter than http.server (which takes HTTP/0.9, other 1.x
        # versions, any whitespace, absolute URIs), and checked before
        # http.server reads headers, so a bad line is answered at once.
        try:
            method, target, version = line.decode("latin-1") \
                .rstrip("\r\n").split(" ")
        except ValueError:
            version = target = ""
        if version not in ("HTTP/1.0", "HTTP/1.1") or \
                not target.startswith("/"):
            return self._error(BrokerError("bad_request", "malformed request "
                                           "line"))
        self.command = method   # (a HEAD is answered without a body)
        self.fmt = answer_format(target.partition("?")[2])
        self.raw_requestline = line
        if not self.parse_request():    # it answered through send_error
            return
        self.close_connection = True
        head, self.rfile.head = self.rfile.head, None
        bad = _check_head(head)
        if bad is None:
            # EOF inside the head: gone, or only half-closed and waiting
            return self._error(BrokerError("bad_request", "request head "
                                           "ends early"), self.fmt)
        if not bad and (self.headers.defects or self.headers.get_payload()):
            bad = BrokerError("bad_request", "malformed header line")
        if bad:
            return self._error(bad, self.fmt)
        headers = {}
        for name, value in self.headers.items():
            name, value = name.lower(), value.strip()
            headers[name] = headers[name] + ", " + value if name in headers \
                else value
        path, _, query = target.partition("?")
        path = unquote_path(path)
        limit = app.config.max_body
        drain = 0
        te = headers.get("transfer-encoding")
        if te is not None:
            # What uclient-fetch --post-data sends: no Content-Length.
            if "content-length" in headers:
                return self._error(BrokerError(
                    "bad_request", "Content-Length and Transfer-Encoding "
                    "together"), self.fmt)
            if te.lower() != "chunked":
                return self._error(BrokerError(
                    "bad_request", "the only Transfer-Encoding taken is "
                    "chunked"), self.fmt)
            self._continue(headers)
            try:
                body = read_chunked(self.rfile, limit)
            except BrokerError as e:
                if e.code == "too_large":
                    self._error(e, self.fmt)
                    return self._drain(DRAIN_LIMIT)
                return self._error(e, self.fmt)
            n = len(body)
        else:
            cl = headers.get("content-length", "0")
            if not is_digits(cl) or len(cl) > 15:
                return self._error(BrokerError("bad_request", "bad "
                                               "Content-Length"), self.fmt)
            n = int(cl)
            if n > limit:
                body, drain = None, n   # App answers too_large
            else:
                if n:
                    self._continue(headers)
                body = self.rfile.read(n) if n else b""
                if len(body) != n:
                    return self._error(BrokerError(
                        "bad_request", "body shorter than its "
                        "Content-Length"), self.fmt)
        if path is None:
            answer = app.error(BrokerError("bad_request", "bad %-escape in "
                                           "path"), self.fmt)
        else:
            answer = app.handle(method, path, query, headers, body,
                                self.client_address[0],
                                self.connection.getsockname()[0], n)
        log("debug", "%s %s %s -> %d", self.client_address[0], method,
            show(target), answer[0])
        self._write(answer)
        if drain:
            self._drain(min(drain, DRAIN_LIMIT))

    def _continue(self, headers):
        if headers.get("expect", "").lower() == "100-continue":
            self.send_response_only(100)
            self.end_headers()

    def _drain(self, left):
        """Read what the client still sends, so that closing does not
        reset the connection before it saw our answer: DRAIN_LIMIT bytes
        at most, for DRAIN_TIME at most, within the request's deadline."""
        sock = self.connection
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        buf = self.rfile
        raw = buf.raw
        raw.deadline = min(raw.deadline, time.monotonic() + DRAIN_TIME)
        while left > 0:
            chunk = buf.read1(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk)

    def handle_expect_100(self):
        # Decided once the body's size is known: no 100 Continue for a
        # body we will refuse unread.
        return True

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (header lines too long, too many)
        in the API's error format, never its HTML page."""
        if code in (413, 414, 431):
            e = BrokerError("too_large", "request headers exceed %d bytes"
                            % self.server.app.config.max_header)
        else:
            e = BrokerError("bad_request", "malformed request")
        self._error(e, self.fmt)

    def _error(self, e, fmt="json"):
        self._write(self.server.app.error(e, fmt))

    def _write(self, answer):
        # One write for head and body: no Server or Date header (the CGI
        # door has none either), and no second small segment on the wire.
        # Within the request's deadline, but an answer ready at the very
        # end still gets a moment to leave.
        self.close_connection = True
        left = self.rfile.raw.deadline - time.monotonic()
        self.connection.settimeout(max(left, ANSWER_GRACE))
        data = encode_answer(answer)
        if getattr(self, "command", None) == "HEAD":   # the head only
            data = data[:data.index(b"\r\n\r\n") + 4]
        self.wfile.write(data)

    def log_message(self, format, *args):
        # http.server would write to stderr; ours goes to the broker log.
        log("debug", "%s: %s", self.client_address[0], format % args)


class _HTTPServer(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    # Requests in flight are counted by `slots` and waited for in
    # Server.stop(); non-daemon threads would also be kept in a list that
    # grows with every request on Python < 3.9.2 (bpo-37193).
    daemon_threads = True
    block_on_close = False
    # socketserver's listen backlog is 5: a burst of connections (one
    # address's refused ones included) would have SYNs dropped and
    # retried a second later, the good clients' among them.
    request_queue_size = 128

    def __init__(self, family, addr, v6only, app, slots, timeout_s,
                 sources, refuser):
        self.address_family = family
        self.v6only = v6only
        self.app = app
        self.slots = slots
        self.timeout_s = timeout_s
        self.sources = sources
        self.refuser = refuser
        http.server.ThreadingHTTPServer.__init__(self, addr, _Handler,
                                                 bind_and_activate=False)
        try:
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                                   1 if self.v6only else 0)
        # Not HTTPServer.server_bind: it asks DNS for our name (getfqdn),
        # which can stall start-up on a router without a resolver.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address):
        # Per source address a bounded number of connections and of
        # requests per second, and a bounded number in all: the rest get a
        # short 429 or 503 instead of a thread each.
        source = client_address[0]
        refused = self.sources.admit(source)
        if refused is None and not self.slots.acquire(blocking=False):
            self.sources.release(source)
            refused = BrokerError("unavailable", "too many connections, "
                                  "try again", 5)
        if refused is not None:
            log("debug", "%s: refused: %s", source, refused.message)
            self.refuser.refuse(request, refused)
            return
        try:
            http.server.ThreadingHTTPServer.process_request(self, request,
                                                            client_address)
        except BaseException:
            self.slots.release()
            self.sources.release(source)
            raise

    def process_request_thread(self, request, client_address):
        try:
            http.server.ThreadingHTTPServer.process_request_thread(
                self, request, client_address)
        finally:
            self.slots.release()
            self.sources.release(client_address[0])

    def handle_error(self, request, client_address):
        import sys
        e = sys.exc_info()[1]
        log("error", "request from %s failed: %s: %s", client_address[0],
            type(e).__name__, e)
        if log.level <= 10:
            import traceback
            traceback.print_exc()


class Server:
    """All listeners of one broker, plus the periodic sweep."""

    def __init__(self, app, listen=None):
        self.app = app
        cfg = app.config
        self.listen = list(listen if listen is not None else cfg.listen)
        self.servers = []
        self.threads = []
        self.stopping = threading.Event()
        self.slots = threading.BoundedSemaphore(cfg.max_connections)
        self.sources = SourceLimits(cfg.source_connections,
                                    cfg.request_rate, cfg.request_burst)
        self.refuser = Refuser(
            lambda e, fmt: encode_answer(app.error(e, fmt)))
        app.gate = WorkGate(WORK_SLOTS, WORK_WAIT)

    def start(self):
        """Bind every listen address; returns [(host, port)] as bound."""
        cfg = self.app.config
        parsed = [parse_listen(t) for t in self.listen]
        v4ports = {port for fam, _, port in parsed if fam == 4}
        bound = []
        try:
            for fam, host, port in parsed:
                family = socket.AF_INET6 if fam == 6 else socket.AF_INET
                v6only = not (host == "::" and port not in v4ports)
                try:
                    srv = _HTTPServer(family, (host, port), v6only, self.app,
                                      self.slots, cfg.timeout, self.sources,
                                      self.refuser)
                except OSError as e:
                    if e.errno == errno.EAFNOSUPPORT and len(parsed) > 1:
                        log("warning", "no IPv%d here, not listening on "
                            "%s", fam, host)
                        continue
                    raise OSError(e.errno, "cannot listen on [%s]:%d: %s"
                                  % (host, port, e.strerror))
                self.servers.append(srv)
                bound.append(srv.server_address[:2])
        except BaseException:
            for srv in self.servers:
                srv.server_close()
            self.servers = []
            raise
        # Listener and request threads (which inherit the mask) never take
        # SIGTERM/SIGINT: only the main thread, waiting in run(), may be
        # woken by them.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK,
                                      {signal.SIGTERM, signal.SIGINT,
                                       signal.SIGHUP})
        try:
            self.refuser.start()
            for srv in self.servers:
                # daemon: an unexpected error in the main thread must not
                # leave the process hanging on its listeners
                t = threading.Thread(target=srv.serve_forever,
                                     kwargs={"poll_interval": 0.5},
                                     name="listen-%s" % (srv.server_address,),
                                     daemon=True)
                t.start()
                self.threads.append(t)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return bound

    def run(self, wake_fd=None, stop_asked=lambda: False, on_wake=None):
        """Sweep every sweep_interval until stop() or stop_asked(). A byte
        on wake_fd (signal.set_wakeup_fd) ends a wait early, and on_wake()
        runs then (a reload)."""
        import select
        interval = self.app.config.sweep_interval
        due = time.monotonic() + interval
        while not self.stopping.is_set() and not stop_asked():
            left = due - time.monotonic()
            if left <= 0:
                self.sweep()
                due = time.monotonic() + interval
                continue
            if wake_fd is None:
                self.stopping.wait(min(left, 5.0))
                continue
            r, _, _ = select.select([wake_fd], [], [], min(left, 5.0))
            if r:
                try:
                    os.read(wake_fd, 512)
                except OSError:
                    pass
            if on_wake is not None:
                on_wake()

    def sweep(self):
        try:
            gone = self.app.broker.sweep()
            if gone:
                from microbroker import metrics
                metrics.expired(self.app.config, gone)
        except BrokerError as e:
            log("error", "sweep: %s", e.message)
        except Exception as e:
            log("error", "sweep: %s: %s", type(e).__name__, e)

    def stop(self):
        """Stop accepting, then wait (bounded) for answers in flight."""
        self.stopping.set()
        for srv in self.servers:
            srv.shutdown()
        for srv in self.servers:
            srv.server_close()
        for t in self.threads:
            t.join()
        if self.refuser.thread.is_alive():
            self.refuser.stop()
        cfg = self.app.config
        deadline = time.monotonic() + cfg.timeout + 2
        taken = 0
        while taken < cfg.max_connections:
            left = deadline - time.monotonic()
            if left <= 0 or not self.slots.acquire(timeout=left):
                log("warning", "stopped with %d request(s) unanswered",
                    cfg.max_connections - taken)
                break
            taken += 1
        for _ in range(taken):
            self.slots.release()
        self.servers, self.threads = [], []


def serve(app, load=None):
    """Start, say what we are doing and what will not work, run until
    SIGTERM or SIGINT, stop cleanly. SIGHUP: reload.reload(app, load)."""
    cfg = app.config
    srv = Server(app)
    # The handler only records the signal: it may run at any bytecode of
    # the main thread, even inside a lock the rest of us holds. The wakeup
    # pipe ends the main loop's wait.
    got = []
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    old_fd = signal.set_wakeup_fd(w)
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum))
           for s in (signal.SIGTERM, signal.SIGINT)}
    hups = []
    old[signal.SIGHUP] = signal.signal(
        signal.SIGHUP, lambda signum, frame: hups.append(signum))

    def on_wake():
        if hups and not got:
            del hups[:]
            from microbroker import reload
            try:
                reload.reload(app, load or (lambda: app.config))
            except Exception as e:
                log("error", "reload failed: %s: %s", type(e).__name__, e)

    try:
        b = app.broker   # open the lease store before taking requests
        b.hold_leases()  # offers at once, leases after the reconcile
        bound = srv.start()
        names = ", ".join(s.name for s in cfg.enabled_services())
        log("info", "microbroker listening on %s; services: %s; leases in "
            "%s", ", ".join("[%s]:%d" % a if ":" in a[0] else "%s:%d" % a
                            for a in bound), names, cfg.lease_path)
        # A long-running process pays json's import once, and every lease
        # row and answer after it is written and read by json's C code.
        jsonlite.load_json()
        ok, reason, _kinds = b.kernel_status()
        if not ok:
            if getattr(b.dataplane, "dry_run", False):
                log("warning", "%s", reason)
            else:
                log("warning", "this host cannot build tunnels: %s; lease "
                    "requests will be answered 'unavailable'", reason)
        elif not got:
            try:
                done = b.reconcile()
                if done:
                    log("info", "reconciled kernel with lease store: %s",
                        done)
            except Exception as e:
                log("error", "reconcile at start failed: %s: %s",
                    type(e).__name__, e)
        b.leases_ready()
        if not got:
            srv.sweep()
        srv.run(r, lambda: bool(got), on_wake)
        log("info", "signal %d: shutting down", got[0])
    finally:
        srv.stop()
        signal.set_wakeup_fd(old_fd)
        for s, h in old.items():
            signal.signal(s, h)
        os.close(r)
        os.close(w)
    log("info", "stopped")
