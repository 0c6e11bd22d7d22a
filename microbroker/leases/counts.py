"""<path>.counts: how many leases there are, in total and per service.

Rewritten whole (temporary file, rename) by every store call that makes or
ends a lease, so a reader sees one complete version without a lock; it may
lag one crashed call behind.  Offers read it; a CGI offer reads nothing
else of the store, so this module imports only jsonlite.
"""

import os

from microbroker import jsonlite


def path_of(lease_path):
    return os.fspath(lease_path) + ".counts"


def read(path):
    """(total, {service: leases}), or None when the file is missing or does
    not read as counts."""
    try:
        with open(path, "rb") as f:
            d = jsonlite.loads(f.read(65536))
        total, services = d["total"], d["services"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(total, int) and isinstance(services, dict):
        return total, services
    return None


def write(path, total, services, mode):
    """Best effort: a failure leaves the previous file, or none (offers then
    ask the store)."""
    data = jsonlite.dumps({"total": total, "services": services})
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        with open(fd, "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        pass
