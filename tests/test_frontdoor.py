"""`serve`'s front door: request heads read by one thread, plain offers
answered there (before http.server is even imported), everything else
handed to http.server's handler with the bytes read so far."""

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import pytest

from frontdoors import ServeDoor, read_to_eof
from microbroker import frontdoor
from nsutil import inside

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """
config broker
	option dataplane 'none'
	option state_dir '%(state)s'
	option sweep_interval '3600'
	option source_connections '200'
	option max_connections '256'
	option request_rate '0'

config service 'v4'
	option family '4'
"""


@pytest.fixture
def door(tmp_path):
    path = tmp_path / "microbroker"
    path.write_text(CONFIG % {"state": tmp_path / "state"})
    with ServeDoor(str(path)) as d:
        yield d


def ask(door, data, timeout=10):
    s = socket.create_connection(("127.0.0.1", door.port), timeout=timeout)
    try:
        s.sendall(data)
        return read_to_eof(s)
    finally:
        s.close()


def test_plain_offer_line_and_headers():
    line = frontdoor.plain_offer_line
    assert line(b"GET /offer HTTP/1.1\r\n") == ("GET", "/offer")
    assert line(b"GET /?format=sh HTTP/1.0\r\n") == ("GET", "/?format=sh")
    for other in (b"POST /offer HTTP/1.1\r\n", b"HEAD /offer HTTP/1.1\r\n", b"GET /lease HTTP/1.1\r\n",
                  b"GET /offer HTTP/1.1\n", b"GET  /offer HTTP/1.1\r\n",
                  b"GET /offer HTTP/2.0\r\n", b"GET /of%66er HTTP/1.1\r\n",
                  b"GET http://x/offer HTTP/1.1\r\n",
                  b"GET /offer\x7f HTTP/1.1\r\n", b"GET /offer/ HTTP/1.1\r\n"):
        assert line(other) is None, other
    hdr = frontdoor.plain_headers
    assert hdr([b"Host: [fc00::1]:8053", b"X-A: 1", b"x-a:  2 "]) == \
        {"host": "[fc00::1]:8053", "x-a": "1, 2"}
    for other in ([b"Content-Length: 0"], [b"Transfer-Encoding: chunked"],
                  [b"Expect: 100-continue"], [b" folded"], [b"No colon"],
                  [b"Bad Name: x"], [b"X: \xff"], [b"X: a\nb"], [b": x"]):
        assert hdr(other) is None, other


def test_fast_and_handler_answer_an_offer_byte_for_byte_alike(door):
    """The same offer through the fast path and (a Content-Length of 0
    sends it there) through http.server's handler."""
    for head in (b"GET /offer HTTP/1.1\r\nHost: x\r\n",
                 b"GET /offer?format=sh HTTP/1.0\r\n", b"GET / HTTP/1.1\r\n"):
        fast = ask(door, head + b"\r\n")
        slow = ask(door, head + b"Content-Length: 0\r\n\r\n")
        assert fast.startswith(b"HTTP/1.1 200 OK\r\n"), fast[:80]
        assert fast == slow


def test_a_trickled_head_holds_no_thread(door):
    """Clients that send half a head and wait cost no thread each, and
    an offer is answered beside them, and so is a request for the handler;
    a malformed request line goes there at once and is answered."""
    before = len(os.listdir("/proc/self/task"))
    waiting = []
    try:
        for i in range(60):
            s = socket.create_connection(("127.0.0.1", door.port), timeout=10)
            s.sendall(b"POST /lease HTTP/1.1\r\nX-Slow: " if i % 2 else
                      b"GET /off")
            waiting.append(s)
        raw = ask(door, b"GET /offer HTTP/1.1\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw[:80]
        raw = ask(door, b"POST /renew HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 400 "), raw[:80]
        s = socket.create_connection(("127.0.0.1", door.port), timeout=10)
        waiting.append(s)
        s.sendall(b"GET /offer HTTP/9\r\nX-Slow: ")     # and nothing more
        raw = s.recv(65536)
        assert raw.startswith(b"HTTP/1.1 400 "), raw[:80]
        started = len(os.listdir("/proc/self/task")) - before
        assert started <= 2, started
    finally:
        for s in waiting:
            s.close()


def test_heads_are_parsed_a_few_at_a_time(door, monkeypatch):
    """A burst of complete lease heads: at most PARSE_AT_ONCE of them in
    http.server's parsing at any moment, and every one answered."""
    from microbroker import server
    inside, most = [0], [0]
    lock = threading.Lock()
    real = server._Handler.parse_request

    def parse(self):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.02)
        try:
            return real(self)
        finally:
            with lock:
                inside[0] -= 1
    monkeypatch.setattr(server._Handler, "parse_request", parse)
    answers = []

    def one():
        answers.append(ask(door, b"POST /renew HTTP/1.1\r\n"
                           b"Content-Length: 0\r\n\r\n"))
    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 20
    assert all(a.startswith(b"HTTP/1.1 400 ") for a in answers)
    assert 1 < most[0] <= server.PARSE_AT_ONCE, most[0]


def test_an_answer_larger_than_the_socket_takes(door, monkeypatch):
    """What send() does not take at once goes out as the client reads."""
    real = frontdoor.encode_answer
    pad = b"x" * (8 << 20)
    monkeypatch.setattr(frontdoor, "encode_answer",
                        lambda a: real((a[0], a[1], a[2] + pad)))
    s = socket.create_connection(("127.0.0.1", door.port), timeout=10)
    try:
        s.sendall(b"GET /offer HTTP/1.1\r\n\r\n")
        time.sleep(0.2)     # the door meets a full buffer, not a reader
        raw = read_to_eof(s)
    finally:
        s.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    size = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert len(body) == size and body.endswith(pad)


def test_offers_are_answered_before_http_server_is_imported(tmp_path):
    """What lets `serve` answer offers at once while it imports the rest."""
    path = tmp_path / "microbroker"
    path.write_text(CONFIG % {"state": tmp_path / "state"})
    code = textwrap.dedent("""
        import socket, sys
        sys.path.insert(0, %r)
        from microbroker import config, service, web
        srv = service.Server(web.App(config.load(%r)), ["127.0.0.1:0"])
        (host, port), = srv.start()
        for head in (b"GET /offer HTTP/1.1\\r\\n\\r\\n", b"GET / HTTP/1.0\\r\\n\\r\\n"):
            s = socket.create_connection((host, port), timeout=10)
            s.sendall(head)
            raw = b""
            while True:
                c = s.recv(65536)
                if not c:
                    break
                raw += c
            assert raw.startswith(b"HTTP/1.1 200 OK"), raw[:80]
        print(sorted(m for m in ("http.server", "http.client", "email",
                                 "microbroker.server") if m in sys.modules))
        srv.stop()
    """) % (ROOT, str(path))
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# What serve must not load before it listens: the stdlib wrappers whose
# enums and collections were a third of its start under emulation, the
# HTTP stack, and the lease store (offers read only its counts file).
NOT_BEFORE_LISTENING = ("threading", "socket", "selectors", "signal", "enum",
                        "collections", "functools", "http.server", "email",
                        "json", "re", "microbroker.leases.store", "_gdbm",
                        "dbm", "microbroker.server")


def test_serve_listens_before_loading_the_heavy_modules_and_the_store(tmp_path, netns):
    """The real `serve`, as init.d starts it, under -X importtime (each
    import written to stderr as it happens): nothing of
    NOT_BEFORE_LISTENING is imported before its "listening" line, the
    kernel data plane's modules are (it knows the kernel's status before
    the first offer), the store is opened after it, and an offer is
    answered."""
    path = tmp_path / "microbroker"
    state = tmp_path / "state"
    path.write_text((CONFIG % {"state": state}).replace("'none'", "'kernel'"))
    boot = ("import sys; sys.path.insert(0, %r); "
            "from microbroker.__main__ import main; sys.exit(main())" % ROOT)
    argv = [sys.executable, "-X", "importtime", "-u", "-I", "-S", "-c", boot,
            "-c", str(path), "-l", "127.0.0.1:0", "serve"]
    ns = None
    if os.geteuid() == 0:
        # Where the kernel can build tunnels, its start-up reconcile makes
        # the service's bridge and filter tables: not in this host's netns.
        ns = netns.add("imp")
        argv = ["ip", "netns", "exec", ns] + argv
    p = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        before, port = [], None
        for line in p.stderr:
            if "microbroker listening on" in line:
                port = int(line.split("listening on 127.0.0.1:")[1].split(";")[0])
                break
            if line.startswith("import time:"):
                before.append(line.rsplit("|", 1)[1].strip())
        assert port, "serve never said it listens"
        with inside(ns) if ns else contextlib.nullcontext():
            raw = ask(SimpleNamespace(port=port), b"GET /offer HTTP/1.1\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200 OK"), raw[:80]
        assert "microbroker.dataplane" in before and "microbroker.netlink" in before
        assert [m for m in NOT_BEFORE_LISTENING if m in before] == []
        # The store, opened once it listens, makes its counts file.
        deadline = time.monotonic() + 30
        while not (state / "leases.counts").exists():
            assert time.monotonic() < deadline, "no counts file: the store never opened"
            time.sleep(0.05)
    finally:
        p.terminate()
        p.communicate(timeout=30)


def test_a_trickled_head_http_server_takes_holds_no_parsing_turn(tmp_path):
    """A request line the fast path does not read (bare LF, a byte past
    ASCII, an odd method) but http.server's handler takes: its head is
    trickled to the front door, not to a thread holding one of the
    PARSE_AT_ONCE turns, so lease requests beside it are answered."""
    from microbroker import server
    path = tmp_path / "microbroker"
    path.write_text((CONFIG % {"state": tmp_path / "state"}).replace(
        "config broker\n", "config broker\n\toption timeout '60'\n"))
    with ServeDoor(str(path)) as door:
        waiting = []
        try:
            for line in (b"POST /lease HTTP/1.1\n", b"GET /\xe9 HTTP/1.1\r\n",
                         b"G\x01T /lease HTTP/1.1\r\n") * server.PARSE_AT_ONCE:
                s = socket.create_connection(("127.0.0.1", door.port),
                                             timeout=10)
                s.sendall(line + b"X-Slow: ")
                waiting.append(s)
            raw = ask(door, b"POST /renew HTTP/1.1\r\n"
                      b"Content-Length: 0\r\n\r\n", timeout=20)
            assert raw.startswith(b"HTTP/1.1 400 "), raw[:80]
            for s in waiting:      # still read by the front door
                s.setblocking(False)
                with pytest.raises(BlockingIOError):
                    s.recv(1)
        finally:
            for s in waiting:
                s.close()


def test_more_header_lines_than_http_server_takes_are_its_to_refuse(door):
    """http.client reads at most 100 lines after the request line, the
    blank one included (its _MAXHEADERS): an offer with more is refused
    alike on both paths, not answered 200 by the fast one alone."""
    head = b"GET /offer HTTP/1.1\r\n" + b"X: 1\r\n" * 101
    fast = ask(door, head + b"\r\n")
    slow = ask(door, head + b"Content-Length: 0\r\n\r\n")
    assert slow.startswith(b"HTTP/1.1 413 "), slow[:80]
    assert fast == slow
    head = b"GET /offer HTTP/1.1\r\n" + b"X: 1\r\n" * 99
    assert ask(door, head + b"\r\n").startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("error", [RuntimeError, MemoryError])
def test_no_thread_for_a_hand_off_is_refused_and_holds_nothing(door,
                                                                monkeypatch,
                                                                error):
    """start_new_thread failing (RuntimeError, or MemoryError when even
    the thread's state cannot be had): a 503, and the connection's slot
    and source count are given back."""
    def no_thread(*args):
        raise error("can't start new thread")
    monkeypatch.setattr(frontdoor._thread, "start_new_thread", no_thread)
    raw = ask(door, b"POST /renew HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 503 "), raw[:80]
    srv = door.server
    assert srv.slots.free == door.config.max_connections
    assert srv.sources.open == {}


def test_a_kept_offer_follows_every_change(door):
    """serve keeps offer answers by what they are made of: a lease and
    its release each show in the next offer, and an answer kept for one
    format is not given for the other."""
    import json

    def used():
        raw = ask(door, b"GET /offer HTTP/1.1\r\n\r\n")
        body = json.loads(raw.partition(b"\r\n\r\n")[2])
        return body["leases"]["used"], body["services"]["v4"]["used"]

    def post(path, data):
        raw = ask(door, b"POST %s HTTP/1.1\r\nContent-Type: application/"
                  b"x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%s"
                  % (path, len(data), data))
        assert raw.startswith(b"HTTP/1.1 200 "), raw[:300]
        return json.loads(raw.partition(b"\r\n\r\n")[2])
    assert used() == used() == (0, 0)
    lease = post(b"/lease", b"service=v4")
    assert used() == (1, 1)
    sh = ask(door, b"GET /offer?format=sh HTTP/1.1\r\n\r\n")
    assert b"\nSVC_v4_USED='1'\n" in sh, sh[-400:]
    post(b"/release", b"lease_id=%s&secret=%s" % (
        lease["lease_id"].encode(), lease["secret"].encode()))
    assert used() == (0, 0)


def test_a_server_that_cannot_bind_leaves_no_descriptor_open(tmp_path):
    """serve's start failing at bind (the port taken) and its stop: the
    refuser's epoll and wake-up pipe, made with the server, go too."""
    from microbroker import config, service, web
    path = tmp_path / "microbroker"
    path.write_text(CONFIG % {"state": tmp_path / "state"})
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        before = set(os.listdir("/proc/self/fd"))
        srv = service.Server(web.App(config.load(str(path))),
                             ["127.0.0.1:%d" % busy.getsockname()[1]])
        with pytest.raises(OSError):
            srv.start()
        srv.stop()
        srv.stop()           # a second stop closes nothing twice
        assert set(os.listdir("/proc/self/fd")) == before
    finally:
        busy.close()
