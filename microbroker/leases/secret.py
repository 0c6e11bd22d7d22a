"""A lease's secret: kept as its SHA-256 (lowercase hex), checked against it.

SHA-256 is Python's built-in implementation where the interpreter has one.
hashlib (and hmac, which imports it) loads OpenSSL's libcrypto whenever
the Python has _hashlib: about 5 ms, a third of a bare interpreter's start,
on every CGI lease and renew on Debian. OpenWrt's python3-light has no
_hashlib, so hashlib uses the built-in module there anyway. That module
is _sha256 up to Python 3.11 and _sha2 from 3.12 (chosen by version: a
failed import costs a search of sys.path); a Python without it gets
hashlib's, so a renamed module costs time, never a failure. The digest
is the same either way (tests compare it with hashlib's).
"""

import sys

try:
    if sys.version_info >= (3, 12):
        from _sha2 import sha256
    else:
        from _sha256 import sha256
except ImportError:
    from hashlib import sha256


def digest(secret):
    """The stored form of a secret (a str)."""
    return sha256(secret.encode()).hexdigest()


def matches(secret, stored):
    """Whether `secret` is the one whose digest is `stored`, in a time that
    does not depend on where the digests differ (hmac.compare_digest would
    load libcrypto; see above)."""
    if not isinstance(secret, str) or not isinstance(stored, str):
        return False
    a, b = digest(secret).encode(), stored.encode()
    diff = len(a) ^ len(b)
    for x, y in zip(a, b if len(a) == len(b) else a):
        diff |= x ^ y
    return diff == 0
