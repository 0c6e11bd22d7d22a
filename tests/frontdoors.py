"""Both front doors as running services on loopback, for tests that talk
to them over real sockets (real uclient-fetch, hostile clients).

    with ServeDoor(config_path) as door:      # `serve`'s Server, in-process
        door.url("/offer")                    # http://127.0.0.1:PORT/offer
    with UhttpdDoor(tmp_path, config_path) as door:   # the CGI under real
        ...                                           # uhttpd (owrt.need)

`read_to_eof(sock)` and `trickle(sock, data)` for raw clients, and
`fetch(url, post=None)`, OpenWrt's real uclient-fetch as the client
script runs it (`wget -q -O - [--post-data DATA] URL`): (exit code,
stdout). uclient-fetch sends a POST body chunked with no Content-Length,
exits 8 and prints nothing on a non-2xx status.
"""

import os
import socket
import subprocess
import sys
import time

import owrt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port(host="127.0.0.1"):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam)
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def read_to_eof(sock):
    """Everything the peer sends until it closes (a reset counts as the
    end: a door that refused a request may close before reading it)."""
    out = []
    while True:
        try:
            c = sock.recv(65536)
        except ConnectionResetError:
            break
        if not c:
            break
        out.append(c)
    return b"".join(out)


def trickle(sock, data, until=float("inf")):
    """Send data a byte at a time (sock has a short timeout), looking for
    the door closing the connection after each, until data runs out or
    time.monotonic() passes `until`: the monotonic time it was closed,
    None if it was not."""
    for c in data:
        if time.monotonic() >= until:
            break
        try:
            sock.sendall(bytes([c]))
            if sock.recv(1) == b"":
                return time.monotonic()
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic()
    return None


def wait_listening(host, port, timeout=10.0, proc=None):
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError("exited with %d before listening"
                                   % proc.returncode)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class _Door:
    host = "127.0.0.1"
    port = 0

    def url(self, path="/", query=""):
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "http://%s:%d%s%s%s" % (host, self.port, self.prefix, path,
                                       "?" + query if query else "")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ServeDoor(_Door):
    """`serve`'s Server for a config file, on 127.0.0.1 and ::1 (one port
    each, ephemeral). .port is the IPv4 one; .bound all of them."""
    name = "serve"
    prefix = ""

    def __init__(self, config_path, listen=("127.0.0.1:0", "[::1]:0"),
                 overrides=()):
        from microbroker import config as mbconfig
        from microbroker import service as mbserver
        from microbroker import web
        cfg = mbconfig.load(config_path, overrides)
        assert cfg.problems == [], cfg.problems
        self.config = cfg
        self.app = web.App(cfg)
        self.server = mbserver.Server(self.app, list(listen))
        self.bound = self.server.start()
        self.host, self.port = self.bound[0]

    def port_for(self, family):
        for host, port in self.bound:
            if (":" in host) == (family == 6):
                return host, port
        raise LookupError("no IPv%d listener" % family)

    def close(self):
        self.server.stop()


def cgi_script(path, config_path, python=sys.executable):
    """A cgi-bin entry that runs microbroker.cgi's three lines with this
    checkout on the path. uhttpd clears the environment before it runs a
    CGI (its cgi.c), so MICROBROKER_CONFIG, the variable microbroker.cgi
    reads through config.load, is set by the script, as an operator's
    wrapper would on a router."""
    boot = ("import sys; sys.path.insert(0, %r); "
            "from microbroker.cgi import run; run()" % ROOT)
    with open(path, "w") as f:
        f.write("#!/bin/sh\nMICROBROKER_CONFIG='%s' exec '%s' -I -S -c "
                "\"%s\"\n" % (config_path, python, boot))
    os.chmod(path, 0o755)


class UhttpdDoor(_Door):
    """OpenWrt's real uhttpd with the CGI at /cgi-bin/microbroker, on a
    loopback port."""
    name = "uhttpd"
    prefix = "/cgi-bin/microbroker"

    def __init__(self, tmp_path, config_path, host="127.0.0.1"):
        why = owrt.missing("uhttpd")
        if why:
            import pytest
            pytest.skip(why)
        self.host = host
        root = os.path.join(str(tmp_path), "www")
        os.makedirs(os.path.join(root, "cgi-bin"), exist_ok=True)
        cgi_script(os.path.join(root, "cgi-bin", "microbroker"), config_path)
        self.log = open(os.path.join(str(tmp_path), "uhttpd.log"), "wb")
        for _ in range(5):   # a free port can be taken before we bind it
            self.port = free_port(host)
            listen = ("[%s]:%d" if ":" in host else "%s:%d") % (host,
                                                                self.port)
            self.proc = subprocess.Popen(
                [owrt.path("uhttpd"), "-f", "-p", listen, "-h", root,
                 "-x", "/cgi-bin", "-t", "30", "-T", "10"],
                stdin=subprocess.DEVNULL, stdout=self.log,
                stderr=subprocess.STDOUT)
            try:
                wait_listening(host, self.port, proc=self.proc)
                return
            except (OSError, RuntimeError):
                self._stop()
        raise RuntimeError("uhttpd would not start; see %s" % self.log.name)

    def _stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self):
        self._stop()
        self.log.close()


def fetch(url, post=None, timeout=30):
    """OpenWrt's real uclient-fetch: (exit code, stdout bytes)."""
    argv = [owrt.path("uclient-fetch"), "-q", "-O", "-"]
    if post is not None:
        argv += ["--post-data", post]
    r = subprocess.run(argv + [url], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=timeout)
    return r.returncode, r.stdout


def sh_answer(out):
    """KEY='value' lines -> dict, read the way the client script reads
    them (no eval)."""
    d = {}
    for line in out.decode("utf-8").splitlines():
        k, eq, v = line.partition("=")
        if eq and v.startswith("'") and v.endswith("'"):
            d[k] = v[1:-1]
    return d
