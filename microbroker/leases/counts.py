"""<path>.counts: how many leases there are, in total and per service.

One JSON line per change, appended (one write, O_APPEND) by every store
call that makes or ends a lease, under the store's lock; the last complete
line is the counts. Offers read it without any lock: a line shows to them
whole or not at all (its newline comes last), so they see one complete
version; a line a kill or a full disk cut short is ended by the next one's
leading newline and does not parse, and the caller then asks the store.
Past COMPACT bytes the file is rewritten as one line (temporary file,
rename). Appending, not a rename per change: on ext4 a rename over a file
flushes the new file's data first (auto_da_alloc), about a millisecond of
every lease. The counts may lag one crashed call behind.

A CGI offer reads nothing else of the store, so this module imports only
jsonlite.
"""

import os

from microbroker import jsonlite

COMPACT = 16384     # bytes: past this the next write starts the file anew
_TAIL = 65536       # what read() looks at, from the end


def path_of(lease_path):
    return os.fspath(lease_path) + ".counts"


def read(path):
    """(total, {service: leases}) from the last complete line, or None when
    the file is missing or that line does not read as counts."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - _TAIL))
            tail = f.read(_TAIL)
        end = tail.rindex(b"\n")
        line = tail[tail.rfind(b"\n", 0, end) + 1:end]
        d = jsonlite.loads(line)
        total, services = d["total"], d["services"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(total, int) and isinstance(services, dict):
        return total, services
    return None


def write(path, total, services, mode):
    """Best effort: a failure leaves the previous counts, or none (offers
    then ask the store)."""
    line = (jsonlite.dumps({"total": total, "services": services})
            + "\n").encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT
                     | os.O_CLOEXEC, mode)
        try:
            size = os.fstat(fd).st_size
            if size + len(line) <= COMPACT:
                # A line cut short before (or a file of one line without
                # its newline) is ended here, not joined to this one.
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line
                os.write(fd, line)
                return
        finally:
            os.close(fd)
        tmp = "%s.%d.tmp" % (path, os.getpid())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        with open(fd, "wb") as f:
            f.write(line)
        os.replace(tmp, path)
    except OSError:
        pass
