"""<path>.counts: how many leases there are, in total and per service.

One JSON line per change (linefile.py), appended by every store call that
makes or ends a lease, under the store's lock; the last complete line is
the counts, read by offers without any lock. A line a kill cut short is
never the last complete one, and the next write cuts it off; a last line
that does not parse makes the caller ask the store. Past COMPACT bytes
the file is rewritten as one line. The counts may lag one crashed call
behind.

A CGI offer reads nothing else of the store, so this module imports only
jsonlite and linefile.
"""

import posix

from microbroker import jsonlite, linefile

COMPACT = 16384     # bytes: past this the next write starts the file anew
_TAIL = 65536       # what read() looks at, from the end


def path_of(lease_path):
    return posix.fspath(lease_path) + ".counts"


_last = (None, None)     # (the file's stat key, its counts) of the last read


def read(path):
    """(total, {service: leases}) from the last complete line, or None when
    the file is missing or that line does not read as counts. A file
    unchanged since the last read (device, inode, size, mtime: an append
    grows it, a rewrite renames a new one in) costs one stat(), which
    matters to `serve`, whose every offer asks."""
    global _last
    try:
        st = posix.stat(path)
    except OSError:
        return None
    last_key, got = _last
    if last_key == _key(st):
        return got[0], dict(got[1])
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
        try:
            # The file opened, not the one stat() saw: a rewrite renamed in
            # between is smaller, and read where the old one ended, empty.
            st = posix.fstat(fd)
            tail = posix.pread(fd, _TAIL, max(0, st.st_size - _TAIL))
        finally:
            posix.close(fd)
        end = tail.rindex(b"\n")
        line = tail[tail.rfind(b"\n", 0, end) + 1:end]
        d = jsonlite.loads(line)
        total, services = d["total"], d["services"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(total, int) and isinstance(services, dict):
        _last = (_key(st), (total, dict(services)))
        return total, services
    return None


def last():
    """What read() last found in this process, or None."""
    got = _last[1]
    return None if got is None else (got[0], dict(got[1]))


def _key(st):
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def write(path, total, services, mode):
    """Best effort, under the store's lock: a failure leaves the previous
    counts, or none (offers then ask the store). When the file cannot be
    rewritten, lines are still appended: read() takes the tail."""
    line = (jsonlite.dumps({"total": total, "services": services})
            + "\n").encode()
    try:
        linefile.add(path, line, mode, COMPACT, lambda: line, float("inf"))
    except OSError:
        pass
