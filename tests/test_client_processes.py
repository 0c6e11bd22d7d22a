"""The processes microbroker-client starts for one lease and one renew.

On a router's slow CPU a process start costs about as much as the exit's
answer, so a client storm is bounded by them: this counts, under strace,
every fork and exec of `run` against `serve` (`dataplane none`) with
OpenWrt's real uclient-fetch and BusyBox, bridged, with the beacon filter,
and holds them to a budget; and the same with BusyBox's own wget (as
bench/storm.py runs the clients), which here has no -T: the script times
its requests out itself. The stand-ins' own processes (tests/standins
scripts for ip and nft) are not counted, their exec is: one per `ip` the
client runs. A change that adds a process to either path fails here;
one that saves some lowers the budget.
"""

import os
import signal
import subprocess

import pytest

import owrt
import proccount
from frontdoors import ServeDoor
from standins.clientutil import STANDINS, Sandbox, wait_for

# Start-up and one lease up to its first nap: mkdir (the state directory)
# and mktemp; one ip for what the lease asks the kernel first (our L2TP
# ids, tunnels and sessions, which also tells that this ip has l2tp, and
# what has our interface's name: nothing); `wget --help` (its kind:
# uclient-fetch under the name wget; not for BusyBox's own); the offer
# and the lease; nft; one ip for the tunnel, session, MTU, MAC, bridge and
# up; mv of the state file; mkfifo (once a run) for the naps, which are
# `read -t` on it, and for the timeout of a wget without -T. mkdir,
# mktemp, mv and mkfifo are forks only here (this BusyBox runs them
# without an exec; OpenWrt's execs them).
LEASE = {"owrt": {"forks": 10, "execs": 6},
         "busybox-link": {"forks": 9, "execs": 5}}
# One renew: the fetch, one ip (link and session still there), mv of the
# state file (a fork only here); the nap starts nothing.
RENEW = {"forks": 3, "execs": 2}

CONFIG = """
config broker
	option dataplane 'none'
	option state_dir '%s'
	option sweep_interval '3600'

config service 'exit'
	option lifetime '600'
"""


def strace_problem():
    if not proccount.STRACE:
        return "strace is not installed (tests/setup installs it)"
    p = subprocess.run(proccount.traced(["true"], os.devnull),
                       capture_output=True, text=True)
    if p.returncode != 0:
        return "strace cannot trace here: %s" % p.stderr.strip()[:200]
    return ""


STRACE_PROBLEM = strace_problem()
pytestmark = pytest.mark.skipif(bool(STRACE_PROBLEM), reason=STRACE_PROBLEM)
FETCHERS = [pytest.param("owrt", marks=owrt.need("uclient-fetch"),
                         id="uclient-fetch"),
            pytest.param("busybox-link", id="busybox-wget")]


def is_nap(trace, ev):
    """The wait a run loop naps in between its requests: the loop's own
    `read -t` (a poll with a timeout), or a `sleep` it started (a
    watchdog's sleep is its subshell's)."""
    loop = trace.list[0].pid
    if ev.kind == "nap":
        # not the one-second slices that time out a wget without -T
        return ev.pid == loop and ev.argv[0] > 1000
    return ev.kind == "exec" and ev.argv[:1] == ["sleep"] and \
        trace.parent.get(ev.pid) == loop


def segments(trace, events):
    """The events up to and including each nap, in order."""
    out, cur = [], []
    for ev in events:
        if ev.kind == "nap" and not is_nap(trace, ev):
            continue
        cur.append(ev)
        if is_nap(trace, ev):
            out.append(cur)
            cur = []
    return out


def fetches(events):
    """The paths the fetches asked for."""
    return ["/" + ev.argv[-1].split("/", 3)[-1].split("?")[0]
            for ev in events if ev.kind == "exec" and "-O" in ev.argv]


def show(events):
    forks, execs, progs = proccount.tally(events)
    naps = sum(1 for e in events if e.kind == "nap")
    return "%d forks, %d execs, %d naps: %s" % (forks, execs, naps, ", ".join(
        "%s %d" % kv for kv in sorted(progs.items())))


@pytest.mark.parametrize("fetch", FETCHERS)
def test_one_lease_and_one_renew_within_their_process_budget(tmp_path,
                                                             fetch):
    cfg = tmp_path / "microbroker"
    cfg.write_text(CONFIG % (tmp_path / "exit"))
    door = ServeDoor(str(cfg))
    box = Sandbox(tmp_path / "client", fetch=fetch)
    box.add_link("br-lan")
    host, port = door.port_for(6)
    trace = str(tmp_path / "trace")
    argv = proccount.traced(box.argv("-s", "http://[%s]:%d" % (host, port),
                                     "-b", "br-lan", "run"), trace, naps=True)
    proc = subprocess.Popen(argv, env=box.env, cwd=box.tmp,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    stop_at = {os.path.realpath(os.path.join(STANDINS, "bin", f))
               for f in os.listdir(os.path.join(STANDINS, "bin"))}

    def naps():
        if not os.path.exists(trace):
            return 0
        t = proccount.Trace(trace)
        return sum(1 for ev in t.events(stop_at) if is_nap(t, ev))
    try:
        assert wait_for(lambda: naps() >= 1 or proc.poll() is not None)
        pidfile = os.path.join(box.state, "mb0.pid")
        with open(pidfile) as f:
            loop = int(f.read())
        for n in (2, 3):
            os.kill(loop, signal.SIGUSR1)   # netifd's renew: at once
            assert wait_for(lambda: naps() >= n or proc.poll() is not None)
        os.kill(loop, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        door.close()
    assert "renewing every" in err, err
    t = proccount.Trace(trace)
    first, *renews = segments(t, t.events(stop_at))
    # the client itself is the trace's first exec, not one of its processes
    assert first[0].kind == "exec" and "microbroker-client" in \
        " ".join(first[0].argv)
    lease = first[1:]
    assert len(renews) == 2, [show(r) for r in renews]
    assert [fetches(lease), proccount.tally(lease)[2]["nft"]] == [
        ["/offer", "/lease"], 1], show(lease)
    for r in renews:
        forks, execs, _ = proccount.tally(r)
        assert fetches(r) == ["/renew"], show(r)
        assert forks <= RENEW["forks"] and execs <= RENEW["execs"], \
            "renew: " + show(r)
    forks, execs, _ = proccount.tally(lease)
    budget = LEASE[fetch]
    assert forks <= budget["forks"] and execs <= budget["execs"], \
        "lease: " + show(lease)


def test_trace_leaves_out_a_stand_ins_child_written_before_its_clone(tmp_path):
    """strace may write a child's exec before its parent's clone returns:
    that child is still the stand-in's, not the client's."""
    trace = tmp_path / "trace"
    trace.write_text(
        '10 clone(child_stack=NULL, flags=SIGCHLD) = 11\n'
        '11 execve("/sb/nft", ["nft", "-f", "-"], 0x1 /* 8 vars */) = 0\n'
        '11 clone(child_stack=NULL, flags=SIGCHLD <unfinished ...>\n'
        '12 execve("/proc/self/exe", ["cat"], 0x1 /* 8 vars */) = 0\n'
        '11 <... clone resumed>, child_tidptr=0x1) = 12\n'
        '10 clone(child_stack=NULL, flags=SIGCHLD) = 13\n'
        '13 execve("/bin/ip", ["ip", "link"], 0x1 /* 8 vars */) = 0\n')
    events = proccount.Trace(str(trace)).events({"/sb/nft"})
    assert proccount.tally(events)[2] == {"nft": 1, "ip": 1}
