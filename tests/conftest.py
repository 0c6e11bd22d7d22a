import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)


def _kernel_ok():
    """Kernel tests run in the VM (MICROBROKER_VM=1), or as root where L2TP works."""
    if os.environ.get("MICROBROKER_VM") == "1":
        return True, ""
    if os.geteuid() != 0:
        return False, "needs root"
    from microbroker import l2tp
    ok, why = l2tp.available()
    return ok, why


def pytest_collection_modifyitems(config, items):
    # By marker, not keyword: keywords hold the directory names too (a
    # checkout in a directory called "kernel" would skip every test).
    if not any(item.get_closest_marker("kernel") for item in items):
        return
    ok, why = _kernel_ok()
    if ok:
        return
    skip = pytest.mark.skip(reason="kernel test (%s): run it in the VM with tests/vm/run, "
                                   "as the README's test command does" % why)
    for item in items:
        if item.get_closest_marker("kernel"):
            item.add_marker(skip)


@pytest.fixture
def netns():
    """Fresh namespaces for one test, all removed after it."""
    from nsutil import Namespaces
    n = Namespaces()
    yield n
    n.cleanup()


@pytest.fixture
def pair(netns):
    """Two namespaces joined by a veth, nsutil.A6/64 and B6/64 (exit, client)."""
    from nsutil import A6, B6
    return netns.pair(A6 + "/64", B6 + "/64")
