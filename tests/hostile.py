"""Generated hostile requests and a strict reader of answers, shared by
tests/test_hostile.py and bench/hostile.py.

    requests(seed, n)  -> [Req]      reproducible: the same seed, the same list
    Req.raw()          -> bytes      the request as `serve` gets it
    Req.cgi_env(...)   -> (env, stdin)  as uhttpd would hand it to a CGI
                                     (None where uhttpd refuses it itself)
    check_http(raw)    -> (status, headers, body), or AssertionError saying
                                     what is wrong with the answer
"""

import json
import random

FIELDS = ["format", "service", "kind", "tunnel_id", "session_id",
          "udp_sport", "token", "lease_id", "secret", "x", "", "format"]
VALUES = ["", "sh", "json", "xml", "v4", "small", "l2tpv3", "ip6tnl", "0",
          "1", "7", "65535", "65536", "4294967295", "4294967296",
          "99999999999999999999", "%C2%B2", "%D9%A7", "%EF%BC%91", "-1",
          "+1", " 1", "1 ", "1e3", "0x10", "1.5", "%00", "%0a", "%ff",
          "%fe%ff", "%", "%%", "%4", "%zz", "a" * 300, "'", "\\", "%27",
          "a%27b", "0" * 16, "f" * 16, "F" * 16, "ab" * 16, "ab" * 17,
          "+", "&", "=", "==", "%3D", "\u00e9".encode().decode("latin-1")]
PATHS = ["/", "/offer", "/lease", "/renew", "/release", "/status", "",
         "/offer/", "//offer", "/%6fffer", "/%zz", "/%C2%B2", "/%ff",
         "/%00", "/..", "/offer%00", "/lease?", "/\u00e9", "/a" * 200,
         "/%2e%2e/etc", "/status;x", "/metrics", "/RELEASE"]
METHODS = ["GET", "POST", "POST", "POST", "PUT", "DELETE", "HEAD",
           "OPTIONS", "post", "G\x01T", "X" * 100, "CONNECT", "TRACE"]
CTYPES = ["application/x-www-form-urlencoded",
          "application/x-www-form-urlencoded; charset=utf-8",
          "application/json", "APPLICATION/JSON ; x=y", "text/plain",
          "multipart/form-data; boundary=x", "", None, "\u00ff"]


class Req:
    def __init__(self, method, path, query, headers, body, framing,
                 version="HTTP/1.1"):
        self.method, self.path, self.query = method, path, query
        self.headers = headers          # [(name, value)] as sent
        self.body = body                # bytes as meant
        self.framing = framing          # length | short | long | chunked |
        self.version = version          # badchunk | both | badlen:X | none

    def target(self):
        return self.path + ("?" + self.query if self.query is not None
                            else "")

    def raw(self):
        head = ["%s %s %s" % (self.method, self.target(), self.version)]
        head += ["%s: %s" % h for h in self.headers]
        body = self.body
        f = self.framing
        if f == "length":
            head.append("Content-Length: %d" % len(body))
        elif f == "short":           # the body ends before its length
            head.append("Content-Length: %d" % (len(body) + 7))
        elif f == "long":            # more bytes than the length says
            head.append("Content-Length: %d" % max(len(body) - 3, 0))
        elif f.startswith("badlen:"):
            head.append("Content-Length: " + f[7:])
        elif f in ("chunked", "badchunk", "both"):
            head.append("Transfer-Encoding: chunked")
            if f == "both":
                head.append("Content-Length: %d" % len(body))
            body = chunk(body, bad=f == "badchunk")
        return ("\r\n".join(head) + "\r\n\r\n").encode(
            "latin-1", "replace") + body

    def cgi_env(self, source="127.0.0.1", local="127.0.0.1", strict=True):
        """What uhttpd hands a CGI for this request (its proc.c: CGI/1.1
        variables, CONTENT_LENGTH only as the client sent it, a chunked
        body de-chunked on stdin), or None for what uhttpd answers itself
        (malformed framing, bad request line). strict=False: an
        environment for every request, as a laxer CGI server might pass
        it (the Content-Length as sent, a body cut short, an undecodable
        path as it came)."""
        lax = not strict
        f = self.framing
        if strict and (f in ("badchunk", "both", "short") or
                       f.startswith("badlen:")):
            return None
        if strict and (self.version not in ("HTTP/1.0", "HTTP/1.1") or
                       self.method not in ("GET", "POST", "PUT", "DELETE",
                                           "HEAD", "OPTIONS")):
            return None
        path = unquote(self.path)
        if path is None:
            if strict:
                return None
            path = self.path
        env = {"GATEWAY_INTERFACE": "CGI/1.1", "REQUEST_METHOD": self.method,
               "PATH_INFO": path, "QUERY_STRING": self.query or "",
               "REMOTE_ADDR": source, "SERVER_ADDR": local,
               "SERVER_PROTOCOL": self.version}
        for k, v in self.headers:
            lk = k.lower()
            if lk == "content-type":
                env["CONTENT_TYPE"] = v
            elif lk in ("host", "user-agent", "x-http-method-override") or \
                    lax:
                env["HTTP_" + k.upper().replace("-", "_")] = v
        body = self.body
        if f in ("length", "both"):
            env["CONTENT_LENGTH"] = str(len(body))
        elif f == "long":
            n = max(len(body) - 3, 0)
            env["CONTENT_LENGTH"] = str(n)
            body = body[:n] if strict else body
        elif f == "short":
            env["CONTENT_LENGTH"] = str(len(body) + 7)
        elif f.startswith("badlen:"):
            env["CONTENT_LENGTH"] = f[7:]
        elif f == "badchunk":
            body = chunk(body, bad=True)
        elif f == "none":
            body = b""
        if lax:    # a real environment cannot hold NUL
            env = {k.replace("\0", ""): v.replace("\0", "")
                   for k, v in env.items()}
        return env, body


def unquote(path):
    """%-decoding as uhttpd does for PATH_INFO; None where it would 400."""
    out = bytearray()
    b = path.encode("latin-1", "replace")
    i = 0
    while i < len(b):
        if b[i:i + 1] == b"%":
            h = b[i + 1:i + 3]
            try:
                if len(h) != 2:
                    raise ValueError
                out.append(int(h, 16))
            except ValueError:
                return None
            i += 3
        else:
            out.append(b[i])
            i += 1
    if 0 in out:
        return None
    return out.decode("utf-8", "surrogateescape")


def chunk(body, bad=False, rnd=random):
    out, i = [], 0
    while i < len(body):
        n = rnd.randint(1, len(body) - i)
        out.append(b"%x\r\n%s\r\n" % (n, body[i:i + n]))
        i += n
    s = b"".join(out) + b"0\r\n\r\n"
    if bad:
        how = rnd.randrange(6)
        if how == 0:
            s = b"zz\r\n" + s
        elif how == 1:
            s = s[:-5]                       # no last chunk
        elif how == 2:
            s = b"ffffffff\r\n" + s
        elif how == 3:
            s = s.replace(b"\r\n", b"\r", 1)
        elif how == 4:
            s = b"1" * 3000 + b"\r\n"
        else:
            s = b"3\r\nabcdef\r\n0\r\n\r\n"
    return s


def form(rnd, nmax=5):
    parts = []
    for _ in range(rnd.randint(0, nmax)):
        k = rnd.choice(FIELDS)
        v = rnd.choice(VALUES)
        if rnd.random() < 0.1:
            v = "".join("%%%02x" % rnd.randrange(256)
                        for _ in range(rnd.randint(1, 8)))
        parts.append(k + ("=" + v if rnd.random() < 0.95 else ""))
    return "&".join(parts)


def json_body(rnd):
    how = rnd.randrange(10)
    if how == 0:
        d = rnd.choice([10, 1000, 5000, 20000])
        return (b"[" * d + b"]" * d) if rnd.random() < 0.5 else \
            (b'{"a":' * d + b"1" + b"}" * d)
    if how == 1:
        return b'{"tunnel_id": ' + b"9" * rnd.choice([20, 5000]) + b"}"
    if how == 2:
        return rnd.choice([b"null", b"[]", b'"x"', b"1", b"{", b"{}}",
                           b'{"a":NaN}', b'{"a":1e999}', b"\xff\xfe",
                           b'{"service":"v4","service":"v4"}',
                           b'{"\\ud800":1}', b'{"service":"\\u0000"}'])
    obj = {}
    for _ in range(rnd.randint(0, 4)):
        k = rnd.choice(FIELDS)
        v = rnd.choice([rnd.choice(VALUES), rnd.randint(-5, 2 ** 33),
                        None, True, 1.5, [1], {"a": 1}, "\u0663"])
        obj[k] = v
    return json.dumps(obj).encode()


def requests(seed, n):
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        method = rnd.choice(METHODS)
        path = rnd.choice(PATHS)
        query = form(rnd) if rnd.random() < 0.7 else None
        if query is not None and rnd.random() < 0.3:
            query = "format=sh&" + query
        headers = [("Host", "broker")]
        ctype = rnd.choice(CTYPES)
        if ctype is not None:
            headers.append(("Content-Type", ctype))
        r = rnd.random()
        if r < 0.05:
            headers.append(("Expect", "100-continue"))
        elif r < 0.1:
            headers.append((rnd.choice(["X-Pad", "X", "A-B"]),
                            "p" * rnd.choice([10, 1000, 9000])))
        elif r < 0.12:
            headers.append(("Transfer-Encoding", rnd.choice(
                ["gzip", "chunked, gzip", "identity", "CHUNKED"])))
        b = rnd.random()
        if b < 0.45:
            body = form(rnd).encode("latin-1", "replace")
        elif b < 0.7:
            body = json_body(rnd)
        elif b < 0.8:
            body = bytes(rnd.randrange(256)
                         for _ in range(rnd.randint(0, 600)))
        else:
            body = b""
        framing = rnd.choice(["length"] * 4 + ["chunked"] * 3 + [
            "none", "short", "long", "badchunk", "both",
            "badlen:" + rnd.choice(["\u00b2", "-1", "1 2", "0x10", "+5",
                                    "99999999999999999", "", "\u0667",
                                    "1" * 30, "5, 5"])])
        version = rnd.choice(["HTTP/1.1"] * 12 + ["HTTP/1.0", "HTTP/2.0",
                                                  "HTTP/1.1 x", "http/1.1"])
        req = Req(method, path, query, headers, body, framing, version)
        if rnd.random() < 0.03:
            req.headers.append(("Bad Header", "x"))
        if rnd.random() < 0.02:
            req.headers.append((" folded", "x"))
        out.append(req)
    return out


def check_http(raw, cgi=False, head=False):
    """One answer, strictly: status line (or CGI Status header), headers,
    Content-Length equal to the body (for HEAD: no body), never a 500, a
    body in the format its Content-Type says. Returns (status, headers,
    body)."""
    assert raw, "no answer"
    while raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
        raw = raw[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
    top, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, "answer head never ends: %r" % raw[:200]
    lines = top.decode("latin-1").split("\r\n")
    headers = {}
    if cgi:
        status = None
    else:
        first = lines.pop(0).split(" ", 2)
        # (uhttpd answers an HTTP/1.0 request in kind; serve always 1.1)
        assert first[0] in ("HTTP/1.1", "HTTP/1.0") and len(first) == 3, \
            lines
        status = int(first[1])
    for line in lines:
        k, colon, v = line.partition(": ")
        assert colon and k, "bad header line %r" % line
        headers[k.lower()] = v
        if cgi and k == "Status":
            status = int(v.split(" ")[0])
    assert status is not None and 100 <= status <= 599, raw[:200]
    assert status != 500, raw[:300]
    if head:
        assert body == b"", raw
        return status, headers, body
    assert int(headers["content-length"]) == len(body), raw[:200]
    ctype = headers.get("content-type", "")
    if ctype.startswith("application/json"):
        obj = json.loads(body)
        if status != 200:
            assert obj["error"]["code"] and obj["error"]["message"], obj
            assert obj["error"]["code"] != "internal", obj
    elif "version=0.0.4" in ctype:
        # GET /metrics from an allowed address: Prometheus text
        assert status == 200 and body.startswith(b"# HELP "), raw[:300]
    else:
        assert status == 200 and ctype.startswith("text/plain"), raw[:300]
        kv = {}
        for line in body.decode("utf-8").splitlines():
            k, eq, v = line.partition("=")
            assert eq and v[:1] == "'" and v[-1:] == "'", line
            assert "'" not in v[1:-1]
            kv[k] = v[1:-1]
        assert kv["STATUS"] != "500", kv
        assert kv["STATUS"] == "200" or kv["MESSAGE"], kv
    if status in (429, 503):
        assert headers.get("retry-after", "").isdigit(), headers
    return status, headers, body
