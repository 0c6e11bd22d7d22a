"""The lease store: one dbm file shared by CGI processes, server threads and crashes.

    errors.py   what the store refuses and why a file cannot be used
    record.py   the record format: two-slot records, lease rows, buckets,
                the ids record (Holdings)
    dbfile.py   the file: backends, locking, crash safety, fsync
    store.py    the lease API (LeaseStore): one locked transaction per call
    counts.py   <path>.counts, the lease counts offers read without a lock
    check.py    check-leases and repair-leases

The names below load their module on first use (`from microbroker.leases
import LeaseStore` loads store.py and what it needs), so a CGI offer that
reads only counts.py does not pay for the rest.
"""

_WHERE = {
    "errors": ("BadRequest", "Busy", "Conflict", "Corrupt", "Exhausted",
               "Forbidden", "Full", "LeaseError", "Locked", "NotFound",
               "PoolExhausted", "RateLimited", "StoreError", "TooMany"),
    "record": ("FIELDS", "U32", "Lease"),
    "dbfile": ("BACKENDS", "FORMAT", "SCHEMA", "Records", "available_backends"),
    "store": ("ENCAPS", "IFNAMSIZ", "STATES", "LeaseStore"),
}
_MODULE = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE)


def __getattr__(name):
    module = _MODULE.get(name)
    if module is None:
        raise AttributeError("module %r has no attribute %r" % (__name__, name))
    value = getattr(__import__(__name__ + "." + module, fromlist=[name]), name)
    globals()[name] = value
    return value
