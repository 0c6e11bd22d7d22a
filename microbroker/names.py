"""Interface names and interface name prefixes: one rule for every layer.

The config (bridge, ifname_prefix), the lease store (the names it derives),
rtnl and l2tp (names sent to the kernel) and filters.py (names written into
nft and ebtables rules) all check with these two functions, so a name one
layer accepts is never refused by the next.

The rule is narrower than the kernel's dev_valid_name() (at most
IFNAMSIZ - 1 bytes, not "." or "..", no "/", ":" or blank): ASCII letters,
digits and `_ - .` only, the first a letter, digit or `_`, because the same
name goes unquoted into nft wildcards, ebtables argv and shell hooks. A
prefix is what the broker puts before a tunnel id (mb<id>): it must start
with a letter (nft and ebtables read a leading digit as a number) and
leave room for the id's digits.
"""

IFNAMSIZ = 16                   # include/uapi/linux/if.h, with the NUL

_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_DIGITS = frozenset("0123456789")
_FIRST = _LETTERS | _DIGITS | {"_"}
_NAME = _FIRST | {"-", "."}
_PREFIX = _LETTERS | _DIGITS | {"_", "-"}


def ifname_problem(name):
    """Why `name` is not an interface name we use, or "" if it is one."""
    if not isinstance(name, str) or not name:
        return "an interface name needs 1-%d characters" % (IFNAMSIZ - 1)
    if len(name) > IFNAMSIZ - 1:
        return "interface name %r is longer than %d characters" % (
            name, IFNAMSIZ - 1)
    if name[0] not in _FIRST or not set(name) <= _NAME or \
            name in (".", ".."):
        return "interface name %r: letters, digits, _ - . only, the first " \
               "a letter, digit or _" % (name,)
    return ""


def check_ifname(name):
    """`name`, or ValueError saying why it is refused."""
    why = ifname_problem(name)
    if why:
        raise ValueError(why)
    return name


def prefix_problem(prefix, max_id=None):
    """Why `prefix` cannot start our interface names ("" if it can):
    prefix + the largest tunnel id (max_id) must fit IFNAMSIZ."""
    if not isinstance(prefix, str) or not prefix or \
            prefix[0] not in _LETTERS or not set(prefix) <= _PREFIX:
        return "ifname_prefix %r needs letters, digits, _ or -, the first " \
               "a letter" % (prefix,)
    if max_id is None:
        max_id = 1
    if len(prefix) + len(str(max_id)) > IFNAMSIZ - 1:
        return "ifname_prefix %r with tunnel ids up to %d makes interface " \
               "names longer than %d characters" % (prefix, max_id,
                                                    IFNAMSIZ - 1)
    return ""


def check_prefix(prefix, max_id=None):
    """`prefix`, or ValueError saying why it is refused."""
    why = prefix_problem(prefix, max_id)
    if why:
        raise ValueError(why)
    return prefix
