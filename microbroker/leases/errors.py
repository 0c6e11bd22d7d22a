"""The lease store's errors: what it refuses (LeaseError, with an API code)
and why the file cannot be used (StoreError)."""


class LeaseError(Exception):
    """A request the store refuses; .code is the stable API error code."""
    code = "lease"

    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


class NotFound(LeaseError):
    code = "not_found"


class Forbidden(LeaseError):
    code = "forbidden"


class Conflict(LeaseError):
    code = "id_conflict"


class Exhausted(LeaseError):
    code = "ids_exhausted"


class TooMany(LeaseError):
    code = "too_many"


class Full(LeaseError):
    code = "full"


class PoolExhausted(LeaseError):
    code = "pool_exhausted"


class RateLimited(LeaseError):
    """New leases come faster than the broker-wide rate allows."""
    code = "too_many"


class BadRequest(LeaseError, ValueError):
    """A malformed argument (not in the API list; maps to bad_request)."""
    code = "bad_request"


class StoreError(Exception):
    """The lease file cannot be used: corrupt, locked, wrong backend or schema."""
    code = "store"

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


class Corrupt(StoreError):
    pass


class Busy(StoreError):
    """Another process or thread holds the lease file's lock past the wait
    bound: nothing is wrong, ask again after .retry_after seconds."""

    def __init__(self, message, path=None, retry_after=1):
        super().__init__(message, path)
        self.retry_after = retry_after


Locked = Busy       # the older name

