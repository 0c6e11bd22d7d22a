"""A lease's secret: kept as its SHA-256 (lowercase hex), checked against it.

hashlib and hmac load OpenSSL's libcrypto where the Python has _hashlib
(about 5 ms of a CGI lease or renew on Debian); OpenWrt's python3-light has
no _hashlib, and hashlib uses its built-in SHA-256 there. Imported only by
the requests that need a secret: an offer never does.
"""

import hashlib
import hmac


def digest(secret):
    """The stored form of a secret (a str)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret, stored):
    """Whether `secret` is the one whose digest is `stored`, in a time that
    does not depend on where the digests differ."""
    if not isinstance(secret, str) or not isinstance(stored, str):
        return False
    return hmac.compare_digest(digest(secret).encode(), stored.encode())
