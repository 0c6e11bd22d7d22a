"""Network-namespace helpers for the kernel tests (run as root in the VM)."""

import contextlib
import ctypes
import os
import shutil
import subprocess
import time

CLONE_NEWNET = 0x40000000
A6, B6 = "fc00::1", "fc00::2"     # the two ends of conftest's `pair`
_libc = None


def setns(fd):
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)
        return
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@contextlib.contextmanager
def inside(name):
    """Run the block with this thread in netns `name`; sockets made there stay there."""
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    fd = os.open("/run/netns/%s" % name, os.O_RDONLY)
    try:
        setns(fd)
        try:
            yield
        finally:
            setns(orig)
    finally:
        os.close(fd)
        os.close(orig)


def run(*argv, ns=None, check=True, timeout=60):
    """argv in netns ns, stdout as text; never a shell. `ip` and `bridge`
    switch namespaces themselves (-n): one process instead of two, which
    under emulation is most of a test's set-up time."""
    argv = [str(a) for a in argv]
    if ns and argv[0] in ("ip", "bridge") and argv[1:2] != ["netns"]:
        argv = [argv[0], "-n", ns] + argv[1:]
    elif ns:
        argv = ["ip", "netns", "exec", ns] + argv
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError("%s -> %d: %s%s" % (" ".join(argv), p.returncode, p.stdout,
                                                  p.stderr))
    return p.stdout if check else p


def ping(ns, addr, count=3, timeout=2):
    """busybox ping (iputils is not in the VM); True if any reply came."""
    bb = shutil.which("busybox") or "/bin/busybox"
    fam = "-6" if ":" in addr else "-4"
    p = run(bb, "ping", fam, "-c", count, "-W", timeout, addr, ns=ns, check=False,
            timeout=count * timeout + 10)
    return p.returncode == 0


def wait_for(pred, timeout=5.0, step=0.05):
    """Poll pred until true: L2TP deletes finish on a workqueue, not at once."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > end:
            return v
        time.sleep(step)


def _up(ns, dev, addr=None):
    """Address (nodad) and up, in-process: under emulation every `ip`
    process costs a good part of a second of set-up."""
    from microbroker import rtnl
    with inside(ns), rtnl.Rtnl() as rt:
        if addr:
            rt.add_address(dev, addr)
        rt.set_up(dev)


class Namespaces:
    """Creates namespaces with unique names and removes them all at the end."""

    counter = 0

    def __init__(self):
        self.names = []

    def add(self, label):
        Namespaces.counter += 1
        name = "mb%d%s%d" % (os.getpid() % 10000, label, Namespaces.counter)
        run("ip", "netns", "add", name)
        self.names.append(name)
        _up(name, "lo")
        return name

    def link(self, a, b, addr_a=None, addr_b=None, name_a="veth0", name_b="veth0"):
        """A veth pair between netns a and b, with optional nodad addresses."""
        # Both ends made in their namespaces at once: no name clashes with
        # test processes running beside this one.
        run("ip", "link", "add", name_a, "netns", a, "type", "veth", "peer", "name", name_b,
            "netns", b)
        _up(a, name_a, addr_a)
        _up(b, name_b, addr_b)

    def pair(self, addr_a, addr_b):
        """An exit ("x") and a client ("c") namespace joined by a veth."""
        a, b = self.add("x"), self.add("c")
        self.link(a, b, addr_a, addr_b)
        return a, b

    def exit_with_clients(self, n=2):
        """An exit and n clients, client i on its own veth: the exit's end
        up<i> with fc00:<i>::1/64, the client's veth0 with fc00:<i>::2/64.
        (exit, [clients])."""
        ex = self.add("x")
        clients = []
        for i in range(1, n + 1):
            c = self.add("c")
            self.link(ex, c, "fc00:%d::1/64" % i, "fc00:%d::2/64" % i, name_a="up%d" % i)
            clients.append(c)
        return ex, clients

    def cleanup(self):
        for name in reversed(self.names):
            run("ip", "netns", "del", name, check=False)
        self.names = []
