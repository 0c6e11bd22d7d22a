"""The standalone front door: `microbroker serve`.

A threaded server on socketserver with its own small HTTP/1.1 request
reader instead of http.server: http.server alone doubles the resident
memory of the process and on OpenWrt pulls in python3-email and
python3-urllib, while all we need is a request line, headers within a
limit and a Content-Length body. Every decision about the request is
web.App's, shared with the CGI entry.

One request per connection (what wget and uclient-fetch do). IPv6 and
IPv4 listeners; an IPv6 wildcard also takes IPv4 (mapped addresses are
normalised by web.py) unless an IPv4 listener shares its port.
"""

import errno
import os
import signal
import socket
import socketserver
import threading
import time

from microbroker.broker import BrokerError, log
from microbroker.config import parse_listen
from microbroker.web import REASONS, answer_format, show

HARD_HEADER_LIMIT = 65536   # beyond this we stop reading, whatever the config
DRAIN_LIMIT = 1 << 20


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


class _Reject(Exception):
    """The request cannot be passed to the app; answer this error."""

    def __init__(self, error):
        self.error, self.fmt = error, "json"


class _Reader:
    """Lines and bytes from a socket, with one deadline for the whole
    request (checked before every recv), so a client trickling a byte at
    a time cannot hold a connection slot for long."""

    def __init__(self, sock, timeout):
        self.sock = sock
        self.deadline = time.monotonic() + timeout
        self.buf = b""

    def _recv(self, n):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("request took too long")
        self.sock.settimeout(left)
        return self.sock.recv(n)

    def readline(self, limit):
        while True:
            i = self.buf.find(b"\n", 0, limit)
            if i >= 0 or len(self.buf) >= limit:
                end = i + 1 if i >= 0 else limit
                line, self.buf = self.buf[:end], self.buf[end:]
                return line
            chunk = self._recv(8192)
            if not chunk:
                line, self.buf = self.buf, b""
                return line
            self.buf += chunk

    def read(self, n):
        while len(self.buf) < n:
            chunk = self._recv(min(65536, n - len(self.buf)))
            if not chunk:
                break
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data


def _read_request(rfile, cfg):
    """Read the request line and headers; None if the client went away,
    else (method, target, headers, content_length, expect_100)."""
    limit = max(HARD_HEADER_LIMIT, cfg.max_header)
    line = rfile.readline(limit + 1)
    if not line:
        return None
    total = len(line)
    if total > limit:
        raise _Reject(BrokerError("too_large", "request line too long"))
    try:
        method, target, version = line.decode("latin-1").rstrip("\r\n") \
            .split(" ")
    except ValueError:
        raise _Reject(BrokerError("bad_request", "malformed request line"))
    if version not in ("HTTP/1.0", "HTTP/1.1") or not target.startswith("/"):
        raise _Reject(BrokerError("bad_request", "malformed request line"))
    fmt = answer_format(target.partition("?")[2])
    try:
        return _read_rest(rfile, cfg, limit, total, method, target)
    except _Reject as r:
        r.fmt = fmt
        raise


def _read_rest(rfile, cfg, limit, total, method, target):
    headers = {}
    while True:
        line = rfile.readline(limit + 1)
        total += len(line)
        if total > limit:
            raise _Reject(BrokerError("too_large", "request headers exceed "
                                      "%d bytes" % cfg.max_header))
        if line in (b"\r\n", b"\n"):
            break
        if not line:
            return None  # the client went away mid-request
        if line[:1] in (b" ", b"\t"):
            raise _Reject(BrokerError("bad_request", "folded header lines "
                                      "are not accepted"))
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon or not name or name != name.strip():
            raise _Reject(BrokerError("bad_request", "malformed header "
                                      "line"))
        name, value = name.lower(), value.strip()
        headers[name] = headers[name] + ", " + value if name in headers \
            else value
    if "transfer-encoding" in headers:
        raise _Reject(BrokerError("bad_request", "send a Content-Length, "
                                  "not a chunked body"))
    cl = headers.get("content-length", "0")
    if not cl.isdigit() or len(cl) > 15:
        raise _Reject(BrokerError("bad_request", "bad Content-Length"))
    n = int(cl)
    expect = headers.get("expect", "").lower() == "100-continue"
    return method, target, headers, n, expect


class _Handler(socketserver.BaseRequestHandler):

    def handle(self):
        srv = self.server
        app = srv.app
        sock = self.request
        rfile = _Reader(sock, srv.timeout_s)
        drain = 0
        try:
            try:
                req = _read_request(rfile, app.config)
            except _Reject as r:
                answer = app.error(r.error, r.fmt)
                req = None
            else:
                if req is None:
                    return
            if req is not None:
                method, target, headers, n, expect = req
                path, _, query = target.partition("?")
                path = unquote_path(path)
                if n > app.config.max_body:
                    body, drain = None, n
                else:
                    if n and expect:
                        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    body = rfile.read(n) if n else b""
                    if len(body) != n:
                        return
                if path is None:
                    answer = app.error(BrokerError(
                        "bad_request", "bad %-escape in path"),
                        answer_format(query))
                else:
                    answer = app.handle(method, path, query, headers, body,
                                        self.client_address[0],
                                        sock.getsockname()[0], n)
                log("debug", "%s %s %s -> %d", self.client_address[0],
                    method, show(target), answer[0])
            sock.settimeout(srv.timeout_s)   # a fresh budget for the answer
            self._send(sock, answer)
            if drain:
                # Read what the client still sends so that closing does
                # not reset the connection before it saw our answer.
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(2)
                left = min(drain, DRAIN_LIMIT)
                while left > 0:
                    chunk = sock.recv(min(left, 65536))
                    if not chunk:
                        break
                    left -= len(chunk)
        except (OSError, ValueError):
            pass  # timeouts, resets: nobody left to answer

    @staticmethod
    def _send(sock, answer):
        status, headers, body = answer
        head = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "Error"))]
        head += ["%s: %s" % h for h in headers]
        head += ["Content-Length: %d" % len(body), "Connection: close",
                 "", ""]
        sock.sendall("\r\n".join(head).encode("latin-1") + body)


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    # Requests in flight are counted by `slots` and waited for in
    # Server.stop(); non-daemon threads would also be kept in a list that
    # grows with every request on Python < 3.9.2 (bpo-37193).
    daemon_threads = True
    block_on_close = False

    def __init__(self, family, addr, v6only, app, slots, timeout_s):
        self.address_family = family
        self.v6only = v6only
        self.app = app
        self.slots = slots
        self.timeout_s = timeout_s
        socketserver.TCPServer.__init__(self, addr, _Handler,
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
        socketserver.TCPServer.server_bind(self)

    def process_request(self, request, client_address):
        # A bounded number of connections: the rest get a short 503
        # instead of a thread each.
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1)
                _Handler._send(request, self.app.error(BrokerError(
                    "unavailable", "too many connections, try again", 5)))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        socketserver.ThreadingMixIn.process_request(self, request,
                                                    client_address)

    def process_request_thread(self, request, client_address):
        try:
            socketserver.ThreadingMixIn.process_request_thread(
                self, request, client_address)
        finally:
            self.slots.release()

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
                    srv = _TCPServer(family, (host, port), v6only, self.app,
                                     self.slots, cfg.timeout)
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
                                      {signal.SIGTERM, signal.SIGINT})
        try:
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

    def run(self, wake_fd=None, stop_asked=lambda: False):
        """Sweep every sweep_interval until stop() or stop_asked(). A byte
        on wake_fd (signal.set_wakeup_fd) ends a wait early."""
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

    def sweep(self):
        try:
            self.app.broker.sweep()
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


def serve(app):
    """Start, say what we are doing and what will not work, run until
    SIGTERM or SIGINT, stop cleanly."""
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
    try:
        b = app.broker   # open the lease store before taking requests
        bound = srv.start()
        names = ", ".join(s.name for s in cfg.enabled_services())
        log("info", "microbroker listening on %s; services: %s; leases in "
            "%s", ", ".join("[%s]:%d" % a if ":" in a[0] else "%s:%d" % a
                            for a in bound), names, cfg.lease_path)
        ok, reason = b.dataplane.status()
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
        if not got:
            srv.sweep()
        srv.run(r, lambda: bool(got))
        log("info", "signal %d: shutting down", got[0])
    finally:
        srv.stop()
        signal.set_wakeup_fd(old_fd)
        for s, h in old.items():
            signal.signal(s, h)
        os.close(r)
        os.close(w)
    log("info", "stopped")
