"""The processes a shell script starts, from `strace -f -e trace=process`.

`traced(argv)` is the argv that writes such a trace; `Trace(path)` reads
it: every fork (fork, vfork, clone, clone3 that made a process, not a
thread) and every execve that succeeded, in the order strace wrote them,
with the process that made it; with `traced(argv, out, naps=True)` also
every poll or ppoll with a timeout above zero, as a "nap" event when it
began (a shell's `read -t`: BusyBox ash polls before each byte it reads,
with no timeout unless -t). `Trace.events(stop_at)` leaves out what
the processes of programs in stop_at did after their exec (a stand-in
script's own subshells are not the client's); `tally()` counts forks and
execs, the execs by program name; `Trace.parent` maps a pid to its
parent's.
"""

import collections
import os
import re
import shutil

STRACE = shutil.which("strace")

# "PID syscall(args) = RESULT", or the "<... syscall resumed>" half of a
# call strace printed in two parts when another process ran in between
_LINE = re.compile(r"^(\d+) +(?:<\.\.\. (\w+) resumed>|(\w+)\()(.*)$")
_RESULT = re.compile(r"\) += (-?\d+)(?: .*)?$")
_EXEC = re.compile(r'^"((?:[^"\\]|\\.)*)", \[((?:"(?:[^"\\]|\\.)*"(?:, )?)*)')
_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')
FORKS = ("fork", "vfork", "clone", "clone3")
CLONE_THREAD = "CLONE_THREAD"
POLLS = ("poll", "ppoll")
# the timeout: poll's third argument in ms, ppoll's a timespec
_POLL_MS = re.compile(r"^\[.*\], \d+, (-?\d+)")
_PPOLL_TS = re.compile(r"^\[.*\], \d+, \{tv_sec=(\d+), tv_nsec=(\d+)\}")


def traced(argv, out, naps=False):
    """argv run under strace, its process calls (and with naps, its polls)
    written to OUT."""
    calls = "process,poll,ppoll" if naps else "process"
    return [STRACE, "-f", "-qq", "-s", "256", "-e", "trace=" + calls,
            "-e", "signal=none", "-o", out] + list(argv)


def poll_timeout(rest):
    """A poll's or ppoll's timeout in ms from its arguments as strace
    prints them at entry; None if it has none (-1, NULL)."""
    m = _POLL_MS.match(rest)
    if m:
        return int(m.group(1)) if int(m.group(1)) >= 0 else None
    m = _PPOLL_TS.match(rest)
    if m:
        return int(m.group(1)) * 1000 + int(m.group(2)) // 1000000
    return None


Event = collections.namedtuple("Event", "kind pid child path argv")


class Trace:
    def __init__(self, path):
        self.list = []
        self.parent = {}    # pid -> the pid that forked it
        pending = {}    # pid -> (syscall, args so far) of an unfinished call
        with open(path) as f:
            for line in f:
                m = _LINE.match(line.rstrip("\n"))
                if not m:
                    continue
                pid, resumed, call, rest = m.groups()
                pid = int(pid)
                if call in POLLS:
                    # at its entry: a nap is seen while it lasts (strace
                    # writes the call before it returns)
                    t = poll_timeout(rest)
                    if t:
                        self.list.append(Event("nap", pid, None, None, [t]))
                    continue
                if resumed in POLLS:
                    continue
                if rest.endswith("<unfinished ...>"):
                    pending[pid] = (call, rest)
                    continue
                if resumed:
                    call, head = pending.pop(pid, (resumed, ""))
                    rest = head.replace("<unfinished ...>", "") + rest
                r = _RESULT.search(rest)
                if not r or int(r.group(1)) < 0:
                    continue
                if call in FORKS and CLONE_THREAD not in rest:
                    self.list.append(Event("fork", pid, int(r.group(1)),
                                           None, None))
                    self.parent[int(r.group(1))] = pid
                elif call == "execve":
                    e = _EXEC.match(rest)
                    if e:
                        argv = [a.encode().decode("unicode_escape")
                                for a in _ARG.findall(e.group(2))]
                        self.list.append(Event("exec", pid, None,
                                               e.group(1), argv))

    def events(self, stop_at=()):
        """The events in order, without those of processes that exec'd a
        path in stop_at (after that exec) and of their descendants. A
        child's lines can come before its parent's clone returns (strace
        writes that `resumed` later), so descent is from the whole trace's
        parent map, not from the fork events seen so far."""
        stopped = set()
        out = []
        for ev in self.list:
            if self._below(ev.pid, stopped):
                continue
            out.append(ev)
            if ev.kind == "exec" and os.path.realpath(ev.path) in stop_at:
                stopped.add(ev.pid)
        return out

    def _below(self, pid, stopped):
        """Is pid, or a process it descends from, in stopped?"""
        seen = set()
        while pid is not None and pid not in seen:
            if pid in stopped:
                return True
            seen.add(pid)
            pid = self.parent.get(pid)
        return False


def program(ev):
    """The name a counted exec goes by: a shell's script, else argv[0]."""
    argv = ev.argv or [ev.path]
    name = os.path.basename(argv[0])
    if name in ("sh", "busybox") and len(argv) > 2 and argv[1] == "sh":
        name = os.path.basename(argv[2])
    return name


def tally(events):
    """(forks, execs, Counter of exec'd programs); naps are neither."""
    forks = sum(1 for e in events if e.kind == "fork")
    execs = collections.Counter(program(e) for e in events if e.kind == "exec")
    return forks, sum(execs.values()), execs
