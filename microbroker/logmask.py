"""Client addresses out of log lines (broker option log_client_addresses
off, the default): Freifunk communities keep them out of their exits'
logs, as tunneldigger-broker's log_ip_addresses does.

Log calls pass addresses as arguments (`log("info", "lease %s granted to
%s", id, client)`), so masking the arguments covers every line, the
front doors' included, without each call site deciding. What looks like
an address or a prefix is masked: IPv6 (two colons or more), dotted-quad
IPv4, with or without /LEN; a MAC address, made of the same characters,
goes too. Lease ids, interface names, numbers and listen addresses
(HOST:PORT, [V6]:PORT) stay.
"""

HIDDEN = "[address]"
_CHARS = frozenset("0123456789abcdefABCDEF:./")


def looks_like_address(s):
    if not s or len(s) > 64 or not set(s) <= _CHARS:
        return False
    # host:port and [v6]:port are our listen addresses, not a client's
    if ":" not in s:
        return s.split("/")[0].count(".") == 3
    return s.count(":") >= 2


def mask(args):
    """`args` with every address-like string replaced by HIDDEN."""
    return tuple(HIDDEN if isinstance(a, str) and looks_like_address(a)
                 else a for a in args)
