"""What several benchmarks set up the same way."""

import os
import shutil
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def package_copy(base=None, sourceless=False):
    """A copy of the package in a new directory (under base, or in memory
    where /dev/shm is), as it sits on an exit's own filesystem; the
    directory to put on sys.path. The source tree reaches the VM over 9p,
    where every file a start opens costs a round trip through the emulator.

    sourceless: legacy .pyc only, no sources, as the OpenWrt package
    installs it (Py3Package's CompileAll): an import reads one file and
    stats no source. Otherwise the sources with the tree's __pycache__."""
    if base is None and os.path.isdir("/dev/shm"):
        base = "/dev/shm"
    root = tempfile.mkdtemp(dir=base)
    dst = os.path.join(root, "microbroker")
    if not sourceless:
        shutil.copytree(os.path.join(ROOT, "microbroker"), dst)
        return root
    import compileall
    shutil.copytree(os.path.join(ROOT, "microbroker"), dst,
                    ignore=shutil.ignore_patterns("__pycache__"))
    if not compileall.compile_dir(dst, quiet=1, legacy=True):
        raise SystemExit("compileall failed on the copy in %s" % root)
    for top, _dirs, files in os.walk(dst):
        for f in files:
            if f.endswith(".py"):
                os.unlink(os.path.join(top, f))
    return root


def exit_and_client(nss, tmp, config, exit6):
    """An exit and a client namespace on one veth (exit6/64 and
    fc00:1::2/64), and the exit's config written to tmp/microbroker from
    `config` with its state in tmp/state: (exit ns, client ns, config path)."""
    ex, cl = nss.add("x"), nss.add("c")
    nss.link(ex, cl, exit6 + "/64", "fc00:1::2/64")
    path = os.path.join(tmp, "microbroker")
    with open(path, "w") as f:
        f.write(config % {"state": os.path.join(tmp, "state"), "exit": exit6})
    return ex, cl, path
