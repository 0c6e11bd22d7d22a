"""A lease's secret: kept as its SHA-256 (lowercase hex), checked against it.

hashlib and hmac load OpenSSL's libcrypto where the Python has _hashlib
(about 5 ms of a CGI lease or renew on Debian). CPython's own SHA-256,
_sha256 (a standard-library module up to 3.11; 3.12 renamed it _sha2, which
3.11's list of standard modules does not name, so hashlib serves there), is
what hashlib falls back to, and hmac.compare_digest is _operator's; both
are taken directly where they exist, and hashlib and hmac only where they
do not. Imported only by the requests that need a secret: an offer never
does.
"""

try:
    from _sha256 import sha256
except ImportError:
    from hashlib import sha256
try:
    from _operator import _compare_digest as compare_digest
except ImportError:
    from hmac import compare_digest


def digest(secret):
    """The stored form of a secret (a str)."""
    return sha256(secret.encode()).hexdigest()


def matches(secret, stored):
    """Whether `secret` is the one whose digest is `stored`, in a time that
    does not depend on where the digests differ."""
    if not isinstance(secret, str) or not isinstance(stored, str):
        return False
    return compare_digest(digest(secret).encode(), stored.encode())
