"""The processes a shell script starts, from `strace -f -e trace=process`.

`traced(argv)` is the argv that writes such a trace; `Trace(path)` reads
it: every fork (fork, vfork, clone, clone3 that made a process, not a
thread) and every execve that succeeded, in the order strace wrote them,
with the process that made it. `Trace.events(stop_at)` leaves out what
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


def traced(argv, out):
    """argv run under strace, its process calls written to OUT."""
    return [STRACE, "-f", "-qq", "-s", "256", "-e", "trace=process",
            "-e", "signal=none", "-o", out] + list(argv)


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
        path in stop_at (after that exec) and of their descendants."""
        stopped = set()
        out = []
        for ev in self.list:
            if ev.pid in stopped:
                if ev.kind == "fork":
                    stopped.add(ev.child)
                continue
            out.append(ev)
            if ev.kind == "exec" and os.path.realpath(ev.path) in stop_at:
                stopped.add(ev.pid)
        return out


def program(ev):
    """The name a counted exec goes by: a shell's script, else argv[0]."""
    argv = ev.argv or [ev.path]
    name = os.path.basename(argv[0])
    if name in ("sh", "busybox") and len(argv) > 2 and argv[1] == "sh":
        name = os.path.basename(argv[2])
    return name


def tally(events):
    """(forks, execs, Counter of exec'd programs)."""
    forks = sum(1 for e in events if e.kind == "fork")
    execs = collections.Counter(program(e) for e in events if e.kind == "exec")
    return forks, sum(execs.values()), execs
