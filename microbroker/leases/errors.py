"""The lease store's errors: what it refuses (LeaseError, with an API code)
and why the file cannot be used (StoreError)."""


class _Error(Exception):
    """str() is the message; the attributes named in FIELDS follow it, by
    position in that order or by keyword, and are the class's defaults
    where not given."""
    FIELDS = ()

    def __init__(self, message, *args, **kwargs):
        given = dict(zip(self.FIELDS, args))
        if len(args) > len(self.FIELDS) or not given.keys().isdisjoint(
                kwargs) or not set(kwargs) <= set(self.FIELDS):
            raise TypeError("%s(message, %s)" % (type(self).__name__,
                                                 ", ".join(self.FIELDS)))
        super().__init__(message)
        given.update(kwargs)
        for name, value in given.items():
            setattr(self, name, value)


class LeaseError(_Error):
    """A request the store refuses; .code is the stable API error code,
    .retry_after seconds or None."""
    code = "lease"
    FIELDS = ("retry_after",)
    retry_after = None


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


class StoreError(_Error):
    """The lease file cannot be used: corrupt, locked, wrong backend or
    schema; .path is the lease file's."""
    code = "store"
    FIELDS = ("path",)
    path = None


class Corrupt(StoreError):
    pass


class Busy(StoreError):
    """Another process or thread holds the lease file's lock past the wait
    bound: nothing is wrong, ask again after .retry_after seconds."""
    FIELDS = ("path", "retry_after")
    retry_after = 1


Locked = Busy       # the older name

