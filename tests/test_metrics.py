"""GET /metrics (metrics.py): Prometheus text read by prometheus_client's
own parser, access by metrics_allow, counters shared by CGI processes."""

import os
import subprocess
import sys
import threading

import pytest

from microbroker import config as mbconfig
from microbroker import linefile, metrics, web

parser = pytest.importorskip("prometheus_client.parser",
                             reason="tests/setup installs prometheus_client")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """
config broker
	option state_dir '%(state)s'
	option dataplane 'none'
	option max_leases '50'
%(extra)s
config service 'a'
	option capacity '10'
config service 'b'
	option kind 'ip6gretap'
"""


def make(tmp_path, extra=""):
    path = tmp_path / "config"
    path.write_text(CONFIG % {"state": tmp_path / "state", "extra": extra})
    cfg = mbconfig.load(str(path))
    assert cfg.problems == []
    app = web.App(cfg)
    app.broker      # the state directory, where the counters live
    return path, app


def req(app, method, path, body=b"", remote="fc00::5"):
    headers = {"content-type": "application/x-www-form-urlencoded"} \
        if body else {}
    return app.handle(method, path, "", headers, body, remote, "fc00::1")


def scrape(app, remote="::1"):
    status, headers, body = req(app, "GET", "/metrics", remote=remote)
    assert status == 200, body
    assert dict(headers)["Content-Type"].startswith("text/plain; version=0.0.4")
    fams = {f.name: f for f in parser.text_string_to_metric_families(
        body.decode())}
    return fams


def value(fams, family, **labels):
    for s in fams[family].samples:
        if s.labels == labels and not s.name.endswith("_created"):
            return s.value
    raise KeyError((family, labels))


def test_scrape_parses_and_counts(tmp_path):
    _, app = make(tmp_path)
    st, _, body = req(app, "POST", "/lease", b"service=a")
    assert st == 200
    lease = __import__("json").loads(body)
    req(app, "POST", "/lease", b"service=b", remote="fc00::6")
    req(app, "POST", "/renew", ("lease_id=%s&secret=%s" % (
        lease["lease_id"], lease["secret"])).encode())
    req(app, "POST", "/lease", b"service=nope")          # unknown_service
    req(app, "GET", "/nowhere")                           # not_found
    req(app, "GET", "/nowhere")
    req(app, "POST", "/release", ("lease_id=%s&secret=%s" % (
        lease["lease_id"], lease["secret"])).encode())
    fams = scrape(app)
    assert fams["microbroker_leases"].type == "gauge"
    assert value(fams, "microbroker_leases", service="a", state="up") == 0
    assert value(fams, "microbroker_leases", service="b", state="up") == 1
    assert value(fams, "microbroker_capacity", service="a") == 10
    assert value(fams, "microbroker_capacity", service="b") == 50
    assert value(fams, "microbroker_leases_max") == 50
    assert fams["microbroker_grants"].type == "counter"
    assert value(fams, "microbroker_grants", service="a") == 1
    assert value(fams, "microbroker_grants", service="b") == 1
    assert value(fams, "microbroker_renews", service="a") == 1
    assert value(fams, "microbroker_releases") == 1
    assert value(fams, "microbroker_expiries") == 0
    assert value(fams, "microbroker_errors", code="unknown_service") == 1
    assert value(fams, "microbroker_errors", code="not_found") == 2
    assert value(fams, "microbroker_kernel_ok") == 1   # dataplane none


def test_expiries_are_counted(tmp_path):
    _, app = make(tmp_path)
    req(app, "POST", "/lease", b"service=a")
    b = app.broker
    b.clock = lambda: 1e12     # far in the future: everything expired
    gone = b.sweep()
    metrics.expired(app.config, gone)
    assert value(scrape(app), "microbroker_expiries") == 1


@pytest.mark.parametrize("remote, ok", [
    ("::1", True), ("127.0.0.1", True), ("::ffff:127.0.0.1", True),
    ("fc00::5", False), ("10.0.0.1", False)])
def test_loopback_only_by_default(tmp_path, remote, ok):
    _, app = make(tmp_path)
    st, _, body = req(app, "GET", "/metrics", remote=remote)
    assert st == (200 if ok else 403), body
    if not ok:
        assert b"metrics_allow" in body


def test_metrics_allow_option(tmp_path):
    _, app = make(tmp_path, "\tlist metrics_allow 'fd00:aa::/64'\n"
                  "\tlist allow 'fc00::/8'\n")
    assert req(app, "GET", "/metrics", remote="fd00:aa::9")[0] == 200
    assert req(app, "GET", "/metrics", remote="::1")[0] == 403
    # the client allow list does not apply to scrapers, nor the reverse
    assert req(app, "GET", "/offer", remote="fd00:aa::9")[0] == 403
    assert req(app, "POST", "/metrics", remote="fd00:aa::9")[0] == 405


def test_counters_add_up_over_cgi_processes_at_once(tmp_path):
    path, app = make(tmp_path)
    n = 12
    env = dict(os.environ, PYTHONPATH=ROOT, MICROBROKER_CONFIG=str(path),
               REQUEST_METHOD="GET", PATH_INFO="/nowhere",
               REMOTE_ADDR="fc00::9", SERVER_ADDR="fc00::1")
    procs = [subprocess.Popen([sys.executable, "-m", "microbroker", "cgi"],
                              env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(n)]
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert b"not_found" in out
    # and threads of one process (serve) at the same time
    threads = [threading.Thread(target=req, args=(app, "GET", "/x"))
               for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert value(scrape(app), "microbroker_errors", code="not_found") == 2 * n


def test_a_torn_stats_line_loses_only_its_own_count(tmp_path):
    _, app = make(tmp_path)
    req(app, "GET", "/x")
    p = metrics.stats_path(app.config)
    with open(p, "ab") as f:
        f.write(b"microbroker_err")       # killed mid-write
    assert metrics.read(p) == {'microbroker_errors_total{code="not_found"}': 1}
    req(app, "GET", "/x")                 # cuts that line off, then its own
    req(app, "GET", "/x")
    with open(p, "rb") as f:
        assert b"microbroker_err\n" not in f.read()
    assert value(scrape(app), "microbroker_errors", code="not_found") == 3
    # Cut inside its number: "... 25" as "... 2" counts nothing, not 2.
    with open(p, "ab") as f:
        f.write(b'microbroker_errors_total{code="not_found"} 2')
    req(app, "GET", "/x")
    assert value(scrape(app), "microbroker_errors", code="not_found") == 4


def test_counts_go_on_when_the_file_cannot_be_rewritten(tmp_path, monkeypatch):
    """A compaction that fails (its rename refused) leaves no temporary
    file, and the counts are still appended; a rewrite keeps mode 0600."""
    path = str(tmp_path / "leases.stats")
    n = metrics.COMPACT // 20

    def refuse(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(linefile.posix, "replace", refuse)
    for _ in range(n):
        metrics.count(path, "renews_total", "a")
    assert os.path.getsize(path) > metrics.COMPACT
    assert sorted(os.listdir(tmp_path)) == ["leases.stats", "leases.stats.lock"]
    assert metrics.read(path) == {'microbroker_renews_total{service="a"}': n}
    monkeypatch.undo()
    metrics.count(path, "renews_total", "a")
    assert os.path.getsize(path) < metrics.COMPACT          # rewritten now
    assert metrics.read(path) == {'microbroker_renews_total{service="a"}': n + 1}
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_counts_append_and_the_file_stays_small(tmp_path):
    """A count appends a line (no rename: the file stays the same inode);
    past COMPACT bytes the file is rewritten, one line a series, and the
    sums stay."""
    path = str(tmp_path / "leases.stats")
    metrics.count(path, "errors_total", "busy")
    inode = os.stat(path).st_ino
    metrics.count(path, "errors_total", "busy")
    metrics.count(path, "grants_total", "a", n=3)
    assert os.stat(path).st_ino == inode
    with open(path, "rb") as f:
        assert len(f.read().splitlines()) == 3
    n = metrics.COMPACT // 20
    for _ in range(n):
        metrics.count(path, "renews_total", "a")
        assert os.path.getsize(path) <= metrics.COMPACT
    with open(path, "rb") as f:
        assert len(f.read().splitlines()) < n     # rewritten on the way
    assert metrics.read(path) == {
        'microbroker_errors_total{code="busy"}': 2,
        'microbroker_grants_total{service="a"}': 3,
        'microbroker_renews_total{service="a"}': n}


def test_label_values_are_never_taken_from_outside(tmp_path):
    _, app = make(tmp_path)
    metrics.count(metrics.stats_path(app.config), "grants_total",
                  'x"} 1\nmicrobroker_evil 9')
    fams = scrape(app)
    assert "microbroker_evil" not in fams
    assert value(fams, "microbroker_grants") == 1    # counted, unlabelled


def test_a_held_stats_lock_drops_the_count_not_the_time(tmp_path):
    # A stopped process holding the counters' lock must not stall answers:
    # the count waits COUNT_WAIT, then is lost.
    import time
    path = str(tmp_path / "leases.stats")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1] + '.lock', os.O_RDWR | os.O_CREAT)\n"
        "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"), path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        t = time.monotonic()
        metrics.count(path, "errors_total", "busy")
        assert time.monotonic() - t < metrics.COUNT_WAIT + 1.0
        assert metrics.read(path) == {}
    finally:
        holder.kill()
        holder.wait()
    metrics.count(path, "errors_total", "busy")
    assert sum(metrics.read(path).values()) == 1
