"""The lease store: one dbm file shared by CGI processes, server threads and crashes.

    errors.py   what the store refuses and why a file cannot be used
    record.py   the record format: two-slot records, lease rows, buckets,
                the ids record (Holdings)
    dbfile.py   the file: backends, locking, crash safety, fsync
    store.py    the lease API (LeaseStore): one locked transaction per call
    check.py    check-leases and repair-leases
"""

from microbroker.leases.errors import (  # noqa: F401
    BadRequest, Busy, Conflict, Corrupt, Exhausted, Forbidden, Full, LeaseError,
    Locked, NotFound, PoolExhausted, RateLimited, StoreError, TooMany)
from microbroker.leases.record import FIELDS, U32, Lease  # noqa: F401
from microbroker.leases.dbfile import (  # noqa: F401
    BACKENDS, FORMAT, SCHEMA, Records, available_backends)
from microbroker.leases.store import ENCAPS, IFNAMSIZ, STATES, LeaseStore  # noqa: F401
