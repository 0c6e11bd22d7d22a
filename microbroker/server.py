"""The requests of `microbroker serve` that are more than a plain
offer, read by http.server: a BaseHTTPRequestHandler subclass, given the
connection and the head bytes read so far by frontdoor.py. http.server
reads the request line and the headers; every decision about the
request, errors included, is web.App's, shared with the CGI entry, so
both doors answer byte for byte the same. http.server never answers on
its own: its HTML error pages (send_error), its `Server:`/`Date:`
headers and its stderr log lines are all replaced, and its own
request-line dispatch (do_GET and friends, 501 for other methods) is not
used: the method is App's to judge.

What http.server does not do by itself, and this module adds: one
deadline for the whole request (a client trickling a byte at a time is
dropped), a byte limit on the request head as a whole, strict header
lines (no folding), a body over max_body refused without being read.

One request per connection (what wget and uclient-fetch do).
"""

import http.client
import http.server
import io
import socket
import threading
import time

from microbroker.broker import BrokerError, log
from microbroker.frontdoor import (encode_answer, join_header,
                                   lax_request_line)
from microbroker.limits import ANSWER_GRACE
from microbroker.web import answer_format, show

DRAIN_LIMIT = 1 << 20       # bytes read after refusing a body
DRAIN_TIME = 1.0            # seconds for that, within the request's deadline
# Heads parsed at once. The head is in memory already (the front door
# reads it), so parsing is all interpreter: a burst of a hundred parsing
# together would only take turns at the interpreter lock, and the front
# door's turns with them.
PARSE_AT_ONCE = 2
_parsing = threading.BoundedSemaphore(PARSE_AT_ONCE)


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


class _SocketInput(io.RawIOBase):
    """The socket as a raw stream with one deadline for the whole
    request, checked before every recv: a client trickling a byte at a
    time cannot hold a connection slot for long. `head`: the bytes the
    front door read already, served first."""

    def __init__(self, sock, deadline, head=b""):
        io.RawIOBase.__init__(self)
        self.sock = sock
        self.deadline = deadline
        self.pending = memoryview(head)

    def readable(self):
        return True

    def readinto(self, b):
        if self.pending:
            n = min(len(b), len(self.pending))
            b[:n] = self.pending[:n]
            self.pending = self.pending[n:]
            return n
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("request took too long")
        self.sock.settimeout(left)
        return self.sock.recv_into(b)


class _SocketOutput(io.RawIOBase):
    """The handler's wfile: each write sent whole (socketserver's
    _SocketWriter)."""

    def __init__(self, sock):
        io.RawIOBase.__init__(self)
        self.sock = sock

    def writable(self):
        return True

    def write(self, b):
        self.sock.sendall(b)
        with memoryview(b) as view:
            return view.nbytes


class _RequestInput(io.BufferedReader):
    """The handler's rfile. While the request head is read (`head` is a
    list) every line is kept for checking and counted against one budget
    for the whole head; past it, LineTooLong, which http.server answers
    through send_error (-> 413 too_large)."""

    def __init__(self, sock, deadline, head, head_limit):
        io.BufferedReader.__init__(self, _SocketInput(sock, deadline, head))
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
    web.App. Made by answer(), which sets `app`, `head` (bytes already
    read), `deadline` and `head_limit` first."""

    protocol_version = "HTTP/1.1"   # our status lines, 100 Continue included
    server_version = "microbroker"  # never sent: we write no Server header
    sys_version = ""

    def __init__(self, app, sock, addr, head, deadline, head_limit):
        self.app, self.head = app, head
        self.deadline, self.head_limit = deadline, head_limit
        http.server.BaseHTTPRequestHandler.__init__(self, sock, addr, None)

    def setup(self):
        # Not StreamRequestHandler's: it would makefile() the socket, which
        # the front door's _socket.socket has no method for.
        self.connection = self.request
        self.rfile = _RequestInput(self.connection, self.deadline, self.head,
                                   self.head_limit)
        self.wfile = _SocketOutput(self.connection)
        self.fmt = "json"
        self.request_version = "HTTP/1.1"   # for answers before parse_request

    def handle(self):
        self.close_connection = True
        self.parsing = False
        try:
            _parsing.acquire()
            self.parsing = True
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
        finally:
            self._parsed()

    def _parsed(self):
        """The head is judged: from here on, reading a body or waiting for
        the lease file holds no parsing turn."""
        if self.parsing:
            self.parsing = False
            _parsing.release()

    def handle_one_request(self):
        app = self.app
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
        got = lax_request_line(line)
        if got is None:
            return self._error(BrokerError("bad_request", "malformed request "
                                           "line"))
        method, target = got
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
            join_header(headers, name, value)
        self._parsed()
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
                            % self.app.config.max_header)
        else:
            e = BrokerError("bad_request", "malformed request")
        self._error(e, self.fmt)

    def _error(self, e, fmt="json"):
        self._write(self.app.error(e, fmt))

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


def answer(app, sock, addr, head, deadline, head_limit):
    """Read and answer one request on sock, whose first bytes (`head`)
    were read already; the caller closes sock."""
    h = _Handler(app, sock, addr, head, deadline, head_limit)
    try:
        h.connection.shutdown(socket.SHUT_WR)
    except OSError:
        pass
