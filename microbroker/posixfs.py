"""What os.path's tests, os.environ and shutil.which give, over the posix C
module: nothing a CGI request loads imports os, whose _collections_abc
costs a request about 0.85 ms, over a tenth of a bare interpreter's start."""

import posix
import sys
from _stat import S_ISDIR, S_ISREG


def _mode(path):
    try:
        return posix.stat(path).st_mode
    except (OSError, ValueError):
        return None


def exists(path):
    return _mode(path) is not None


def is_file(path):
    mode = _mode(path)
    return mode is not None and S_ISREG(mode)


def is_dir(path):
    mode = _mode(path)
    return mode is not None and S_ISDIR(mode)


def decoded(raw):
    """bytes of the environment or a path as str, as os.environ decodes them."""
    return raw.decode(sys.getfilesystemencoding(), "surrogateescape")


def environ():
    """The environment as str (a copy, read now)."""
    return {decoded(k): decoded(v) for k, v in posix.environ.items()}


def which(name):
    """The tool's path on PATH or in /usr/sbin, /sbin, or None (shutil.which
    would import re)."""
    path = decoded(posix.environ.get(b"PATH", b""))
    for d in path.split(":") + ["/usr/sbin", "/sbin"]:
        p = d + "/" + name
        if d and posix.access(p, posix.X_OK) and not is_dir(p):
            return p
    return None
