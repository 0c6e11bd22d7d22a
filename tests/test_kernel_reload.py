"""SIGHUP in `serve` with the kernel dataplane (in the VM): a new lifetime
applies without touching the live tunnel; a reshaped service's lease is
torn down in the kernel."""

import json
import re
import signal
import sys

import pytest

from nsutil import ping, run, wait_for
from test_kernel_client import EXIT_BR, URL, make_world

pytestmark = pytest.mark.kernel


# The shared world's 40 s lifetime, overridden (the last option wins):
# these tests never renew before the reload, and under a loaded VM the
# steps from `up` to the SIGHUP took longer than 40 s.
LONG = "\toption lifetime '300'\n"


@pytest.fixture
def world(netns, tmp_path):
    yield from make_world(netns, tmp_path, LONG)


def link_of(ns, ifname):
    """(ifindex, tunnel ids) of the exit's session interface."""
    line = run("ip", "-o", "link", "show", ifname, ns=ns)
    return int(line.split(":")[0])


def hup(exit_, needle):
    n = len(exit_.log())
    exit_.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: needle in exit_.log()[n:] or
                    exit_.proc.poll() is not None, timeout=60, step=0.2), \
        exit_.log()[n:]
    assert exit_.proc.poll() is None, exit_.log()
    return exit_.log()[n:]


def leases(exit_):
    out = run(sys.executable, "-m", "microbroker", "-c", exit_.config,
              "leases", "--json", ns=exit_.ns)
    return json.loads(out)["leases"]


def test_sighup_changes_the_lifetime_and_leaves_the_tunnel(world):
    exit_, client = world
    client.run("-s", URL, "up")
    client.address()
    assert ping(client.ns, EXIT_BR)
    ifname = exit_.session_ifname()
    before = (link_of(exit_.ns, ifname), exit_.tunnels())
    (row,) = leases(exit_)
    assert row["expires_in"] <= 300

    with open(exit_.config) as f:
        text = f.read()
    with open(exit_.config, "w") as f:
        f.write(text.replace(LONG, "\toption lifetime '900'\n"))
    out = hup(exit_, "reloaded")
    assert "changed exit" in out and "0 lease(s) ended" in out

    client.run("-s", URL, "renew")
    (row2,) = leases(exit_)
    assert row2["lease_id"] == row["lease_id"]
    assert 800 < row2["expires_in"] <= 900
    # the same interface (same ifindex), the same tunnel, still carrying
    assert (link_of(exit_.ns, ifname), exit_.tunnels()) == before
    assert ping(client.ns, EXIT_BR)
    assert "reconcile" not in out or "rebuilt" not in out
    assert "ended" not in out.replace("0 lease(s) ended", "")
    # a counter of the broker's kernel work: nothing was built again
    assert len(re.findall(r"lease \S+ granted", exit_.log())) == 1


def test_sighup_ends_a_reshaped_services_lease_in_the_kernel(world):
    exit_, client = world
    client.run("-s", URL, "up")
    assert exit_.session_ifname()
    with open(exit_.config) as f:
        text = f.read()
    with open(exit_.config, "w") as f:
        f.write(text.replace("option bridge 'br-exit'",
                             "option bridge 'br-exit'\n\toption mtu '1300'"))
    out = hup(exit_, "reloaded")
    assert "reshaped exit" in out and "1 lease(s) ended" in out
    assert wait_for(lambda: not exit_.tunnels().strip(), timeout=30), \
        exit_.tunnels()
    assert leases(exit_) == []
