"""Helpers for the tests of microbroker-client (host and VM).

`Sandbox` gives the client a PATH of BusyBox applets only (as on OpenWrt;
no `timeout`, no GNU tools), plus the stand-ins from tests/standins/bin for
`ip`, `nft`, `ebtables`, `ubus` and `logger` that keep a fake kernel in
files and log every call. `CannedBroker` is a tiny HTTP server answering
in microbroker's shell format, from answers the test gives it.
"""

import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse

import nsutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CLIENT = os.path.join(ROOT, "client", "microbroker-client")
STANDINS = HERE
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
GNU_WGET = "/usr/bin/wget"
FAKES = ("ip", "nft", "ebtables", "ubus", "logger")
# BusyBox applets the client must not count on: OpenWrt builds lack them,
# or the stand-ins replace them.
NOT_ON_OPENWRT = {"timeout", "wget", "ip", "ipneigh", "logger"}


def sh_answer(**kv):
    return "".join("%s='%s'\n" % (k, v) for k, v in kv.items())


def lease_answer(fields=None, secret=True, **over):
    """A lease as the broker answers it, from the client's side; the ids
    the client proposed are echoed."""
    fields = fields or {}
    tid = fields.get("tunnel_id", "4000")
    sid = fields.get("session_id", "4000")
    d = dict(STATUS="200", ERROR="", LEASE_ID="0123456789abcdef")
    if secret:
        d["SECRET"] = "0123456789abcdef0123456789abcdef"
    d.update(SERVICE="exit", KIND="l2tpv3", ENCAP="ip", LOCAL="fc00::2",
             REMOTE="fc00::1", TUNNEL_ID=tid, PEER_TUNNEL_ID="7",
             SESSION_ID=sid, PEER_SESSION_ID="70", MTU="1280",
             IFNAME="mb-exit", MAC="", LIFETIME="600", RENEW_INTERVAL="120",
             EXPIRES=str(int(time.time()) + 600), STATE="up")
    d.update(over)
    return sh_answer(**d)


def gre_lease_answer(fields=None, secret=True, **over):
    """An ip6gretap lease: the key the client proposed (tunnel_id) is the
    one it receives with (IKEY); the exit's own is OKEY."""
    fields = fields or {}
    d = dict(STATUS="200", ERROR="", LEASE_ID="0123456789abcdef")
    if secret:
        d["SECRET"] = "0123456789abcdef0123456789abcdef"
    d.update(SERVICE="gre", KIND="ip6gretap", ENCAP="ip", LOCAL="fc00::2",
             REMOTE="fc00::1", IKEY=fields.get("tunnel_id", "4000"),
             OKEY="7", MTU="1280", IFNAME="mb-gre", MAC="02:6d:62:00:00:07",
             PREFIX="", IPV4="", IPV4_GATEWAY="", LIFETIME="600",
             RENEW_INTERVAL="120", EXPIRES=str(int(time.time()) + 600),
             STATE="up")
    d.update(over)
    return sh_answer(**d)


TNL_ADDRESSES = dict(IPV4="198.51.100.16", IPV6="fd00:beef::1",
                     PREFIX="fd00:beef::/64")


def tnl_lease_answer(fields=None, secret=True, **over):
    """An ip6tnl lease (routed, layer 3): no ids, keys or MAC; our own
    addresses and a routed prefix."""
    d = dict(STATUS="200", ERROR="", LEASE_ID="0123456789abcdef")
    if secret:
        d["SECRET"] = "0123456789abcdef0123456789abcdef"
    d.update(SERVICE="tnl", KIND="ip6tnl", ENCAP="ip", LOCAL="fc00::2",
             REMOTE="fc00::1", MTU="1280", IFNAME="mb-tnl", MAC="",
             IPV4_GATEWAY="", LIFETIME="600", RENEW_INTERVAL="120",
             EXPIRES=str(int(time.time()) + 600), STATE="up",
             **TNL_ADDRESSES)
    d.update(over)
    return sh_answer(**d)


KIND_ANSWERS = {"l2tpv3": lease_answer, "ip6gretap": gre_lease_answer,
                "ip6tnl": tnl_lease_answer}
# the lease fields a client may send per kind, as the broker checks them
KIND_IDS = {"l2tpv3": {"tunnel_id", "session_id"},
            "ip6gretap": {"tunnel_id"}, "ip6tnl": set()}


def error_answer(code, status, message="", retry_after=None):
    d = dict(STATUS=str(status), ERROR=code, MESSAGE=message)
    if retry_after is not None:
        d["RETRY_AFTER"] = str(retry_after)
    return sh_answer(**d)


def offer_answer(services, name="exit", kernel="1"):
    """services: {name: (capacity, used)} or {name: (capacity, used,
    kind)}; the kind defaults to l2tpv3."""
    d = dict(STATUS="200", ERROR="", BROKER_NAME=name,
             BROKER_SOFTWARE="microbroker", BROKER_VERSION="0.1.0",
             BROKER_API="1", KERNEL=kernel, KERNEL_REASON="",
             LEASES_USED=str(sum(s[1] for s in services.values())),
             LEASES_MAX="256", SERVICES=" ".join(services))
    for svc, spec in services.items():
        cap, used = spec[:2]
        kind = spec[2] if len(spec) > 2 else "l2tpv3"
        d.update({
            "SVC_%s_KIND" % svc: kind,
            "SVC_%s_LAYER" % svc: "3" if kind == "ip6tnl" else "2",
            "SVC_%s_ENCAP" % svc: "ip",
            "SVC_%s_FAMILY" % svc: "6", "SVC_%s_MTU" % svc: "1280",
            "SVC_%s_LIFETIME" % svc: "600", "SVC_%s_CAPACITY" % svc: str(cap),
            "SVC_%s_USED" % svc: str(used),
            "SVC_%s_FREE" % svc: str(max(0, cap - used)),
            "SVC_%s_TOKEN" % svc: "0", "SVC_%s_TEXT" % svc: "",
        })
    return sh_answer(**d)


class Request:
    def __init__(self, method, path, fields, ctype, query=None,
                 chunked=False):
        self.method, self.path, self.fields, self.ctype = \
            method, path, fields, ctype
        self.query = query or {}
        self.chunked = chunked
        self.at = time.time()

    def __repr__(self):
        return "%s %s %r" % (self.method, self.path, self.fields)


class CannedBroker:
    """HTTP on [::1] answering from per-path queues: an answer is a string
    (status 200), a (status, body) pair, "hang" (never answers) or a
    callable(fields) returning one of those. The last answer of a queue
    repeats."""

    def __init__(self):
        self.requests = []
        self.answers = {}
        self.lock = threading.Lock()
        broker = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):
                pass

            def _serve(self, method):
                url = urllib.parse.urlsplit(self.path)
                fields = dict(urllib.parse.parse_qsl(url.query,
                                                     keep_blank_values=True))
                body = self._body()
                if body:
                    fields.update(urllib.parse.parse_qsl(
                        body.decode(), keep_blank_values=True))
                req = Request(method, url.path, fields,
                              self.headers.get("Content-Type", ""),
                              dict(urllib.parse.parse_qsl(url.query)),
                              "chunked" in self.headers.get(
                                  "Transfer-Encoding", ""))
                with broker.lock:
                    broker.requests.append(req)
                    queue = broker.answers.get(url.path) or \
                        [(404, "not found\n")]
                    answer = queue.pop(0) if len(queue) > 1 else queue[0]
                if callable(answer):
                    answer = answer(fields)
                if answer == "hang":
                    time.sleep(30)
                    return
                status, text = answer if isinstance(answer, tuple) else \
                    (200, answer)
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self):
                """A Content-Length body, or a chunked one (uclient-fetch)."""
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    body = b""
                    while True:
                        n = int(self.rfile.readline().split(b";")[0], 16)
                        if not n:
                            self.rfile.readline()
                            return body
                        body += self.rfile.read(n)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

        class Server(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET6
            daemon_threads = True

        self.server = Server(("::1", 0), Handler)
        self.url = "http://[::1]:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def set(self, path, *answers):
        with self.lock:
            self.answers[path] = list(answers)

    def seen(self, path=None, method=None):
        with self.lock:
            return [r for r in self.requests
                    if (path is None or r.path == path)
                    and (method is None or r.method == method)]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def standard_answers(broker, kind="l2tpv3", **lease_over):
    """Offer, lease, renew, release and status of one lease of a service
    of KIND; renew and status give the ids the client proposed in its last
    lease.  A lease request with fields its kind does not take is answered
    bad_request, as the broker does."""
    ids = {}
    answer = KIND_ANSWERS[kind]
    svc = {"l2tpv3": "exit", "ip6gretap": "gre", "ip6tnl": "tnl"}[kind]

    def lease(f):
        extra = {"tunnel_id", "session_id"} & set(f) - KIND_IDS[kind]
        if extra:
            return error_answer("bad_request", 400, "%s does not apply to "
                                "kind %s" % (min(extra), kind))
        ids.update(tunnel_id=f.get("tunnel_id", "4000"),
                   session_id=f.get("session_id", "4000"))
        return answer(f, **lease_over)

    def again(**extra):
        return lambda f: answer(dict(ids), secret=False,
                                **dict(lease_over, **extra))

    broker.set("/offer", offer_answer({svc: (64, 1, kind)}))
    broker.set("/lease", lease)
    broker.set("/renew", again())
    broker.set("/release", sh_answer(STATUS="200", ERROR="", RELEASED="1",
                                     LEASE_ID="0123456789abcdef"))
    broker.set("/status", again(RX_PACKETS="5", RX_BYTES="500",
                                TX_PACKETS="6", TX_BYTES="600"))
    return ids


class Sandbox:
    """One client's world: PATH, fake kernel, state dir, call log."""

    def __init__(self, tmp, fetch="busybox"):
        self.tmp = str(tmp)
        self.bin = os.path.join(self.tmp, "bin")
        self.fake = os.path.join(self.tmp, "kernel")
        self.state = os.path.join(self.tmp, "state")
        self.tmpdir = os.path.join(self.tmp, "tmp")
        self.logfile = os.path.join(self.tmp, "calls.log")
        for d in (self.bin, self.fake, self.tmpdir):
            os.makedirs(d)
        applets = subprocess.run([BUSYBOX, "--list"], stdout=subprocess.PIPE,
                                 text=True, check=True).stdout.split()
        for a in applets:
            if a not in NOT_ON_OPENWRT and a not in FAKES:
                os.symlink(BUSYBOX, os.path.join(self.bin, a))
        for f in FAKES:
            os.symlink(os.path.join(STANDINS, "bin", f),
                       os.path.join(self.bin, f))
        self.fetch = fetch
        if fetch == "uclient":
            os.symlink(os.path.join(STANDINS, "bin", "uclient-fetch"),
                       os.path.join(self.bin, "uclient-fetch"))
        elif fetch == "owrt":
            # OpenWrt's real uclient-fetch, as a router has it: `wget`, in
            # a directory of its own first on PATH (its neighbours in
            # owrt.PREFIX/bin, real ubus among them, stay out)
            import owrt
            first = os.path.join(self.tmp, "owrt-bin")
            os.makedirs(first)
            os.symlink(os.path.join(owrt.PREFIX, "bin", "wget"),
                       os.path.join(first, "wget"))
        elif fetch == "busybox-link":
            # BusyBox's own wget applet, unlogged (bench/storm.py's)
            os.symlink(BUSYBOX, os.path.join(self.bin, "wget"))
        elif fetch in ("busybox", "gnu"):
            real = "busybox wget" if fetch == "busybox" else GNU_WGET
            self.write_bin("wget", '#!%s sh\nline=wget\nfor a in "$@"; do '
                           'line="$line\t$a"; done\necho "$line" >>"$STANDIN_LOG"\n'
                           'exec %s "$@"\n' % (BUSYBOX, real))
        self.env = {
            "PATH": (os.path.join(self.tmp, "owrt-bin") + ":" + self.bin
                     if fetch == "owrt" else self.bin),
            "FAKE_DIR": self.fake,
            "STANDIN_LOG": self.logfile, "TMPDIR": self.tmpdir,
            "NETIFD_MAIN_DIR": STANDINS, "HOME": self.tmp,
            # a proxy must not be used for the broker
            "http_proxy": "http://[::1]:9/",
        }

    def write_bin(self, name, text):
        p = os.path.join(self.bin, name)
        with open(p, "w") as f:
            f.write(text)
        os.chmod(p, 0o755)

    def argv(self, *args):
        return [BUSYBOX, "sh", CLIENT, "-d", self.state] + [str(a) for a in
                                                            args]

    def run(self, *args, check=True, env=None, timeout=120):
        e = dict(self.env, **(env or {}))
        p = subprocess.run(self.argv(*args), env=e, cwd=self.tmp,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError("client %s -> %d\nstdout: %s\nstderr: %s" % (
                " ".join(map(str, args)), p.returncode, p.stdout, p.stderr))
        return p

    def start(self, *args, env=None):
        e = dict(self.env, **(env or {}))
        return subprocess.Popen(self.argv(*args), env=e, cwd=self.tmp,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def calls(self, prog=None):
        """[(prog, args...)] in order, from the stand-ins' log."""
        if not os.path.exists(self.logfile):
            return []
        out = []
        with open(self.logfile) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) > 1 or parts[0] in FAKES + ("wget",
                                                         "uclient-fetch"):
                    if prog is None or parts[0] == prog:
                        out.append(tuple(parts))
        return out

    def netifd_calls(self):
        """The proto_* calls the netifd stand-ins logged, in order."""
        return [c for c in self.calls() if c[0].startswith("proto_")]

    def ip_calls(self, *prefix):
        return [c[1:] for c in self.calls("ip") if c[1:1 + len(prefix)] ==
                prefix]

    def kernel(self):
        """The fake kernel: file names under FAKE_DIR, with contents."""
        out = {}
        for name in sorted(os.listdir(self.fake)):
            with open(os.path.join(self.fake, name)) as f:
                out[name] = f.read()
        return out

    def add_link(self, name):
        with open(os.path.join(self.fake, "link." + name), "w") as f:
            f.write("mtu 1500 state UP\n")

    def state_files(self):
        if not os.path.isdir(self.state):
            return []
        return sorted(os.listdir(self.state))

    def read_state(self, ifname="mb0"):
        d = {}
        with open(os.path.join(self.state, ifname + ".state")) as f:
            for line in f:
                k, _, v = line.rstrip("\n").partition("=")
                d[k] = v.strip("'")
        return d


def wait_for(pred, timeout=60.0, step=0.05):
    """nsutil.wait_for with the longer default a client's loop needs."""
    return nsutil.wait_for(pred, timeout, step)
