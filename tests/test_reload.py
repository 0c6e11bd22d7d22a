"""SIGHUP in `serve` (reload.py): the config is read again and applied in
place; leases of removed or reshaped services end, others stay."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from frontdoors import free_port
from microbroker import config as mbconfig
from microbroker import reload as mbreload
from microbroker import web

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = """
config broker
	option state_dir '%(state)s'
	option dataplane 'none'
	list listen '[::1]:%(port)d'
	option sweep_interval '3600'
config service 'a'
	option lifetime '%(lifetime)d'
config service 'b'
	option mtu '%(mtu)d'
config service 'c'
"""


OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Serve:
    """`microbroker serve` in a subprocess; its log lines collected."""

    def __init__(self, tmp_path, **kw):
        self.path = tmp_path / "config"
        self.vals = dict(state=tmp_path / "state", port=free_port("::1"),
                         lifetime=600, mtu=1280)
        self.write(**kw)
        self.lines = []
        self.cond = threading.Condition()
        self.p = subprocess.Popen(
            [sys.executable, "-m", "microbroker", "-c", str(self.path),
             "serve"], stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=ROOT))
        threading.Thread(target=self._read, daemon=True).start()
        self.port = self.vals["port"]
        self.wait_log("listening on")

    def write(self, text=None, **kw):
        self.vals.update(kw)
        self.path.write_text(text if text is not None else BASE % self.vals)

    def _read(self):
        for line in self.p.stderr:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def wait_log(self, needle, after=0, timeout=30):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[after:]:
                    if needle in line:
                        return line
                left = deadline - time.monotonic()
                assert left > 0 and self.p.poll() is None, \
                    "no %r in the log:\n%s" % (needle, "".join(self.lines))
                self.cond.wait(left)

    def hup(self, needle):
        n = len(self.lines)
        self.p.send_signal(signal.SIGHUP)
        return self.wait_log(needle, after=n)

    def post(self, path, **fields):
        data = "&".join("%s=%s" % kv for kv in fields.items()).encode()
        req = urllib.request.Request(
            "http://[::1]:%d%s" % (self.port, path), data=data,
            headers={"Content-Type": "application/x-www-form-urlencoded"})
        try:
            with OPENER.open(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        return self.p.wait(30)


@pytest.fixture
def serve(tmp_path):
    s = Serve(tmp_path)
    yield s
    if s.p.poll() is None:
        s.p.kill()
        s.p.wait()


def test_sighup_applies_a_new_lifetime_and_keeps_leases(serve):
    st, a = serve.post("/lease", service="a")
    assert st == 200 and a["lifetime"] == 600
    serve.write(lifetime=900)
    line = serve.hup("reloaded")
    assert "changed a" in line and "0 lease(s) ended" in line
    st, r = serve.post("/renew", lease_id=a["lease_id"], secret=a["secret"])
    assert st == 200 and r["lifetime"] == 900
    assert r["expires"] - time.time() > 800
    # the server is still the same process and still answers
    assert serve.p.poll() is None
    assert serve.stop() == 0


def test_sighup_ends_leases_of_removed_and_reshaped_services(serve):
    a = serve.post("/lease", service="a")[1]
    b = serve.post("/lease", service="b")[1]
    c = serve.post("/lease", service="c")[1]
    # b reshaped (its MTU), c removed, a unchanged
    serve.write(text=(BASE % dict(serve.vals, mtu=1400)).replace(
        "config service 'c'\n", ""))
    line = serve.hup("reloaded")
    assert "removed c" in line and "reshaped b" in line
    assert "2 lease(s) ended" in line
    assert serve.post("/status", lease_id=a["lease_id"],
                      secret=a["secret"])[0] == 200
    for gone in (b, c):
        st, e = serve.post("/status", lease_id=gone["lease_id"],
                           secret=gone["secret"])
        assert st == 404 and e["error"]["code"] == "not_found"
    st, o = serve.post("/offer")
    assert sorted(o["services"]) == ["a", "b"]
    assert o["services"]["b"]["mtu"] == 1400


def test_a_broken_config_keeps_the_running_one(serve):
    a = serve.post("/lease", service="a")[1]
    serve.write(text=BASE % serve.vals + "\toption capacity 'lots'\n")
    line = serve.hup("keeping the running one")
    assert "capacity" in line
    assert serve.post("/status", lease_id=a["lease_id"],
                      secret=a["secret"])[0] == 200
    assert sorted(serve.post("/offer")[1]["services"]) == ["a", "b", "c"]


def test_what_needs_a_restart_keeps_its_value(serve):
    serve.write(port=free_port("::1"))
    line = serve.hup("takes a restart")
    assert "listen" in line
    assert serve.post("/offer")[0] == 200     # still on the old port


def cfg(text):
    secs, pr = mbconfig.parse_uci(text)
    c = mbconfig.build(secs, pr, "/x", euid=0)
    assert c.problems == []
    return c


def test_diff_sorts_services_by_what_a_live_lease_can_follow():
    old = cfg("config service a\nconfig service b\nconfig service c\n"
              "config service d\n option restrict 'dns+web'\n")
    new = cfg("config service a\n option lifetime '900'\n"
              "config service b\n option kind 'ip6gretap'\n"
              "config service d\nconfig service e\n")
    added, removed, reshaped, changed, restart = mbreload.diff(old, new)
    assert (added, removed, reshaped, changed, restart) == (
        ["e"], ["c"], ["b", "d"], ["a"], [])


def test_reload_in_process_swaps_the_config_everywhere(tmp_path):
    path = tmp_path / "c"
    text = ("config broker\n option state_dir '%s'\n option dataplane "
            "'none'\n option max_leases '10'\nconfig service a\n"
            % (tmp_path / "s"))
    path.write_text(text)
    app = web.App(mbconfig.load(str(path)))
    b = app.broker
    path.write_text(text.replace("'10'", "'20'") + " option capacity '5'\n")
    report = mbreload.reload(app, lambda: mbconfig.load(str(path)))
    assert report["changed"] == ["a"]
    assert app.config is b.config and b.config.max_leases == 20
    assert b.store.max_leases == 20
    assert b.offer()["services"]["a"]["capacity"] == 5
