"""Both front doors through one table of requests.

Every scenario runs twice on fresh state: against the standalone server on
a real loopback socket, and against the CGI entry as a real subprocess
with a CGI environment. Each answer is checked against the table, and the
two doors must give identical answers (status, headers, body), with only
random lease ids, secrets and times masked.
"""

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from frontdoors import free_port, trickle
from microbroker import config as mbconfig
from microbroker import service as mbserver
from microbroker import web

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CGI_BOOT = ("import sys; sys.path.insert(0, %r); "
            "from microbroker.cgi import run; run()" % ROOT)
TOKEN = "open-sesame-42"

CONFIG = """
config broker
	option name 'Test exit'
	option dataplane 'none'
	option state_dir '%(state)s'
	option max_leases '6'
	option max_per_client '2'
	option max_body '512'
	option max_header '1024'
	list allow '127.0.0.0/29'
	list allow '::1/128'
	list deny '127.0.0.5'
	option sweep_interval '3600'
	# the table sends far more than a client would
	option request_rate '0'

config location
	option country 'DE'
	option city 'Berlin'
	option latitude '52.52'
	option longitude '13.4'
	option text 'Test location'

config service 'v6'
	list provides 'ipv4-nat'
	list provides 'ipv6-single'
	option capacity '3'

config service 'v4'
	option family '4'
	option encap 'udp'
	option udp_port '20000'
	option restrict 'dns+web'

config service 'small'
	option family '4'
	option capacity '1'

config service 'private'
	option family '4'
	list token '%(token)s'

config service 'spare'
	option family '4'

config service 'off'
	option enabled '0'
"""


def make_config(tmp_path, text=CONFIG):
    state = tmp_path / "state"
    path = tmp_path / "microbroker"
    path.write_text(text % {"state": state, "token": TOKEN})
    cfg = mbconfig.load(str(path))
    assert cfg.problems == []
    return cfg, str(path)


# ---------------------------------------------------------------- the doors

def build_request(method, target, body, ctype, extra):
    lines = ["%s %s HTTP/1.1" % (method, target), "Host: broker"]
    if body:
        if ctype:
            lines.append("Content-Type: " + ctype)
        lines.append("Content-Length: %d" % len(body))
    lines += ["%s: %s" % h for h in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parse_response(raw, first):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if first:
        status = int(lines[0].split(" ")[1])
        lines = lines[1:]
    else:
        status = None
    headers = []
    for line in lines:
        k, _, v = line.partition(": ")
        if k == "Status":
            status = int(v.split(" ")[0])
        elif k not in ("Connection", "Content-Length"):
            headers.append((k, v))
        if k == "Content-Length":
            assert int(v) == len(body)
    return status, headers, body


class ServerDoor:
    name = "server"

    def __init__(self, cfg, listen=("127.0.0.1:0", "[::1]:0")):
        self.app = web.App(cfg)
        self.srv = mbserver.Server(self.app, list(listen))
        self.bound = self.srv.start()

    def close(self):
        self.srv.stop()

    def address(self, source):
        fam = 6 if ":" in source else 4
        for host, port in self.bound:
            if (":" in host) == (fam == 6) or host == "::":
                return (host if host != "::" else "::1"), port
        raise AssertionError("no listener for %s" % source)

    def raw(self, source, data, dest=None, shut=False):
        host, port = dest or self.address(source)
        fam = socket.AF_INET6 if ":" in source else socket.AF_INET
        if ":" in source and ":" not in host:
            fam = socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            if fam == socket.AF_INET:
                s.bind((source, 0))
            s.connect((host, port))
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                c = s.recv(65536)
                if not c:
                    break
                chunks.append(c)
        finally:
            s.close()
        return b"".join(chunks)

    def request(self, method, path, query, body, ctype, extra, source):
        target = path + ("?" + query if query else "")
        raw = self.raw(source, build_request(method, target, body, ctype,
                                             extra))
        return parse_response(raw, True)


class CgiDoor:
    name = "cgi"

    def __init__(self, cfg, path):
        self.path = path

    def close(self):
        pass

    def request(self, method, path, query, body, ctype, extra, source,
                env_extra=None):
        env = {"GATEWAY_INTERFACE": "CGI/1.1", "REQUEST_METHOD": method,
               "PATH_INFO": path, "QUERY_STRING": query,
               "SCRIPT_NAME": "/cgi-bin/microbroker",
               "REMOTE_ADDR": source,
               "SERVER_ADDR": "::1" if ":" in source else "127.0.0.1",
               "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "broker",
               "MICROBROKER_CONFIG": self.path, "PATH": "/usr/bin:/bin"}
        if body:
            if ctype:
                env["CONTENT_TYPE"] = ctype
            env["CONTENT_LENGTH"] = str(len(body))
        for k, v in extra:
            env["HTTP_" + k.upper().replace("-", "_")] = v
        env.update(env_extra or {})
        r = subprocess.run([sys.executable, "-I", "-S", "-c", CGI_BOOT],
                           input=body, env=env, capture_output=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        return parse_response(r.stdout, False)


# ---------------------------------------------------------------- the table
# Each step: (label, method, path, query, form or raw body, options, expect)
# form: dict -> form-urlencoded (values may be "$name.key" references to
# earlier answers), bytes -> sent as is. options: source address, ctype,
# extra headers, save name. expect: HTTP status for JSON (200 for sh), the
# error code or None, and optional {key: value} checks on the answer.

V4 = "127.0.0.1"
V4B = "127.0.0.2"
V4C = "127.0.0.3"
V4D = "127.0.0.4"
DENIED = "127.0.0.5"
OUTSIDE = "127.0.0.9"
V6 = "::1"
FAKE_ID = "00" * 8
FAKE_SECRET = "ab" * 16
FORM = "application/x-www-form-urlencoded"


def S(label, method, path, query="", form=None, src=V4, ctype=FORM,
      extra=(), save=None, status=200, error=None, check=None):
    return dict(label=label, method=method, path=path, query=query,
                form=form, src=src, ctype=ctype, extra=list(extra),
                save=save, status=status, error=error, check=check or {})


MAIN = [
    # discovery
    S("offer at /", "GET", "/", check={
        "broker.name": "Test exit", "location.city": "Berlin",
        "location.latitude": 52.52, "dataplane": "none", "kernel": False,
        "services.v6.encap": "ip", "services.v6.family": 6,
        "services.v6.endpoint": "",   # asked over IPv4: no v6 address known
        "services.v6.provides": ["ipv4-nat", "ipv6-single"],
        "services.v6.capacity": 3, "services.v6.used": 0,
        "services.v6.mtu": 1280, "services.v4.encap": "udp",
        "services.v4.restrict": "dns+web", "services.v4.ports": [53, 80, 443],
        "services.v4.endpoint": "127.0.0.1", "services.private.token": True,
        "leases.max": 6}),
    S("offer over IPv6 names the v6 endpoint", "GET", "/offer", src=V6,
      check={"services.v6.endpoint": "::1", "services.v4.endpoint": ""}),
    S("offer in shell format", "GET", "/offer", "format=sh",
      check={"SERVICES": "v6 v4 small private spare", "SVC_v6_ENCAP": "ip",
             "SVC_v6_PROVIDES": "ipv4-nat ipv6-single", "KERNEL": "0",
             "LOCATION_COUNTRY": "DE"}),
    S("offer by POST", "POST", "/offer", form={}),
    S("offer: format as a form field", "POST", "/offer",
      form={"format": "sh"}, check={"BROKER_NAME": "Test exit"}),
    # methods and paths
    S("lease by GET", "GET", "/lease", status=405,
      error="method_not_allowed"),
    S("renew by GET", "GET", "/renew", status=405,
      error="method_not_allowed"),
    S("release by GET", "GET", "/release", status=405,
      error="method_not_allowed"),
    S("DELETE", "DELETE", "/lease", status=405, error="method_not_allowed"),
    S("PUT offer", "PUT", "/offer", status=405, error="method_not_allowed"),
    S("unknown path", "GET", "/leases", status=404, error="not_found"),
    S("unknown path, sh: 200 with the error", "GET", "/nope", "format=sh",
      check={"STATUS": "404", "ERROR": "not_found"}),
    S("bad format", "GET", "/offer", "format=xml", status=400,
      error="bad_request"),
    # who may ask
    S("denied prefix", "GET", "/offer", src=DENIED, status=403,
      error="forbidden"),
    S("outside the allow list", "GET", "/offer", src=OUTSIDE, status=403,
      error="forbidden"),
    S("denied, sh", "POST", "/lease", "format=sh", {"service": "v4"},
      src=DENIED, check={"STATUS": "403", "ERROR": "forbidden"}),
    # bad lease requests
    S("unknown service", "POST", "/lease", form={"service": "nosuch"},
      status=404, error="unknown_service"),
    S("disabled service", "POST", "/lease", form={"service": "off"},
      status=404, error="unknown_service"),
    S("unknown service, sh", "POST", "/lease",
      form={"service": "nosuch", "format": "sh"},
      check={"STATUS": "404", "ERROR": "unknown_service"}),
    S("no service", "POST", "/lease", form={}, status=400,
      error="bad_request"),
    S("bad service name", "POST", "/lease", form={"service": "a b"},
      status=400, error="bad_request"),
    S("unknown field", "POST", "/lease",
      form={"service": "v4", "remote": "192.0.2.1"}, status=400,
      error="bad_request"),
    S("field twice", "POST", "/lease", form=b"service=v4&service=v6",
      status=400, error="bad_request"),
    S("field in query and body", "POST", "/lease", "service=v4",
      form={"service": "v4"}, status=400, error="bad_request"),
    S("tunnel_id 0", "POST", "/lease", form={"service": "v4",
                                             "tunnel_id": "0"},
      status=400, error="bad_request"),
    S("tunnel_id too big", "POST", "/lease",
      form={"service": "v4", "tunnel_id": "4294967296"}, status=400,
      error="bad_request"),
    S("session_id negative", "POST", "/lease",
      form={"service": "v4", "session_id": "-1"}, status=400,
      error="bad_request"),
    S("udp_sport on an ip service", "POST", "/lease",
      form={"service": "small", "udp_sport": "1701"}, status=400,
      error="bad_request"),
    S("bad %-escape", "POST", "/lease", form=b"service=v%4", status=400,
      error="bad_request"),
    S("not UTF-8", "POST", "/lease", form=b"service=%ff", status=400,
      error="bad_request"),
    S("control character", "POST", "/lease", form=b"service=v4%0a",
      status=400, error="bad_request"),
    S("quote in a value, sh stays one line", "POST", "/lease",
      "format=sh", b"service=a%27b%0a", check={"STATUS": "400"}),
    S("wrong content type", "POST", "/lease", form=b"service=v4",
      ctype="text/plain", status=400, error="bad_request"),
    S("bad JSON", "POST", "/lease", form=b"{service:",
      ctype="application/json", status=400, error="bad_request"),
    S("JSON not an object", "POST", "/lease", form=b'["v4"]',
      ctype="application/json", status=400, error="bad_request"),
    S("JSON bool value", "POST", "/lease", form=b'{"service": true}',
      ctype="application/json", status=400, error="bad_request"),
    S("IPv4 client, IPv6 service", "POST", "/lease", form={"service": "v6"},
      status=400, error="bad_request"),
    S("IPv6 client, IPv4 service", "POST", "/lease", form={"service": "v4"},
      src=V6, status=400, error="bad_request"),
    # limits on size
    S("body too large", "POST", "/lease", form=b"service=v4&x=" + b"y" * 600,
      status=413, error="too_large"),
    S("headers too large", "GET", "/offer", extra=[("X-Pad", "p" * 1100)],
      status=413, error="too_large"),
    S("too large, sh", "GET", "/offer", "format=sh",
      extra=[("X-Pad", "p" * 1100)],
      check={"STATUS": "413", "ERROR": "too_large"}),
    # a lease over IPv6, its renewals and its end
    S("lease v6", "POST", "/lease", form={"service": "v6"}, src=V6,
      save="a", check={"service": "v6", "kind": "l2tpv3", "encap": "ip",
                       "local": "::1", "remote": "::1", "mtu": 1280,
                       "lifetime": 600, "renew_interval": 120,
                       "state": "up", "ifname": "mb-v6"}),
    S("lease v6 again: same lease, new secret", "POST", "/lease",
      form={"service": "v6"}, src=V6, save="a2",
      check={"lease_id": "$a.lease_id", "tunnel_id": "$a.tunnel_id"}),
    S("old secret stops working", "POST", "/renew",
      form={"lease_id": "$a.lease_id", "secret": "$a.secret"}, src=V6,
      status=403, error="forbidden"),
    S("renew", "POST", "/renew",
      form={"lease_id": "$a.lease_id", "secret": "$a2.secret"}, src=V6,
      check={"lease_id": "$a.lease_id", "state": "up"}),
    S("renew answers carry no secret", "POST", "/renew",
      form={"lease_id": "$a.lease_id", "secret": "$a2.secret"}, src=V6,
      check={"secret": None}),
    S("renew as JSON", "POST", "/renew",
      form=b'{"lease_id": "$a.lease_id", "secret": "$a2.secret"}',
      ctype="application/json", src=V6),
    S("renew wrong secret", "POST", "/renew",
      form={"lease_id": "$a.lease_id", "secret": FAKE_SECRET}, src=V6,
      status=403, error="forbidden"),
    S("renew unknown lease", "POST", "/renew",
      form={"lease_id": FAKE_ID, "secret": FAKE_SECRET}, src=V6,
      status=404, error="not_found"),
    S("renew bad lease_id", "POST", "/renew",
      form={"lease_id": "XYZ", "secret": FAKE_SECRET}, status=400,
      error="bad_request"),
    S("renew bad secret", "POST", "/renew",
      form={"lease_id": FAKE_ID, "secret": "short"}, status=400,
      error="bad_request"),
    S("renew, sh", "POST", "/renew", "format=sh",
      {"lease_id": "$a.lease_id", "secret": "$a2.secret"}, src=V6,
      check={"STATUS": "200", "ERROR": "", "LEASE_ID": "$a.lease_id"}),
    S("status by GET", "GET", "/status",
      "lease_id=$a.lease_id&secret=$a2.secret", src=V6,
      check={"counters.rx_packets": 0, "counters.tx_bytes": 0}),
    S("status, sh", "GET", "/status",
      "lease_id=$a.lease_id&secret=$a2.secret&format=sh", src=V6,
      check={"RX_PACKETS": "0", "TX_BYTES": "0", "STATE": "up"}),
    S("offer counts the lease", "GET", "/offer", src=V6,
      check={"services.v6.used": 1, "services.v6.free": 2,
             "leases.used": 1}),
    # a lease over IPv4 (UDP): the other address may not touch it
    S("lease v4 udp", "POST", "/lease", form={"service": "v4"}, save="b",
      check={"encap": "udp", "local": V4, "remote": "127.0.0.1",
             "udp_dport": 20000, "udp_sport": 20000}),
    S("second udp lease gets the next exit port", "POST", "/lease",
      form={"service": "v4", "udp_sport": "3000", "tunnel_id": "77",
            "session_id": "88"}, src=V4B, save="c",
      check={"udp_dport": 20001, "udp_sport": 3000, "tunnel_id": 77,
             "session_id": 88}),
    S("own id already used by this client", "POST", "/lease",
      form={"service": "spare", "tunnel_id": "77"}, src=V4B, status=409,
      error="id_conflict"),
    S("renew from another address", "POST", "/renew",
      form={"lease_id": "$b.lease_id", "secret": "$b.secret"}, src=V4B,
      status=403, error="forbidden"),
    S("release from another address", "POST", "/release",
      form={"lease_id": "$b.lease_id", "secret": "$b.secret"}, src=V4B,
      status=403, error="forbidden"),
    S("status from another address", "GET", "/status",
      "lease_id=$b.lease_id&secret=$b.secret", src=V4B, status=403,
      error="forbidden"),
    # tokens
    S("private without token", "POST", "/lease", form={"service": "private"},
      status=403, error="forbidden"),
    S("private with a wrong token", "POST", "/lease",
      form={"service": "private", "token": "not-the-token"}, status=403,
      error="forbidden"),
    S("private with the token", "POST", "/lease",
      form={"service": "private", "token": TOKEN}, src=V4C, save="d"),
    # limits on leases
    S("service capacity (small: 1)", "POST", "/lease",
      form={"service": "small"}, src=V4D, save="e"),
    S("small is full", "POST", "/lease", form={"service": "small"}, src=V4,
      status=503, error="full"),
    S("per-client limit (2)", "POST", "/lease",
      form={"service": "v4"}, src=V4C, save="f"),
    S("third lease for one client", "POST", "/lease",
      form={"service": "spare"}, src=V4C, status=429, error="too_many"),
    S("third lease, sh", "POST", "/lease", "format=sh",
      {"service": "spare"}, src=V4C,
      check={"STATUS": "429", "ERROR": "too_many"}),
    S("total limit (6 leases)", "POST", "/lease", form={"service": "spare"},
      src=V4B, status=503, error="full"),
    S("total limit, other service", "POST", "/lease",
      form={"service": "private", "token": TOKEN}, src=V4, status=503,
      error="full"),
    # release frees
    S("release", "POST", "/release",
      form={"lease_id": "$e.lease_id", "secret": "$e.secret"}, src=V4D,
      check={"released": True, "lease_id": "$e.lease_id"}),
    S("release again", "POST", "/release",
      form={"lease_id": "$e.lease_id", "secret": "$e.secret"}, src=V4D,
      status=404, error="not_found"),
    S("release, sh", "POST", "/release", "format=sh",
      {"lease_id": "$a.lease_id", "secret": "$a2.secret"}, src=V6,
      check={"STATUS": "200", "RELEASED": "1"}),
    S("small is free again", "POST", "/lease", form={"service": "small"},
      src=V4),
]


def resolve(value, saved):
    if isinstance(value, str):
        return re.sub(r"\$(\w+)\.(\w+)",
                      lambda m: str(saved[m.group(1)][m.group(2)]), value)
    if isinstance(value, bytes):
        return resolve(value.decode("latin-1"), saved).encode("latin-1")
    return value


def encode_form(form):
    out = []
    for k, v in form.items():
        out.append(k + "=" + "".join(
            c if c.isalnum() or c in "-._" else "%%%02X" % ord(c) for c in v))
    return "&".join(out).encode()


def decode_answer(body, fmt):
    if fmt == "sh":
        out = {}
        text = body.decode("utf-8")
        assert text.endswith("\n")
        for line in text[:-1].split("\n"):
            # A client may read values without eval: KEY='...' on one line.
            assert re.fullmatch(r"[A-Z][A-Za-z0-9_]*='[^'\x00]*'", line), line
            k, _, v = line.partition("=")
            assert k not in out
            out[k] = v[1:-1]
        return out
    import json
    return json.loads(body.decode("utf-8"))


def lookup(obj, dotted):
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


MASKS = [(re.compile(rb"\b[0-9a-f]{32}\b"), b"<secret>"),
         (re.compile(rb"\b[0-9a-f]{16}\b"), b"<lease_id>"),
         (re.compile(rb'("expires":|EXPIRES=\')\d+'), rb"\1<time>"),
         (re.compile(rb'("retry_after":|RETRY_AFTER=\')\d+'), rb"\1<n>")]


def masked(answer):
    status, headers, body = answer
    for rx, sub in MASKS:
        body = rx.sub(sub, body)
    headers = [(k, "<n>" if k == "Retry-After" else v) for k, v in headers]
    return status, headers, body


def run_table(door, steps):
    saved, answers = {}, []
    for st in steps:
        form = st["form"]
        if isinstance(form, dict):
            body = encode_form({k: resolve(v, saved) for k, v in form.items()})
        else:
            body = resolve(form, saved) if form is not None else b""
        query = resolve(st["query"], saved)
        status, headers, raw = door.request(st["method"], st["path"], query,
                                            body, st["ctype"], st["extra"],
                                            st["src"])
        fmt = "sh" if "format=sh" in query or b"format=sh" in body else "json"
        label = "%s: %s" % (door.name, st["label"])
        assert status == st["status"], (label, raw)
        ans = decode_answer(raw, fmt)
        if st["error"]:
            assert ans["error"]["code"] == st["error"], (label, ans)
            assert ans["error"]["message"], label
            retry = dict(headers).get("Retry-After")
            if status in (429, 503):
                assert retry and int(retry) > 0, label
                assert ans["error"]["retry_after"] == int(retry)
            else:
                assert retry is None, label
            if status == 405:
                assert dict(headers).get("Allow"), label
        elif fmt == "json":
            assert "error" not in ans, (label, ans)
        for key, want in st["check"].items():
            want = resolve(want, saved)
            got = ans.get(key) if fmt == "sh" else lookup(ans, key)
            if isinstance(want, str) and isinstance(got, int) and \
                    not isinstance(got, bool):
                got = str(got)
            assert got == want, (label, key, got, want)
        if fmt == "json" and status == 200 and "content-type" not in label:
            assert dict(headers)["Content-Type"] == "application/json"
        if fmt == "sh":
            assert dict(headers)["Content-Type"].startswith("text/plain")
        if st["save"]:
            saved[st["save"]] = ans
        answers.append((st["label"], masked((status, headers, raw))))
    return answers


def both_doors(tmp_path, steps, text=CONFIG):
    results = {}
    for kind in ("server", "cgi"):
        d = tmp_path / kind
        d.mkdir()
        cfg, path = make_config(d, text)
        door = ServerDoor(cfg) if kind == "server" else CgiDoor(cfg, path)
        try:
            results[kind] = run_table(door, steps)
        finally:
            door.close()
    for (label, a), (_, b) in zip(results["server"], results["cgi"]):
        assert a == b, (label, a, b)
    return results


def test_main_table_through_both_doors(tmp_path):
    both_doors(tmp_path, MAIN)


TINY = """
config broker
	option dataplane 'none'
	option state_dir '%(state)s'
	option tunnel_ids '1-2'
	option session_ids '1-2'
	option max_per_client '1'
	option log_level 'warning'
config service 'v4'
	option family '4'
"""

IDS = [
    S("first", "POST", "/lease", form={"service": "v4"}, src=V4),
    S("second", "POST", "/lease", form={"service": "v4"}, src=V4B),
    S("no ids left", "POST", "/lease", form={"service": "v4"}, src=V4C,
      status=503, error="ids_exhausted"),
    S("no ids left, sh", "POST", "/lease", "format=sh", {"service": "v4"},
      src=V4C, check={"STATUS": "503", "ERROR": "ids_exhausted"}),
]


def test_ids_exhausted_through_both_doors(tmp_path):
    both_doors(tmp_path, IDS, TINY)


# ---------------------------------------------------------------- more doors

def test_ipv4_mapped_client_is_normalised(tmp_path):
    cfg, path = make_config(tmp_path)
    # A dual-stack [::] listener sees IPv4 clients as ::ffff:a.b.c.d.
    door = ServerDoor(cfg, listen=["[::]:0"])
    try:
        host, port = door.bound[0]
        raw = door.raw(V4, build_request("POST", "/lease?format=sh",
                                         b"service=v4", FORM, []),
                       dest=("127.0.0.1", port))
        status, _, body = parse_response(raw, True)
        ans = decode_answer(body, "sh")
        assert ans["STATUS"] == "200", ans
        assert ans["LOCAL"] == "127.0.0.1" and ans["REMOTE"] == "127.0.0.1"
    finally:
        door.close()
    cgi = CgiDoor(cfg, path)
    status, _, body = cgi.request("POST", "/lease", "format=sh",
                                  b"service=small", FORM, [],
                                  "::ffff:127.0.0.1",
                                  {"SERVER_ADDR": "::ffff:127.0.0.1"})
    ans = decode_answer(body, "sh")
    assert ans["STATUS"] == "200", ans
    assert ans["LOCAL"] == "127.0.0.1" and ans["REMOTE"] == "127.0.0.1"


def test_cgi_config_problems_answer_unavailable(tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("config broker\n option max_leases x\n")
    door = CgiDoor(None, str(bad))
    status, headers, body = door.request("GET", "/offer", "", b"", None, [],
                                         V4)
    assert status == 503
    ans = decode_answer(body, "json")
    assert ans["error"]["code"] == "unavailable"
    assert "check-config" in ans["error"]["message"]
    assert dict(headers)["Retry-After"]
    status, _, body = door.request("GET", "/offer", "format=sh", b"", None,
                                   [], V4)
    assert status == 200 and b"STATUS='503'" in body


def test_cgi_bad_content_length(tmp_path):
    cfg, path = make_config(tmp_path)
    door = CgiDoor(cfg, path)
    status, _, body = door.request("POST", "/lease", "", b"", None, [], V4,
                                   {"CONTENT_LENGTH": "12x"})
    assert status == 400


def test_cgi_imports_stay_small(tmp_path):
    """The CGI path never loads http.server, email, urllib, the cgi module
    or anything kernel-related (with dataplane none), and an offer, a lease
    and a renew never json, re, enum (jsonlite.py), threading (one
    process, one request), collections, dbm.ndbm, OpenSSL's hashlib, nor
    struct.py and bisect.py over their C modules; an offer not even the
    lease store, a renew not the counts file."""
    cfg, path = make_config(tmp_path)
    boot = CGI_BOOT.replace(
        "import run; run()",
        "import main; main(); sys.stderr.write(' '.join(sorted(sys.modules)))")
    assert boot != CGI_BOOT

    def cgi(method, where, body=b""):
        env = {"REQUEST_METHOD": method, "PATH_INFO": where,
               "REMOTE_ADDR": V4, "SERVER_ADDR": V4, "QUERY_STRING": "format=sh",
               "CONTENT_TYPE": FORM, "CONTENT_LENGTH": str(len(body)),
               "MICROBROKER_CONFIG": path}
        r = subprocess.run([sys.executable, "-I", "-S", "-c", boot],
                           input=body, env=env, capture_output=True)
        assert b"STATUS='200'" in r.stdout, (where, r.stdout)
        return r.stdout, set(r.stderr.decode().split())

    out, lease_mods = cgi("POST", "/lease", b"service=v4")
    fields = dict(line.split("=", 1) for line in out.decode().splitlines() if "=" in line)
    lease_id, secret = fields["LEASE_ID"].strip("'"), fields["SECRET"].strip("'")
    _, renew_mods = cgi("POST", "/renew",
                        ("lease_id=%s&secret=%s" % (lease_id, secret)).encode())
    _, offer_mods = cgi("GET", "/offer")
    # Where this Python has it: _gdbm without the dbm package, which loads
    # dbm.ndbm and its library too.
    gdbm = subprocess.run([sys.executable, "-I", "-S", "-c",
                           "import _gdbm"]).returncode == 0
    # Where this Python has CPython's own SHA-256 (_sha256, up to 3.11): not
    # OpenSSL's (_hashlib).
    own_sha = subprocess.run([sys.executable, "-I", "-S", "-c",
                              "import _sha256"]).returncode == 0
    for what, mods in (("lease", lease_mods), ("renew", renew_mods),
                       ("offer", offer_mods)):
        for bad in ("http", "http.server", "email", "urllib", "urllib.parse",
                    "cgi", "logging", "argparse", "socketserver",
                    "microbroker.netlink", "microbroker.dataplane",
                    "microbroker.server", "microbroker.service",
                    "microbroker.frontdoor", "selectors",
                    "ipaddress", "json", "re", "enum",
                    "threading", "collections", "array", "hmac",
                    # posix, not os: os costs ~0.85 ms (_collections_abc)
                    "os", "_collections_abc", "posixpath",
                    # their C modules (_struct, _bisect) without the .py
                    "struct", "bisect") + \
                (("dbm", "dbm.ndbm", "_dbm") if gdbm else ()) + \
                (("hashlib", "_hashlib") if own_sha else ()):
            assert bad not in mods, (what, bad)
    # A lease and a renew open the store; an offer reads the counts file only.
    for what, mods in (("lease", lease_mods), ("renew", renew_mods)):
        assert "microbroker.leases.store" in mods, what
        assert "microbroker.leases.secret" in mods, what
    assert "microbroker.leases.counts" in offer_mods
    # a renew changes no count: the counts file is a lease's and an offer's
    assert "microbroker.leases.counts" not in renew_mods
    assert "microbroker.leases.counts" in lease_mods
    for bad in ("microbroker.leases.store", "microbroker.leases.dbfile",
                "microbroker.leases.record", "_gdbm", "dbm.gnu"):
        assert bad not in offer_mods, ("offer", bad)


def test_cgi_offer_on_the_kernel_data_plane_loads_no_os(tmp_path):
    """An exit's own CGI (dataplane 'kernel'): its offer asks the kernel
    through netlink, l2tp and rtnl, none of which loads os."""
    cfg, path = make_config(tmp_path, CONFIG.replace(
        "option dataplane 'none'", "option dataplane 'kernel'"))
    assert cfg.dataplane == "kernel"
    boot = CGI_BOOT.replace(
        "import run; run()",
        "import main; main(); sys.stderr.write(' '.join(sorted(sys.modules)))")
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/offer", "REMOTE_ADDR": V4,
           "SERVER_ADDR": V4, "QUERY_STRING": "format=sh", "MICROBROKER_CONFIG": path}
    r = subprocess.run([sys.executable, "-I", "-S", "-c", boot], env=env,
                       capture_output=True)
    assert b"STATUS='200'" in r.stdout, r.stdout
    mods = set(r.stderr.decode().split())
    assert "microbroker.dataplane" in mods and "microbroker.netlink" in mods
    for bad in ("os", "_collections_abc", "socket", "struct", "subprocess",
                "microbroker.filters"):
        assert bad not in mods, bad


def test_cgi_run_answers_without_the_cyclic_collector(tmp_path):
    """run() (the script's entry) turns the collector off before it imports
    the request's modules: no collection runs in a lease, and the answer is
    whole."""
    cfg, path = make_config(tmp_path)
    boot = ("import gc, posix, sys\n"
            "runs = []\n"
            "gc.callbacks.append(lambda phase, info: runs.append(phase))\n"
            "end = posix._exit\n"
            "def report(status):\n"
            "    posix.write(2, b'collections=%%d\\n' %% len(runs))\n"
            "    end(status)\n"
            "posix._exit = report\n"
            "sys.path.insert(0, %r)\n"
            "from microbroker.cgi import run\n"
            "run()\n" % ROOT)
    body = b"service=v4"
    env = {"REQUEST_METHOD": "POST", "PATH_INFO": "/lease", "REMOTE_ADDR": V4,
           "SERVER_ADDR": V4, "QUERY_STRING": "format=sh", "CONTENT_TYPE": FORM,
           "CONTENT_LENGTH": str(len(body)), "MICROBROKER_CONFIG": path}
    r = subprocess.run([sys.executable, "-I", "-S", "-c", boot], input=body,
                       env=env, capture_output=True)
    assert b"STATUS='200'" in r.stdout, r.stdout
    assert b"collections=0\n" in r.stderr, r.stderr


def test_server_rejects_what_cgi_servers_would(tmp_path):
    cfg, _ = make_config(tmp_path)
    door = ServerDoor(cfg)
    try:
        def ask(data):
            status, headers, body = parse_response(door.raw(V4, data), True)
            return status, decode_answer(body, "json")

        st, ans = ask(b"GARBAGE\r\n\r\n")
        assert st == 400 and ans["error"]["code"] == "bad_request"
        st, ans = ask(b"POST /lease HTTP/1.1\r\nTransfer-Encoding: gzip"
                      b"\r\n\r\n0\r\n\r\n")
        assert st == 400 and "chunked" in ans["error"]["message"]
        st, ans = ask(b"POST /lease HTTP/1.1\r\nTransfer-Encoding: chunked"
                      b"\r\nContent-Length: 3\r\n\r\n0\r\n\r\n")
        assert st == 400 and "together" in ans["error"]["message"]
        st, ans = ask(b"POST /lease HTTP/1.1\r\nContent-Length: \xb2"
                      b"\r\n\r\n")
        assert st == 400
        st, ans = ask(b"POST /lease HTTP/1.1\r\nContent-Length: x\r\n\r\n")
        assert st == 400
        st, ans = ask(b"GET /offer HTTP/1.1\r\n folded\r\n\r\n")
        assert st == 400
        st, ans = ask(b"GET /offer HTTP/1.1\r\n" +
                      b"X-Pad: " + b"p" * 70000 + b"\r\n\r\n")
        assert st == 413
        st, ans = ask(b"GET /%zz HTTP/1.1\r\n\r\n")
        assert st == 400
        st, ans = ask(b"GET /%6fffer HTTP/1.1\r\n\r\n")
        assert st == 200 and "services" in ans
        # A big body is refused without being read, and the answer still
        # arrives.
        st, ans = ask(b"POST /lease HTTP/1.1\r\nContent-Type: " +
                      FORM.encode() + b"\r\nContent-Length: 100000\r\n\r\n" +
                      b"x" * 100000)
        assert st == 413 and ans["error"]["code"] == "too_large"
        # Expect: 100-continue gets its interim answer.
        raw = door.raw(V4, b"POST /lease HTTP/1.1\r\nExpect: 100-continue\r\n"
                       b"Content-Type: " + FORM.encode() +
                       b"\r\nContent-Length: 10\r\n\r\nservice=v4")
        assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200")
        # A client that goes away mid-request costs nothing.
        s = socket.create_connection(door.address(V4))
        s.sendall(b"GET /offer HTTP/1.1\r\n")
        s.close()
        st, ans = ask(b"GET /offer HTTP/1.0\r\n\r\n")
        assert st == 200
    finally:
        door.close()


def chunked(body, sizes=None):
    out, i = [], 0
    for n in sizes or [len(body)]:
        out.append(b"%x\r\n%s\r\n" % (n, body[i:i + n]))
        i += n
    return b"".join(out) + b"0\r\n\r\n"


CHUNKED = (b"POST /lease?format=sh HTTP/1.1\r\nHost: b\r\n"
           b"Transfer-Encoding: chunked\r\nContent-Type: " + FORM.encode()
           + b"\r\n\r\n")


@pytest.mark.parametrize("stream,status,code,words", [
    (chunked(b"service=v4&format=sh", [3, 7, 10]), "200", "", ""),
    # chunk extensions, trailer fields, lowercase hex, bare LF
    (b"3;ext=1\r\nser\r\n11\nvice=v4&format=sh\n0\r\nX-T: 1\r\n\r\n",
     "200", "", ""),
    (b"zz\r\nservice=v4\r\n0\r\n\r\n", "400", "bad_request",
     "chunk size"),
    (b"\r\n", "400", "bad_request", "chunk size"),
    (b"+3\r\nser\r\n0\r\n\r\n", "400", "bad_request", "chunk size"),
    (b"3\r\nservice\r\n0\r\n\r\n", "400", "bad_request", "longer"),
    (b"a\r\nservice=v4", "400", "bad_request", "ends early"),
    (b"1" * 2000 + b"\r\n", "400", "bad_request", "too long"),
    (b"ffffffffff\r\n", "400", "bad_request", "chunk size"),
    (chunked(b"x" * 600, [300, 300]), "413", "too_large", "512"),
    (b"fffff\r\n" + b"x" * 3000, "413", "too_large", "512"),
])
def test_server_reads_chunked_bodies(tmp_path, stream, status, code, words):
    """What uclient-fetch --post-data sends: a chunked body, no
    Content-Length; same size limit as a Content-Length body, clear errors
    for a malformed stream, and the shell format from the query string."""
    cfg, _ = make_config(tmp_path)
    door = ServerDoor(cfg)
    try:
        st, _, body = parse_response(door.raw(V4, CHUNKED + stream,
                                              shut=True), True)
    finally:
        door.close()
    ans = decode_answer(body, "sh")
    assert (st, ans["STATUS"], ans["ERROR"]) == (200, status, code), ans
    assert words in ans.get("MESSAGE", "")
    if status == "200":
        assert ans["SERVICE"] == "v4"


def test_cgi_reads_stdin_to_eof_without_content_length(tmp_path):
    """uhttpd hands a chunked body to the CGI de-chunked on stdin and sets
    no CONTENT_LENGTH (its proc.c only copies the header)."""
    cfg, path = make_config(tmp_path)
    door = CgiDoor(cfg, path)
    env = {"CONTENT_TYPE": FORM}
    status, _, body = door.request("POST", "/lease", "format=sh",
                                   b"service=v4&format=sh", None, [], V4,
                                   dict(env, CONTENT_LENGTH=""))
    ans = decode_answer(body, "sh")
    assert (status, ans["STATUS"], ans["SERVICE"]) == (200, "200", "v4")
    status, _, body = door.request("POST", "/lease", "format=sh",
                                   b"service=v4&x=" + b"a" * 600, None, [],
                                   V4, dict(env, CONTENT_LENGTH=""))
    ans = decode_answer(body, "sh")
    assert (ans["STATUS"], ans["ERROR"]) == ("413", "too_large")


@pytest.mark.parametrize("value", ["\xb2", "\u0667", "1 ", "-1", "0x10"])
def test_cgi_content_length_is_ascii_digits(tmp_path, value):
    cfg, path = make_config(tmp_path)
    door = CgiDoor(cfg, path)
    status, _, body = door.request("POST", "/lease", "format=sh",
                                   b"service=v4", None, [], V4,
                                   {"CONTENT_LENGTH": value,
                                    "CONTENT_TYPE": FORM})
    ans = decode_answer(body, "sh")
    assert (status, ans["STATUS"], ans["ERROR"]) == (200, "400",
                                                     "bad_request")


def test_server_is_http_server_but_never_answers_like_it(tmp_path, capfd):
    """Requests other than a plain offer are read by http.server's
    handler; its own refusals (too many header
    lines, a line over its limit, lines its parser would take for the
    body, HTTP/0.9 or 2.0, absolute URIs, a blank request line) come in
    the API's format, never as its HTML page, with no Server or Date
    header, and it writes nothing to stderr."""
    import http.server
    from microbroker.broker import log
    cfg, _ = make_config(tmp_path)
    log.configure("stderr", "info")
    door = ServerDoor(cfg)
    try:
        from microbroker import server
        assert issubclass(server._Handler, http.server.BaseHTTPRequestHandler)
        capfd.readouterr()

        def ask(data):
            status, headers, body = parse_response(door.raw(V4, data), True)
            assert b"<" not in body, body
            names = [k for k, _ in headers]
            assert "Server" not in names and "Date" not in names, headers
            return status, headers, body

        many = b"".join(b"X-H%d: v\r\n" % i for i in range(120))
        long_line = b"X-Pad: " + b"p" * 66000 + b"\r\n"
        for data, want, code in (
                (b"GET /offer HTTP/1.1\r\n" + many + b"\r\n", 413,
                 "too_large"),
                (b"GET /offer HTTP/1.1\r\n" + long_line + b"\r\n", 413,
                 "too_large"),
                (b"POST /lease HTTP/1.1\r\nNot A Header: x\r\nContent-Type: "
                 + FORM.encode() + b"\r\nContent-Length: 10\r\n\r\n"
                 b"service=v4", 400, "bad_request"),
                (b"GET /offer HTTP/1.1\r\nNoColon\r\n\r\n", 400,
                 "bad_request"),
                (b"GET /offer\r\n\r\n", 400, "bad_request"),
                (b"GET /offer HTTP/2.0\r\n\r\n", 400, "bad_request"),
                (b"GET /offer HTTP/1.1 x\r\n\r\n", 400, "bad_request"),
                (b"GET http://broker/offer HTTP/1.1\r\n\r\n", 400,
                 "bad_request"),
                (b"\r\n", 400, "bad_request"),
                (b"BREW /offer HTTP/1.1\r\n\r\n", 405,
                 "method_not_allowed")):
            st, headers, body = ask(data)
            assert st == want, (data[:60], body)
            assert dict(headers)["Content-Type"] == "application/json"
            assert decode_answer(body, "json")["error"]["code"] == code
        # ... and in the shell format when the request line asks for it
        st, headers, body = ask(b"GET /offer?format=sh HTTP/1.1\r\n" + many
                                + b"\r\n")
        assert st == 200 and decode_answer(body, "sh")["STATUS"] == "413"
        # A body over max_body with Expect: 100-continue gets no 100.
        raw = door.raw(V4, b"POST /lease HTTP/1.1\r\nExpect: 100-continue"
                       b"\r\nContent-Type: " + FORM.encode() +
                       b"\r\nContent-Length: 5000\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 413 "), raw[:80]
        # A keep-alive request is still answered once, then closed.
        raw = door.raw(V4, b"GET /offer HTTP/1.1\r\nConnection: keep-alive"
                       b"\r\n\r\nGET /offer HTTP/1.1\r\n\r\n")
        assert raw.count(b"HTTP/1.1 200") == 1
        assert b"\r\nConnection: close\r\n" in raw
        out, err = capfd.readouterr()
        assert out == "" and err == "", (out, err)
    finally:
        door.close()
        log.configure("stderr", "info")


def test_server_listens_on_several_addresses_and_dual_stack(tmp_path):
    """[::] takes IPv4 too unless an IPv4 listener shares its port; every
    listener answers."""
    cfg, _ = make_config(tmp_path)
    port = free_port()
    door = ServerDoor(cfg, listen=["[::]:%d" % port, "127.0.0.1:%d" % port,
                                   "[::1]:0"])
    try:
        assert door.bound[:2] == [("::", port), ("127.0.0.1", port)]
        v6only = door.srv.door.sockets[0].getsockopt(
            socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        assert v6only == 1
        for dest, src in ((("::1", port), V6), (("127.0.0.1", port), V4),
                          (door.bound[2], V6)):
            st, _, body = parse_response(door.raw(
                src, b"GET /offer HTTP/1.0\r\n\r\n", dest=dest), True)
            assert st == 200 and "services" in decode_answer(body, "json")
    finally:
        door.close()


def test_server_connection_limit(tmp_path):
    """Past max_connections a plain offer still gets one of
    SPARE_FOR_OFFERS; anything else, and an offer once those are taken
    too, gets a 503 in the format it asked for."""
    from microbroker import frontdoor
    text = CONFIG.replace("option sweep_interval '3600'",
                          "option sweep_interval '3600'\n"
                          "\toption max_connections '1'\n"
                          "\toption source_connections '100'")
    cfg, _ = make_config(tmp_path, text)
    door = ServerDoor(cfg)
    held = []
    try:
        # Accepted first (the backlog is FIFO), so it holds the one slot.
        held.append(socket.create_connection(door.address(V4)))
        held[0].sendall(b"GET /offer HTTP/1.1\r\n")   # never finishes
        status, headers, body = parse_response(
            door.raw(V4, b"GET /offer HTTP/1.1\r\n\r\n"), True)
        assert status == 200 and "services" in decode_answer(body, "json")
        status, headers, body = parse_response(door.raw(
            V4, b"POST /renew?format=sh HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            True)
        ans = decode_answer(body, "sh")
        assert (status, ans["STATUS"], ans["ERROR"]) == (200, "503",
                                                         "unavailable")
        for _ in range(frontdoor.SPARE_FOR_OFFERS):
            held.append(socket.create_connection(door.address(V4)))
            held[-1].sendall(b"GET /offer HTTP/1.1\r\n")
        # (accepted in order, before the next: the spares are all taken)
        status, headers, body = parse_response(
            door.raw(V4, b"GET /offer HTTP/1.1\r\n\r\n"), True)
        assert status == 503
        assert decode_answer(body, "json")["error"]["code"] == "unavailable"
    finally:
        for s in held:
            s.close()
        door.close()


def test_server_drops_a_client_that_trickles(tmp_path):
    """One deadline per request (`timeout`), not per byte: a client
    sending a byte now and then cannot hold a connection for long."""
    text = CONFIG.replace("option sweep_interval '3600'",
                          "option sweep_interval '3600'\n"
                          "\toption timeout '1'")
    cfg, _ = make_config(tmp_path, text)
    door = ServerDoor(cfg)
    try:
        s = socket.create_connection(door.address(V4))
        s.settimeout(0.2)
        closed = trickle(s, b"GET /offer HTTP/1.1\r\nX-Slow: " + b"a" * 150)
        s.close()
        # 150 bytes at >= 0.2 s each take 30 s; the deadline is 1 s.
        assert closed is not None
    finally:
        door.close()


# ---------------------------------------------------------------- serve

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_command_starts_and_stops_cleanly(tmp_path, sig):
    port = free_port()
    env = dict(os.environ)
    env.pop("MICROBROKER_CONFIG", None)
    env["HOME"] = str(tmp_path)
    p = subprocess.Popen(
        [sys.executable, "-m", "microbroker", "serve", "--dataplane", "none",
         "--state-dir", str(tmp_path / "state"), "--listen",
         "127.0.0.1:%d" % port],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = p.stderr.readline().decode()
        assert "listening on 127.0.0.1:%d" % port in line, line
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /offer?format=sh HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            c = s.recv(65536)
            if not c:
                break
            data += c
        s.close()
        assert b"SERVICES='default'" in data
        p.send_signal(sig)
        out, err = p.communicate(timeout=20)
        assert p.returncode == 0, err
        assert b"stopped" in err
        # Every line is the broker's own: none of http.server's access log.
        assert all(line.startswith(b"microbroker: ")
                   for line in err.splitlines()), err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_serve_says_when_port_is_taken(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        r = subprocess.run(
            [sys.executable, "-m", "microbroker", "serve", "--dataplane",
             "none", "--state-dir", str(tmp_path), "--listen",
             "127.0.0.1:%d" % port], cwd=ROOT, capture_output=True,
            timeout=30)
        assert r.returncode == 1
        assert b"cannot listen on" in r.stderr
    finally:
        s.close()


def test_cgi_script_file_is_valid_python():
    path = os.path.join(ROOT, "openwrt", "files", "microbroker.cgi")
    with open(path) as f:
        text = f.read()
    assert text.startswith("#!/usr/bin/python3 -IS\n")
    compile(text, path, "exec")
    assert os.access(path, os.X_OK)


def _world_usable(path, mode):
    """Whether others may use this file with `mode` (0o001 run, 0o004 read)
    and search every directory on the way."""
    path = os.path.realpath(path)
    d = os.path.dirname(path)
    while d != "/":
        if not os.stat(d).st_mode & 0o001:
            return False
        d = os.path.dirname(d)
    return bool(os.stat(path).st_mode & mode)


def test_fresh_machine_no_config_not_root(tmp_path, request):
    """No config, no options, not root: it starts, keeps state under
    ~/.local/state, and says in its log and its offer that this host
    cannot build tunnels; a lease is answered `unavailable`."""
    if os.path.exists(mbconfig.DEFAULT_PATH):
        pytest.skip("%s exists here" % mbconfig.DEFAULT_PATH)
    py, drop = sys.executable, None
    if os.geteuid() == 0:
        if not _world_usable(py, 0o001) or not _world_usable(
                os.path.join(ROOT, "microbroker", "__main__.py"), 0o004):
            pytest.skip("no interpreter an unprivileged user can run")
        # pytest's own tmp_path is private to root
        import tempfile
        tmp_path = tempfile.mkdtemp(prefix="mb-fresh-")
        request.addfinalizer(lambda: subprocess.run(["rm", "-rf", tmp_path]))
        os.chmod(tmp_path, 0o777)

        def drop():
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
    port = free_port()
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": ROOT, "PYTHONDONTWRITEBYTECODE": "1"}
    # The listen address is the only thing given, so the test does not
    # take the default port 8053 on this machine.
    p = subprocess.Popen([py, "-m", "microbroker", "serve", "--listen",
                          "127.0.0.1:%d" % port, "--listen",
                          "[::1]:%d" % port], cwd=str(tmp_path),
                         env=env, stderr=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, preexec_fn=drop)
    try:
        lines = [p.stderr.readline().decode() for _ in range(2)]
        assert "listening on 127.0.0.1:%d" % port in lines[0], lines
        assert "cannot build tunnels" in lines[1], lines
        leases = os.path.join(str(tmp_path), ".local", "state",
                              "microbroker", "leases")
        assert lines[0].rstrip().endswith(leases), lines[0]

        def ask(data):
            s = socket.create_connection(("::1", port), timeout=10)
            s.sendall(data)
            out = b""
            while True:
                c = s.recv(65536)
                if not c:
                    break
                out += c
            s.close()
            return parse_response(out, True)

        st, _, body = ask(b"GET /offer HTTP/1.0\r\n\r\n")
        offer = decode_answer(body, "json")
        assert st == 200 and offer["kernel"] is False
        assert offer["kernel_reason"] and offer["dataplane"] == "kernel"
        assert list(offer["services"]) == ["default"]
        st, h, body = ask(b"POST /lease HTTP/1.0\r\nContent-Type: " +
                          FORM.encode() + b"\r\nContent-Length: 15\r\n\r\n"
                          b"service=default")
        lease = decode_answer(body, "json")
        assert st == 503 and lease["error"]["code"] == "unavailable"
        assert offer["kernel_reason"] in lease["error"]["message"]
        assert int(dict(h)["Retry-After"]) > 0
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=20)
        assert p.returncode == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_cgi_answers_even_when_everything_breaks(tmp_path):
    """A state directory that cannot be created: still a readable answer."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    text = CONFIG.replace("option state_dir '%(state)s'",
                          "option state_dir '%s/sub'" % blocker)
    path = tmp_path / "microbroker"
    path.write_text(text % {"token": TOKEN})
    door = CgiDoor(None, str(path))
    status, headers, body = door.request("GET", "/offer", "", b"", None, [],
                                         V4)
    ans = decode_answer(body, "json")
    assert status == 500 and ans["error"]["code"] == "store"
    status, headers, body = door.request("GET", "/offer", "format=sh", b"",
                                         None, [], V4)
    assert status == 200 and b"STATUS='500'\nERROR='store'" in body


def test_cgi_first_offer_on_a_new_state_dir_sweeps(tmp_path):
    """A CGI opens the lease store only when the request needs it (an offer
    reads the counts file); a sweep that is due opens it first, so the
    state directory its stamp goes in exists."""
    cfg, path = make_config(tmp_path)
    assert not os.path.exists(cfg.state_dir)
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/offer", "QUERY_STRING": "",
           "REMOTE_ADDR": V4, "SERVER_ADDR": V4, "MICROBROKER_CONFIG": path}
    for _ in range(2):
        r = subprocess.run([sys.executable, "-I", "-S", "-c", CGI_BOOT],
                           env=env, capture_output=True, timeout=60)
        assert r.stdout.startswith(b"Status: 200 OK\r\n"), r.stdout
        assert r.stderr == b"", r.stderr
        assert os.path.exists(os.path.join(cfg.state_dir, "sweep.stamp"))


def test_cgi_last_resort_answer(monkeypatch):
    import io
    from microbroker import cgi as mbcgi

    def broken(*a, **kw):
        raise RuntimeError("bug")
    monkeypatch.setattr(mbconfig, "load", broken)
    for query, status in (("", b"Status: 500"), ("format=sh", b"Status: 200")):
        out = io.BytesIO()
        assert mbcgi.main({"QUERY_STRING": query}, io.BytesIO(), out) == 0
        head, _, body = out.getvalue().partition(b"\r\n\r\n")
        assert head.startswith(status)
        assert b"internal" in body and b"bug" not in body
