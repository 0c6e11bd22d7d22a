"""A file of lines, appended to under its writers' own lock and read
without one: each line goes in one write with its newline last, so a
reader that takes complete lines only sees every line whole or not at all.

Appending, not a new file renamed over the old per change: on ext4 such a
rename starts writing the new file's data out first (auto_da_alloc), about
a millisecond of every lease. Imports only posix: a CGI loads it.
"""

import posix


def append(path, line, mode, limit):
    """Append `line` (bytes, newline last) to `path`; True when written.
    A line a kill or a full disk cut short is cut off first (the caller
    holds the writers' lock; readers never use it). False, writing
    nothing, when the file would grow past `limit` bytes: the caller
    rewrites it whole (replace). Raises OSError."""
    fd = posix.open(path, posix.O_RDWR | posix.O_APPEND | posix.O_CREAT | posix.O_CLOEXEC, mode)
    try:
        size = posix.fstat(fd).st_size
        if size and posix.pread(fd, 1, size - 1) != b"\n":
            size = _complete(fd, size)
            posix.ftruncate(fd, size)
        if size + len(line) > limit:
            return False
        posix.write(fd, line)
        return True
    finally:
        posix.close(fd)


def add(path, line, mode, limit, whole, most):
    """Append `line`; past `limit` bytes rewrite the file as whole()
    (bytes that include this line's change), and where that fails still
    append, up to `most` bytes (what its readers read). Raises OSError."""
    if append(path, line, mode, limit):
        return
    try:
        replace(path, whole(), mode)
    except OSError:
        append(path, line, mode, most)


def _complete(fd, size):
    """The length of the file's complete lines: up to its last newline."""
    end = size
    while end > 0:
        start = max(0, end - 4096)
        i = posix.pread(fd, end - start, start).rfind(b"\n")
        if i >= 0:
            return start + i + 1
        end = start
    return 0


def replace(path, data, mode):
    """`data` as the whole file: a temporary file renamed over it, removed
    again when that fails. Raises OSError."""
    tmp = "%s.%d.tmp" % (path, posix.getpid())
    try:
        fd = posix.open(tmp, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_CLOEXEC, mode)
        with open(fd, "wb") as f:
            f.write(data)
        posix.replace(tmp, path)
    except OSError:
        try:
            posix.unlink(tmp)
        except OSError:
            pass
        raise
