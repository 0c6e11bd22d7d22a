"""Hostile clients against both front doors, on loopback only, bounded.

Fuzz: thousands of generated requests (tests/hostile.py); every one gets
a valid HTTP answer, never a 500, never none. Slow and flooding clients:
the ones past the per-source caps are refused at once, the rest are cut
at their deadline, and a good client from another address is answered
throughout (its latency is measured by bench/hostile.py)."""

import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import hostile
import owrt
from frontdoors import ServeDoor, UhttpdDoor, read_to_eof
from microbroker import cgi as mbcgi

CONFIG = """
config broker
	option dataplane 'none'
	option state_dir '%(state)s'
	option max_leases '20'
	option max_per_client '2'
	option max_body '512'
	option max_header '2048'
	option sweep_interval '3600'
	option timeout '%(timeout)s'
%(extra)s
config service 'v4'
	option family '4'
	option encap 'udp'
	option udp_port '20000'

config service 'small'
	option family '4'
	option capacity '1'
	list token 'secret-token'
"""

N_SERVE = 3000
N_CGI = 3000
N_UHTTPD = 150


def config(tmp_path, timeout=2, **opts):
    extra = "".join("\toption %s '%s'\n" % kv for kv in opts.items())
    path = tmp_path / "microbroker"
    path.write_text(CONFIG % {"state": tmp_path / "state", "extra": extra,
                              "timeout": timeout})
    return str(path)


def send(port, data, source="127.0.0.1", host="127.0.0.1", timeout=15,
         shut=True):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(timeout)
    try:
        if source:
            s.bind((source, 0))
        s.connect((host, port))
        try:
            s.sendall(data)
            if shut:     # serve answers a request cut short by EOF
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass    # answered and closed before all of it was sent
        return read_to_eof(s)
    finally:
        s.close()


def fuzz(port, reqs, host="127.0.0.1", workers=4, shut=True,
         server_own=False):
    """server_own: the HTTP server in front (uhttpd) may answer some
    requests itself (a redirect for a path with "..", 4xx, 501 for a
    method it does not know, in its own format): those need only a valid
    status line and no 500; all of ours (Cache-Control: no-store) are
    checked."""
    def one(req):
        raw = send(port, req.raw(), None, host, shut=shut)
        while raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
            raw = raw[25:]
        if server_own and b"\r\nCache-Control: no-store\r\n" not in \
                raw.partition(b"\r\n\r\n")[0] + b"\r\n":
            status = int(raw.split(b" ", 2)[1])
            assert raw[:9] in (b"HTTP/1.1 ", b"HTTP/1.0 ") and \
                300 <= status < 600 and status != 500, \
                (req.raw()[:300], raw[:300])
            return status
        try:
            # a HEAD has no body in its answer, once its request line
            # could be read as one
            head = req.method == "HEAD" and req.version in (
                "HTTP/1.0", "HTTP/1.1") and req.target()[:1] == "/" and \
                " " not in req.target()
            return hostile.check_http(raw, head=head)[0]
        except AssertionError as e:
            raise AssertionError("%r\n-> %r\n%s" % (req.raw()[:300],
                                                    raw[:300], e))
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(one, reqs))


def test_fuzz_serve(tmp_path):
    with ServeDoor(config(tmp_path, request_rate=0)) as door:
        statuses = fuzz(door.port, hostile.requests(1, N_SERVE))
    assert len(statuses) == N_SERVE
    # the corpus reaches past the parsers, not only their refusals
    seen = set(statuses)
    assert {200, 400, 404, 405, 413} <= seen, seen


def test_fuzz_cgi(tmp_path):
    """The CGI entry in-process (its main, as the script runs it) with an
    environment for every generated request, as uhttpd or a laxer CGI
    server would hand it."""
    path = config(tmp_path)
    seen = set()
    n = 0
    for req in hostile.requests(2, N_CGI):
        env, body = req.cgi_env(strict=False)
        env["MICROBROKER_CONFIG"] = path
        out = io.BytesIO()
        assert mbcgi.main(env, io.BytesIO(body), out) == 0
        try:
            seen.add(hostile.check_http(out.getvalue(), cgi=True)[0])
        except AssertionError as e:
            raise AssertionError("%r %r\n-> %r\n%s" % (env, body[:200],
                                                       out.getvalue()[:300],
                                                       e))
        n += 1
    assert {200, 400, 404, 405, 413} <= seen, seen


@owrt.need("uhttpd")
def test_fuzz_cgi_under_uhttpd(tmp_path):
    """Well-framed requests with hostile contents, through real uhttpd: its
    own answers (for what it refuses) and ours must all be valid."""
    with UhttpdDoor(tmp_path, config(tmp_path)) as door:
        reqs = [r for r in hostile.requests(3, N_UHTTPD * 3)
                if r.cgi_env() is not None][:N_UHTTPD]
        for r in reqs:
            r.path = door.prefix + r.path
            # uhttpd takes a client's EOF for the end of the connection
            r.headers.append(("Connection", "close"))
        statuses = fuzz(door.port, reqs, workers=2, shut=False,
                        server_own=True)
    assert 200 in statuses and 400 in statuses


# ---------------------------------------------------------------- slow, flood

BAD = "127.0.0.1"
GOOD = "127.0.0.2"


class Slow(threading.Thread):
    """A slowloris connection: its request head a byte every `pace`
    seconds. Records how it ended: 'refused' (an answer at once), 'cut'
    (closed by the server), 'done' (it finished sending)."""

    def __init__(self, port, pace, data, source=BAD):
        threading.Thread.__init__(self, daemon=True)
        self.port, self.pace, self.data, self.source = port, pace, data, \
            source
        self.result = None
        self.answer = b""
        self.lasted = None

    def _last_words(self, s):
        """The server closed while we were sending: what it said first."""
        try:
            s.settimeout(1)
            while True:
                got = s.recv(65536)
                if not got:
                    break
                self.answer += got
        except OSError:
            pass
        self.result = "refused" if b" 429 " in self.answer[:20] else "cut"

    def run(self):
        s = socket.socket()
        s.bind((self.source, 0))
        s.settimeout(10)
        start = time.monotonic()
        try:
            s.connect(("127.0.0.1", self.port))
            s.settimeout(self.pace)
            for i in range(len(self.data)):
                try:
                    s.send(self.data[i:i + 1])
                except OSError:
                    self._last_words(s)
                    break
                try:
                    got = s.recv(65536)
                    if not got:
                        self.result = "cut" if not self.answer else \
                            self.result
                        break
                    self.answer += got
                    self.result = "refused" if b" 429 " in self.answer[:20] \
                        else "answered"
                except socket.timeout:
                    pass
                except OSError:
                    self.result = self.result or "cut"
                    break
            else:
                self.result = "done"
        finally:
            self.lasted = time.monotonic() - start
            s.close()


SLOW_HEAD = b"GET /offer HTTP/1.1\r\nX-Slow: " + b"a" * 400 + b"\r\n\r\n"
DRAIN = (b"POST /lease HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n" +
         b"x" * 400)


def offer_latencies(port, seconds, source=GOOD, pace=0.0):
    """A good client asking for offers, one every `pace` seconds at most:
    [(status, seconds)]."""
    lat = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.monotonic()
        raw = send(port, b"GET /offer HTTP/1.1\r\n\r\n", source)
        st = hostile.check_http(raw)[0]
        lat.append((st, time.monotonic() - t))
        time.sleep(max(0.0, t + pace - time.monotonic()))
    return lat


def test_slowloris_and_drains_from_one_address(tmp_path):
    """70 slow connections and 64 trickling drains from one address: those
    past source_connections are refused at once with 429, the others are
    cut at the request deadline (drains at DRAIN_TIME); a good client on
    another address gets every offer answered 200 meanwhile."""
    timeout = 2
    with ServeDoor(config(tmp_path, timeout=timeout, request_rate=0,
                          source_connections=8)) as door:
        slow = [Slow(door.port, 0.25, SLOW_HEAD) for _ in range(70)]
        drains = [Slow(door.port, 0.25, DRAIN) for _ in range(64)]
        for t in slow + drains:
            t.start()
        lat = offer_latencies(door.port, timeout + 1)
        for t in slow + drains:
            t.join(30)
            assert not t.is_alive()
    assert lat and all(st == 200 for st, _ in lat)
    results = [t.result for t in slow + drains]
    # at most 8 at a time from BAD ever got in
    assert results.count("refused") >= 70 + 64 - 8 * 4, results
    assert "done" not in results
    held = [t for t in slow if t.result == "cut"]
    assert held and all(t.lasted < timeout + 2 for t in held)
    for t in slow + drains:
        if t.result == "refused":
            assert b"too many connections" in t.answer


def test_flood_from_one_address(tmp_path):
    """A flood from one address meets 429 with Retry-After once its burst is
    spent; a good client on another address is not limited by it."""
    with ServeDoor(config(tmp_path, request_rate=5,
                          request_burst=10)) as door:
        stop = threading.Event()
        seen = []

        def flood():
            while not stop.is_set():
                seen.append(hostile.check_http(send(
                    door.port, b"GET /offer HTTP/1.1\r\n\r\n", BAD))[0])
        threads = [threading.Thread(target=flood) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            lat = offer_latencies(door.port, 1.5, pace=0.25)
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert seen.count(429) > len(seen) // 2
    # 10 at once, then 5 a second, over about 1.5 s
    assert seen.count(200) <= 10 + 5 * 3
    assert all(st == 200 for st, _ in lat)


@pytest.mark.parametrize("pace", [0.1])
def test_trickled_body_is_cut_at_the_deadline(tmp_path, pace):
    body = b"service=v4&" + b"a" * 300
    data = (b"POST /lease HTTP/1.1\r\nContent-Type: application/x-www-form-"
            b"urlencoded\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    with ServeDoor(config(tmp_path, timeout=1, request_rate=0)) as door:
        t = Slow(door.port, pace, data, GOOD)
        t.start()
        t.join(30)
    assert t.result == "cut" and t.lasted < 1 + 2
