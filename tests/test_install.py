"""`pip install` into a fresh venv, offline: the wheel is built with
Debian's setuptools (`pip wheel --no-build-isolation`), installed with
`--no-index`, and the installed `microbroker` serves an offer. The sdist
carries what the tests and packages need; the systemd unit passes
`systemd-analyze verify` and its ExecReload really reloads."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request

import pytest

from frontdoors import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_PY = "/usr/bin/python3"
UNIT = os.path.join(ROOT, "systemd", "microbroker.service")
UNIT_BIN = "/opt/microbroker/bin/microbroker"


def _can_build():
    if not os.access(SYSTEM_PY, os.X_OK):
        return "no %s" % SYSTEM_PY
    p = subprocess.run([SYSTEM_PY, "-c", "import setuptools, wheel, venv, "
                        "ensurepip"], capture_output=True)
    if p.returncode:
        return "Debian's python3-setuptools, python3-wheel, python3-venv " \
               "are missing (tests/setup installs them)"
    return ""


pytestmark = pytest.mark.skipif(bool(_can_build()), reason=_can_build())


def copy_tree(dest):
    """The source as a checkout has it (no venv, caches or builds)."""
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "*.egg-info", "build", "dist",
        ".pytest_cache"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("install")
    src, whl, venv = base / "src", base / "whl", base / "venv"
    copy_tree(src)
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    p = subprocess.run([SYSTEM_PY, "-m", "pip", "wheel", "--no-build-isolation",
                        "--no-deps", "-w", str(whl), str(src)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    wheels = list(whl.glob("microbroker-*.whl"))
    assert len(wheels) == 1
    subprocess.run([SYSTEM_PY, "-m", "venv", str(venv)], check=True,
                   timeout=300)
    p = subprocess.run([str(venv / "bin" / "pip"), "install", "--no-index",
                        "--no-deps", str(wheels[0])], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return {"src": src, "venv": venv, "wheel": wheels[0], "env": env,
            "bin": str(venv / "bin" / "microbroker")}


def test_console_script_runs_from_the_venv(installed, tmp_path):
    env = installed["env"]
    p = subprocess.run([installed["bin"], "-h"], capture_output=True,
                       text=True, cwd=str(tmp_path), env=env)
    assert p.returncode == 0 and "usage: microbroker" in p.stdout
    p = subprocess.run([installed["bin"], "leases", "-h"],
                       capture_output=True, text=True, cwd=str(tmp_path),
                       env=env)
    assert p.returncode == 0 and "usage: microbroker leases" in p.stdout
    # the installed package, not the checkout
    py = str(installed["venv"] / "bin" / "python")
    where = subprocess.run([py, "-c", "import microbroker; print("
                            "microbroker.__file__)"], capture_output=True,
                           text=True, cwd=str(tmp_path), env=env).stdout
    assert where.startswith(str(installed["venv"]))


def test_data_files_are_installed(installed):
    share = installed["venv"] / "share"
    for rel in ("microbroker/client/microbroker-client",
                "microbroker/client/microbroker.sh",
                "microbroker/systemd/microbroker.service",
                "microbroker/init.d/microbroker",
                "microbroker/openwrt/microbroker.config",
                "microbroker/openwrt/microbroker.cgi",
                "microbroker/debian/microbroker.config",
                "microbroker/debian/hook.example",
                "doc/microbroker/README.md", "doc/microbroker/debian.md",
                "doc/microbroker/api.md"):
        assert (share / rel).is_file(), rel


def start_serve(argv, tmp_path, env):
    log = open(tmp_path / "serve.log", "w")
    p = subprocess.Popen(argv, cwd=str(tmp_path), env=env, stdout=log,
                         stderr=log)
    log.close()
    return p


def read_log(tmp_path):
    return (tmp_path / "serve.log").read_text()


def wait_log(tmp_path, p, needle, after=0, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        if needle in read_log(tmp_path)[after:]:
            return True
        time.sleep(0.05)
    return needle in read_log(tmp_path)[after:]


def fetch(port, path="/offer"):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open("http://[::1]:%d%s" % (port, path), timeout=10) as r:
        return r.status, r.read()


def test_installed_serve_answers_an_offer(installed, tmp_path):
    port = free_port("::1")
    p = start_serve([installed["bin"], "serve", "--dataplane", "none",
                     "--state-dir", str(tmp_path / "state"), "--listen",
                     "[::1]:%d" % port], tmp_path,
                    dict(installed["env"], HOME=str(tmp_path)))
    try:
        assert wait_log(tmp_path, p, "listening on"), read_log(tmp_path)
        # A server that never speaks TLS does not load OpenSSL (__main__).
        with open("/proc/%d/maps" % p.pid) as f:
            assert "libssl" not in f.read()
        status, body = fetch(port)
        offer = json.loads(body)
        assert status == 200 and offer["broker"]["software"] == "microbroker"
        assert "default" in offer["services"]
        status, body = fetch(port, "/metrics")
        assert status == 200 and b"microbroker_leases" in body
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0


def test_sdist_carries_what_the_tests_and_packages_need(installed, tmp_path):
    out = tmp_path / "dist"
    p = subprocess.run([SYSTEM_PY, "-c", "import sys; from setuptools import "
                        "build_meta as b; print(b.build_sdist(sys.argv[1]))",
                        str(out)], cwd=str(installed["src"]),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    with tarfile.open(out / p.stdout.split()[-1]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for rel in ("pyproject.toml", "README.md", "LICENSE",
                "client/microbroker-client", "client/netifd/microbroker.sh",
                "systemd/microbroker.service", "init.d/microbroker",
                "debian/microbroker.config", "docs/debian.md",
                "openwrt/Makefile", "openwrt/files/microbroker.cgi",
                "tests/run", "tests/setup", "tests/vm/run",
                "tests/test_install.py", "microbroker/metrics.py"):
        assert rel in names, rel


def test_readme_keeps_its_two_setup_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        head = f.read().split("```")[1]
    lines = [l.split("#")[0].strip() for l in head.strip().splitlines()[1:]]
    assert lines == ["python3 -m microbroker serve", "tests/run"]


# ---------------------------------------------------------------- systemd

def unit_for(path_bin, dest):
    """The unit with its binary where this test installed it."""
    with open(UNIT) as f:
        text = f.read()
    assert UNIT_BIN in text
    dest.write_text(text.replace(UNIT_BIN, path_bin))
    return dest


def test_systemd_unit_verifies(installed, tmp_path):
    tool = shutil.which("systemd-analyze")
    if not tool:
        pytest.skip("no systemd-analyze (tests/setup installs Debian's "
                    "systemd package)")
    unit = unit_for(installed["bin"], tmp_path / "microbroker.service")
    p = subprocess.run([tool, "verify", str(unit)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    # and it would notice a broken one
    bad = tmp_path / "bad.service"
    bad.write_text(unit.read_text().replace("Type=exec", "Type=bogus")
                   .replace(installed["bin"], "/nonexistent/microbroker"))
    p = subprocess.run([tool, "verify", str(bad)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0 or p.stderr.strip()


def unit_lines(key):
    with open(UNIT) as f:
        return [l.split("=", 1)[1] for l in f.read().splitlines()
                if l.startswith(key + "=")]


def test_unit_exec_reload_really_reloads(installed, tmp_path):
    """Run the unit's ExecReload lines as systemd would ($MAINPID, the
    config path moved to a scratch file) against a running serve."""
    port = free_port("::1")
    config = tmp_path / "config"
    text = ("config broker\n\toption state_dir '%s'\n\toption dataplane "
            "'none'\n\tlist listen '[::1]:%d'\nconfig service 'exit'\n"
            "\toption lifetime '%%d'\n" % (tmp_path / "state", port))
    config.write_text(text % 600)
    env = dict(installed["env"], HOME=str(tmp_path))
    start = [w.replace(UNIT_BIN, installed["bin"]).replace(
        "/etc/microbroker/config", str(config))
        for w in shlex.split(unit_lines("ExecStart")[0])]
    p = start_serve(start, tmp_path, env)
    try:
        assert wait_log(tmp_path, p, "listening on"), read_log(tmp_path)
        config.write_text(text % 900)
        n = len(read_log(tmp_path))
        for line in unit_lines("ExecReload"):
            argv = [w.replace(UNIT_BIN, installed["bin"]).replace(
                "/etc/microbroker/config", str(config)).replace(
                "$MAINPID", str(p.pid)) for w in shlex.split(line)]
            r = subprocess.run(argv, capture_output=True, text=True, env=env)
            assert r.returncode == 0, (argv, r.stdout, r.stderr)
        assert wait_log(tmp_path, p, "reloaded", after=n), read_log(tmp_path)
        assert json.loads(fetch(port)[1])["services"]["exit"][
            "lifetime"] == 900
        # a broken config fails the first ExecReload line: no signal sent
        config.write_text(text % 900 + "\toption capacity 'lots'\n")
        check = [w.replace(UNIT_BIN, installed["bin"]).replace(
            "/etc/microbroker/config", str(config))
            for w in shlex.split(unit_lines("ExecReload")[0])]
        assert subprocess.run(check, capture_output=True,
                              env=env).returncode != 0
        assert p.poll() is None
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    # the stop bound covers the server's: timeout (10) + 2 s
    stop = unit_lines("TimeoutStopSec")
    assert stop and int(stop[0]) > 10 + 2


def test_debian_doc_marks_the_steps_its_vm_test_runs():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_kernel_debian import DOC, doc_steps
    with open(DOC) as f:
        steps = doc_steps(f.read())
    files = [p for k, p, _ in steps if k == "file"]
    assert files == ["/etc/modules-load.d/microbroker.conf",
                     "/etc/sysctl.d/90-microbroker.conf",
                     "/etc/nftables.d/exit.nft",
                     "/etc/dnsmasq.d/microbroker.conf"]
    runs = [b for k, _, b in steps if k == "run"]
    assert len(runs) == 1
    # every file the doc writes is used by a command it runs
    for path in files[:3]:
        assert path in runs[0]
    assert re.search(r"\bmodprobe\b", runs[0])
