"""Configuration: a small reader for OpenWrt's UCI file format, the
broker's schema and defaults, and the checks behind `check-config`.

Only the standard library's cheapest modules are imported here, because
every CGI request parses the config file again.

File layout (`/etc/config/microbroker`)::

    config broker               # at most one; every option has a default
    config location             # at most one; where traffic leaves
    config service 'NAME'       # one per offer, NAME is [A-Za-z0-9_]{1,32}

With no file at all the defaults give one working service, `default`
(L2TPv3 Ethernet pseudo-wire over IPv6, encap ip).
"""

import os

from microbroker.kinds import KINDS, auto_mtu

DEFAULT_PATH = "/etc/config/microbroker"
DEFAULT_PORT = 8053
DEFAULT_LISTEN = ("[::]:%d" % DEFAULT_PORT, "0.0.0.0:%d" % DEFAULT_PORT)
PROVIDES = ("ipv4-nat", "ipv4-public", "ipv6-single", "ipv6-prefix")
RESTRICTS = ("none", "dns+web")
DNS_WEB_PORTS = (53, 80, 443)


class ConfigError(Exception):
    """The configuration has problems; .problems lists (where, message)."""

    def __init__(self, problems):
        self.problems = problems
        Exception.__init__(self, "; ".join(
            "%s: %s" % (w, m) if w else m for w, m in problems))


# ---------------------------------------------------------------- addresses
# Own parsing instead of `ipaddress` or even `_socket`: each costs more
# start-up time than the rest of a CGI request's address handling.

_HEXDIGITS = frozenset("0123456789abcdefABCDEF")


def _v4(text):
    parts = text.split(".")
    # No shorthand forms, no leading zeros (some libcs read them as octal).
    if len(parts) != 4 or any(
            not p.isdigit() or not p.isascii() or len(p) > 3
            or (len(p) > 1 and p[0] == "0") or int(p) > 255 for p in parts):
        raise ValueError("not an IPv4 address: %r" % text)
    return bytes(int(p) for p in parts)


def _v6(text):
    if text.count("::") > 1:
        raise ValueError("not an IPv6 address: %r" % text)
    head, gap, tail = text.partition("::")
    groups = []
    for side in (head, tail):
        g = side.split(":") if side else []
        groups.append(g)
    tail_v4 = b""
    last = groups[1] if gap else groups[0]
    if last and "." in last[-1]:
        tail_v4 = _v4(last.pop())
    words = []
    for g in groups:
        w = []
        for x in g:
            if not 1 <= len(x) <= 4 or not set(x) <= _HEXDIGITS:
                raise ValueError("not an IPv6 address: %r" % text)
            w.append(int(x, 16))
        words.append(w)
    n = len(words[0]) + len(words[1]) + (2 if tail_v4 else 0)
    if gap:
        if n > 7:
            raise ValueError("not an IPv6 address: %r" % text)
        words = words[0] + [0] * (8 - n) + words[1]
    else:
        if n != 8:
            raise ValueError("not an IPv6 address: %r" % text)
        words = words[0]
    return b"".join(w.to_bytes(2, "big") for w in words) + tail_v4


def parse_addr(text):
    """Return (family, packed bytes) of an IPv4/IPv6 address, IPv4-mapped
    IPv6 turned into IPv4; raise ValueError."""
    if not isinstance(text, str) or not text or len(text) > 45:
        raise ValueError("not an IP address: %r" % (text,))
    if text[:1] == "[" and text[-1:] == "]":
        text = text[1:-1]
    if ":" in text:
        if "%" in text:
            raise ValueError("scoped address not allowed: %r" % text)
        packed = _v6(text)
        if packed[:12] == b"\0" * 10 + b"\xff\xff":
            return 4, packed[12:]
        return 6, packed
    return 4, _v4(text)


def format_addr(family, packed):
    """Canonical text (RFC 5952 for IPv6: lowercase, shortest, the first
    longest run of two or more zero groups as ::)."""
    if family == 4:
        return "%d.%d.%d.%d" % tuple(packed)
    words = [int.from_bytes(packed[i:i + 2], "big") for i in range(0, 16, 2)]
    best, best_len, i = -1, 1, 0
    while i < 8:
        if words[i] == 0:
            j = i
            while j < 8 and words[j] == 0:
                j += 1
            if j - i > best_len:
                best, best_len = i, j - i
            i = j
        else:
            i += 1
    hexes = ["%x" % w for w in words]
    if best < 0:
        return ":".join(hexes)
    return ":".join(hexes[:best]) + "::" + ":".join(hexes[best + best_len:])


def norm_addr(text):
    """Canonical text form; IPv4-mapped IPv6 becomes IPv4. ValueError."""
    return format_addr(*parse_addr(text))


def addr_kind(family, packed):
    """'' for an ordinary unicast address, else why it cannot be a tunnel
    endpoint."""
    if packed == b"\0" * len(packed):
        return "unspecified"
    if family == 6:
        if packed[0] == 0xFF:
            return "multicast"
        if packed[0] == 0xFE and packed[1] & 0xC0 == 0x80:
            return "link-local"
    else:
        if 224 <= packed[0] <= 239 or packed == b"\xff" * 4:
            return "multicast or broadcast"
        if packed[0] == 169 and packed[1] == 254:
            return "link-local"
    return ""


def parse_prefix(text):
    """'fc00::/8' -> (family, int network, prefix length); ValueError."""
    addr, slash, plen = text.partition("/")
    family, packed = parse_addr(addr)
    bits = 32 if family == 4 else 128
    mapped = ":" in addr and family == 4
    if not slash:
        n = bits
    elif plen.isdigit() and len(plen) <= 3 and \
            int(plen) <= (128 if mapped else bits):
        n = int(plen)
        # A mapped address with a v6 prefix length means the v4 part.
        if mapped:
            if n < 96:
                raise ValueError("prefix length too short for %r" % text)
            n -= 96
    else:
        raise ValueError("bad prefix length in %r" % text)
    value = int.from_bytes(packed, "big")
    mask = ((1 << n) - 1) << (bits - n)
    if value & ~mask & ((1 << bits) - 1):
        raise ValueError("host bits set in %r" % text)
    return family, value, n


def in_prefixes(family, packed, prefixes):
    value = int.from_bytes(packed, "big")
    bits = 32 if family == 4 else 128
    for pfam, net, n in prefixes:
        if pfam == family and value >> (bits - n) == net >> (bits - n):
            return True
    return False


def parse_listen(text):
    """'[::]:8053', '0.0.0.0:8053', '[fc00::1]:80' -> (family, host,
    port)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ValueError("write IPv6 listen addresses as [addr]:port")
    if not sep or not port.isdigit() or len(port) > 5 or int(port) > 65535:
        raise ValueError("listen address needs ADDR:PORT, got %r" % text)
    family, packed = parse_addr(host)
    if text.startswith("[") and family == 4:
        raise ValueError("IPv4-mapped listen address; write %s:%s"
                         % (format_addr(4, packed), port))
    return family, format_addr(family, packed), int(port)


# ---------------------------------------------------------------- UCI reader

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz"
                        "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_KEYWORDS = {"package": "package", "p": "package", "config": "config",
             "c": "config", "option": "option", "o": "option",
             "list": "list", "l": "list"}
_BLANK = " \t\r\v\f"


def _is_name(s, extra=""):
    return bool(s) and all(c in _NAME_CHARS or c in extra for c in s)


def tokenize(text):
    """Split UCI text into statements as libuci reads them.

    Returns (statements, problems): statements are (line, [words]) with
    quoting already resolved, line being where the statement starts.
    The rules, from libuci's file.c: blanks separate words, a newline or
    an unquoted ';' ends a statement, an unquoted '#' comments out the
    rest of the line, pieces next to each other concatenate ('a'"b"c is
    abc), single quotes are literal and may span lines, inside double
    quotes and outside quotes a backslash keeps the next character and a
    backslash before a newline joins the lines.
    """
    statements, problems = [], []
    words, word, in_word = [], [], False
    line, start_line = 1, 1
    i, n = 0, len(text)

    def end_word():
        nonlocal word, in_word
        if in_word:
            words.append("".join(word))
        word, in_word = [], False

    def end_statement():
        nonlocal words
        end_word()
        if words:
            statements.append((start_line, words))
        words = []

    while i < n:
        c = text[i]
        if c == "\n":
            end_statement()
            line += 1
            i += 1
        elif c in _BLANK:
            end_word()
            i += 1
        elif c == ";":
            end_statement()
            i += 1
        elif c == "#":
            end_word()
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif c == "\\":
            if not words and not in_word:
                start_line = line
            if text.startswith("\n", i + 1) or text.startswith("\r\n", i + 1):
                i += 2 if text[i + 1] == "\n" else 3
                line += 1
            elif i + 1 < n:
                word.append(text[i + 1])
                in_word = True
                i += 2
            else:
                i += 1
        elif c == "'" or c == '"':
            if not words and not in_word:
                start_line = line
            in_word = True
            quote_line = line
            i += 1
            while True:
                if i >= n:
                    problems.append((quote_line, "unterminated %s" % c))
                    break
                d = text[i]
                if d == c:
                    i += 1
                    break
                if d == "\\" and c == '"':
                    if text.startswith("\n", i + 1):
                        i += 2
                        line += 1
                        continue
                    if text.startswith("\r\n", i + 1):
                        i += 3
                        line += 1
                        continue
                    if i + 1 < n:
                        i += 1
                        d = text[i]
                if d == "\n":
                    line += 1
                word.append(d)
                i += 1
        else:
            if not words and not in_word:
                start_line = line
            word.append(c)
            in_word = True
            i += 1
    end_statement()
    return statements, problems


class Section:
    """One `config TYPE [NAME]` block: options map to (value, line), where
    value is a str for `option` and a list of (item, line) for `list`."""

    def __init__(self, type, name, line):
        self.type, self.name, self.line = type, name, line
        self.options = {}


def parse_uci(text):
    """Parse UCI text into ([Section], [(line, problem)])."""
    statements, problems = tokenize(text)
    sections, named, current = [], {}, None
    for line, words in statements:
        kw = _KEYWORDS.get(words[0])
        args = words[1:]
        if kw is None:
            problems.append((line, "invalid command %r" % words[0]))
            continue
        if kw == "package":
            if len(args) != 1 or not _is_name(args[0], "-"):
                problems.append((line, "package needs one name"))
            continue
        if kw == "config":
            if not args or not _is_name(args[0]) or len(args) > 2:
                problems.append((line, "config needs TYPE [NAME] with "
                                 "names of letters, digits and _"))
                current = None
                continue
            name = args[1] if len(args) > 1 else ""
            if name and not _is_name(name):
                problems.append((line, "invalid section name %r" % name))
                current = None
                continue
            if name and name in named:
                current = named[name]
                if current.type != args[0]:
                    problems.append((line, "section %r redefined with type "
                                     "%r (was %r)" % (name, args[0],
                                                      current.type)))
                continue
            current = Section(args[0], name, line)
            sections.append(current)
            if name:
                named[name] = current
            continue
        # option / list
        if current is None:
            problems.append((line, "%s outside a config section" % kw))
            continue
        if not args or not _is_name(args[0]):
            problems.append((line, "%s needs a name of letters, digits "
                             "and _" % kw))
            continue
        if len(args) > 2:
            problems.append((line, "too many arguments (quote values "
                             "with blanks)"))
            continue
        key, value = args[0], args[1] if len(args) > 1 else ""
        if kw == "option":
            current.options[key] = (value, line)
        else:
            # Lists keep each item's line, for check-config.
            old = current.options.get(key)
            if old is None:
                current.options[key] = ([(value, line)], line)
            elif isinstance(old[0], list):
                old[0].append((value, line))
            else:  # libuci turns an option into a list on `list`
                current.options[key] = ([old, (value, line)], old[1])
    return sections, problems


# ---------------------------------------------------------------- schema
# Each option: (converter, default). A converter takes the raw string and
# returns the value or raises ValueError with a message for check-config.


def _text(v):
    # Values reach the shell answer format: no quote, newline or NUL there.
    if len(v) > 256:
        raise ValueError("longer than 256 characters")
    for c in v:
        if c == "'" or ord(c) < 32 or ord(c) == 127:
            raise ValueError("contains a quote or control character")
    return v


def _int(lo, hi):
    def conv(v):
        v = v.strip()
        if not v.isascii() or not v.isdigit() or len(v) > 10 or \
                not lo <= int(v) <= hi:
            raise ValueError("needs a whole number from %d to %d" % (lo, hi))
        return int(v)
    return conv


def _float(lo, hi):
    def conv(v):
        if not v:
            return None
        try:
            f = float(v)
        except ValueError:
            raise ValueError("needs a number")
        if not lo <= f <= hi:  # also rejects nan
            raise ValueError("needs a number from %g to %g" % (lo, hi))
        return f
    return conv


_TRUE = ("1", "yes", "on", "true", "enabled")
_FALSE = ("0", "no", "off", "false", "disabled")


def _bool(v):
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError("needs 1/0, yes/no, on/off or true/false")


def _choice(*choices):
    def conv(v):
        if v not in choices:
            raise ValueError("needs one of: %s" % ", ".join(choices))
        return v
    return conv


def _abspath(v):
    if not v.startswith("/") or "\0" in v:
        raise ValueError("needs an absolute path")
    return v


def _opt_abspath(v):
    return _abspath(v) if v else ""


def _address(v):
    if not v:
        return ""
    family, packed = parse_addr(v)
    why = addr_kind(family, packed)
    if why:
        raise ValueError("%s address cannot be a tunnel endpoint" % why)
    return format_addr(family, packed)


def _id_range(v):
    lo, sep, hi = v.partition("-")
    if (not sep or not lo.isdigit() or not hi.isdigit()
            or not 1 <= int(lo) <= int(hi) <= 0xFFFFFFFF):
        raise ValueError("needs LOW-HIGH within 1-4294967295")
    return int(lo), int(hi)


def _ifname(v):
    if not v:
        return ""
    if len(v) > 15 or not _is_name(v, "-.") or v in (".", ".."):
        raise ValueError("needs an interface name of at most 15 letters, "
                         "digits, _ - .")
    return v


def _ifprefix(v):
    if not 1 <= len(v) <= 6 or not _is_name(v, "-"):
        raise ValueError("needs 1-6 letters, digits, _ -")
    return v


def _country(v):
    if v and (len(v) != 2 or not ("A" <= v[0] <= "Z" and "A" <= v[1] <= "Z")):
        raise ValueError("needs a two-letter country code like DE")
    return v


def _token(v):
    if not 8 <= len(v) <= 128 or any(
            not "!" <= c <= "~" or c in "'\"\\" for c in v):
        raise ValueError("tokens need 8-128 printable characters without "
                         "blanks, quotes or backslash")
    return v


def _listen(v):
    parse_listen(v)
    return v


def _prefix(v):
    return parse_prefix(v)


def _pool(family):
    """An address pool 'NET/LEN' of one family, kept in canonical text."""
    def conv(v):
        if not v:
            return ""
        fam, value, n = parse_prefix(v)
        if fam != family or (family == 6 and "." in v):
            raise ValueError("needs an IPv%d prefix like %s" % (
                family, "fd00:beef::/48" if family == 6 else "198.51.100.0/28"))
        return "%s/%d" % (format_addr(fam, value.to_bytes(16 if fam == 6 else 4, "big")), n)
    return conv


def _v4_address(v):
    if not v:
        return ""
    family, packed = parse_addr(v)
    if family != 4 or ":" in v or addr_kind(family, packed):
        raise ValueError("needs an ordinary IPv4 address")
    return format_addr(family, packed)


# (converter, default, is_list)
BROKER = {
    "name": (_text, "microbroker", False),          # shown in the offer
    # `serve` only; IPv6 in brackets. [::] alone also takes IPv4.
    "listen": (_listen, list(DEFAULT_LISTEN), True),
    # default: /var/lib/microbroker as root, else ~/.local/state/microbroker
    "state_dir": (_opt_abspath, "", False),
    "lease_file": (_opt_abspath, "", False),        # default STATE_DIR/leases
    "tunnel_ids": (_id_range, (1, 0xFFFF), False),  # the exit's own ids
    "session_ids": (_id_range, (1, 0xFFFF), False),
    "ifname_prefix": (_ifprefix, "mb", False),      # exit interfaces: mb<id>
    "max_leases": (_int(1, 100000), 256, False),    # all services together
    "max_per_client": (_int(1, 1000), 4, False),    # per source address
    "allow": (_prefix, [], True),                   # empty: everyone
    "deny": (_prefix, [], True),                    # wins over allow
    "token": (_token, [], True),                    # any of them; none: open
    "log": (_choice("stderr", "syslog"), "stderr", False),
    "log_level": (_choice("debug", "info", "warning", "error"), "info",
                  False),
    # none: grant leases, build nothing (tests and dry runs)
    "dataplane": (_choice("kernel", "none"), "kernel", False),
    "filter": (_choice("", "nft", "ebtables"), "", False),   # '': probe
    # Open vSwitch (bridge_backend 'ovs'): ovsdb-server's socket, default
    # /var/run/openvswitch/db.sock; bridges' datapath, '' the kernel's.
    "ovsdb": (_opt_abspath, "", False),
    "ovs_datapath": (_choice("", "system", "netdev"), "", False),
    "sweep_interval": (_int(1, 86400), 30, False),  # seconds
    # Rising rx counters renew a lease. Off by default: a client whose
    # process died leaves a tunnel whose ND/MLD chatter would keep it alive.
    "traffic_keepalive": (_bool, False, False),
    # HOOK up|down IFNAME LEASE_ID SERVICE CLIENT; a failing up fails the
    # lease
    "hook": (_opt_abspath, "", False),
    "hook_timeout": (_int(1, 300), 10, False),
    "max_body": (_int(64, 65536), 4096, False),     # bytes, else 413
    "max_header": (_int(256, 65536), 8192, False),  # bytes, else 413
    "max_connections": (_int(1, 4096), 64, False),  # `serve`, else 503
    "timeout": (_int(1, 300), 10, False),           # `serve`: per connection
}

LOCATION = {
    "country": (_country, "", False),               # ISO 3166 alpha-2
    "city": (_text, "", False),
    "latitude": (_float(-90, 90), None, False),
    "longitude": (_float(-180, 180), None, False),
    "text": (_text, "", False),
}

SERVICE = {
    "enabled": (_bool, True, False),
    "kind": (_choice(*KINDS), "l2tpv3", False),     # see kinds.py
    "encap": (_choice("ip", "udp"), "ip", False),
    "family": (_choice("6", "4"), "6", False),      # of the tunnel endpoints
    # The exit's tunnel address; empty: the address the request arrived on
    # (the server's socket, SERVER_ADDR in CGI) when it has this family.
    "endpoint": (_address, "", False),
    # encap udp: the exit's ports are udp_port .. udp_port+capacity-1, one
    # per tunnel (the kernel binds one socket per tunnel).
    "udp_port": (_int(1, 65535), 1701, False),
    "provides": (_choice(*PROVIDES), [], True),
    "restrict": (_choice(*RESTRICTS), "none", False),
    "ports": (_int(1, 65535), [], True),            # dns+web: 53 80 443
    # The inner MTU handed out; by default the path MTU between exit and
    # clients (cjdns's tun: 1304) less the kind's overhead, at least 1280.
    "mtu": (_int(576, 9000), 0, False),
    "path_mtu": (_int(1280, 65535), 1304, False),
    "lifetime": (_int(30, 7 * 86400), 600, False),
    "renew_interval": (_int(10, 7 * 86400), 0, False),  # 0: lifetime / 5
    "capacity": (_int(0, 100000), 0, False),        # 0: up to max_leases
    "bridge": (_ifname, "", False),                 # layer 2: default br-NAME
    "bridge_backend": (_choice("linux", "ovs"), "linux", False),
    "isolate": (_bool, True, False),                # clients cannot talk
    # ipv6-prefix: one prefix_length prefix from the pool per lease, routed
    # to the client's link-local address (the EUI-64 of the lease's MAC).
    "prefix_pool": (_pool(6), "", False),
    "prefix_length": (_int(1, 128), 64, False),
    # ipv4-public: one address from the pool per lease, a /32 route on the
    # bridge; ipv4_gateway is the bridge's own address the client routes to.
    # Layer 3 (ip6tnl): the pools are the tunnel's addresses, routed to the
    # tunnel, no gateway; a private ipv4_pool is ipv4-nat (the operator NATs).
    "ipv4_pool": (_pool(4), "", False),
    "ipv4_gateway": (_v4_address, "", False),
    "token": (_token, [], True),                    # instead of the broker's
    "text": (_text, "", False),
}

LINUX_BRIDGE_PORTS = 1023   # BR_MAX_PORTS - 1 (net/bridge/br_private.h)

SCHEMAS = {"broker": BROKER, "location": LOCATION, "service": SERVICE}


class Options:
    """Plain attribute bag filled from a schema."""

    def __init__(self, schema):
        for key, (_, default, _) in schema.items():
            setattr(self, key, list(default) if isinstance(default, list)
                    else default)

    def __repr__(self):
        return "%s(%r)" % (type(self).__name__, self.__dict__)


class Service(Options):
    """One offered service; `name` is the section name."""

    def __init__(self, name):
        Options.__init__(self, SERVICE)
        self.name = name
        self.family = 6
        self.renew_interval = self.lifetime // 5


class Config:
    """The whole configuration; attributes of `config broker` directly on
    it, `location` and `services` (ordered dict name -> Service)."""

    def __init__(self):
        self.path = None
        self.source = "defaults"
        b = Options(BROKER)
        self.__dict__.update(b.__dict__)
        self.location = Options(LOCATION)
        self.services = {}
        self.problems = []
        self.lease_path = ""

    def enabled_services(self):
        return [s for s in self.services.values() if s.enabled]

    def __repr__(self):
        return "Config(%r)" % self.__dict__


def default_state_dir(euid=None, environ=None):
    """root: /var/lib/microbroker; others: $XDG_STATE_HOME/microbroker or
    ~/.local/state/microbroker, so a plain user can try the broker."""
    euid = os.geteuid() if euid is None else euid
    env = os.environ if environ is None else environ
    if euid == 0:
        return "/var/lib/microbroker"
    base = env.get("XDG_STATE_HOME", "")
    if not base.startswith("/"):
        home = env.get("HOME", "")
        if not home.startswith("/"):
            try:
                import pwd
                home = pwd.getpwuid(euid).pw_dir
            except (ImportError, KeyError):
                home = "/tmp"
        base = home.rstrip("/") + "/.local/state"
    return base + "/microbroker"


def _apply(target, schema, section, where, problems):
    for key, (value, line) in section.options.items():
        loc = where(line)
        spec = schema.get(key)
        if spec is None:
            problems.append((loc, "unknown option %r in %s section"
                             % (key, section.type)))
            continue
        conv, _, is_list = spec
        if is_list:
            raw = value if isinstance(value, list) else \
                [(item, line) for item in value.split()]
            out = []
            for item, item_line in raw:
                try:
                    out.append(conv(item))
                except ValueError as e:
                    problems.append((where(item_line), "%s %r: %s"
                                     % (key, item, e)))
            setattr(target, key, out)
        else:
            if isinstance(value, list):
                problems.append((loc, "%s takes one value, not a list"
                                 % key))
                continue
            try:
                setattr(target, key, conv(value))
            except ValueError as e:
                problems.append((loc, "%s %r: %s" % (key, value, e)))


def _parse_override(text):
    """'broker.max_leases=10' / 'service.NAME.mtu=1400' ->
    (type, name, option, value)."""
    lhs, eq, value = text.partition("=")
    parts = lhs.split(".")
    if not eq or len(parts) not in (2, 3):
        raise ValueError("--set needs SECTION.OPTION=VALUE or "
                         "service.NAME.OPTION=VALUE, got %r" % text)
    if len(parts) == 3:
        if parts[0] != "service":
            raise ValueError("only service sections have names in --set")
        return parts[0], parts[1], parts[2], value
    if parts[0] == "service":
        raise ValueError("--set service.NAME.OPTION=VALUE")
    return parts[0], "", parts[1], value


def build(sections, problems=(), path=None, overrides=(), euid=None,
          environ=None):
    """Turn parsed sections plus overrides into a Config; every problem
    lands in config.problems as (where, message)."""
    cfg = Config()
    cfg.path = path
    label = path or "<config>"

    def at(line):
        return "%s:%d" % (label, line) if line else label

    cfg.problems = [(at(line), msg) for line, msg in problems]
    seen = {}
    for sec in sections:
        where = at
        if sec.type not in SCHEMAS:
            cfg.problems.append((at(sec.line), "unknown section type %r"
                                 % sec.type))
            continue
        if sec.type == "service":
            if not sec.name:
                cfg.problems.append((at(sec.line), "a service section needs "
                                     "a name: config service 'NAME'"))
                continue
            if len(sec.name) > 32:
                cfg.problems.append((at(sec.line), "service name longer "
                                     "than 32 characters"))
                continue
            svc = Service(sec.name)
            _apply(svc, SERVICE, sec, where, cfg.problems)
            svc._line = sec.line
            svc._explicit = set(sec.options)
            cfg.services[sec.name] = svc
            continue
        if sec.type in seen:
            cfg.problems.append((at(sec.line), "second %s section (first at "
                                 "line %d)" % (sec.type, seen[sec.type])))
            continue
        seen[sec.type] = sec.line
        target = cfg if sec.type == "broker" else cfg.location
        _apply(target, SCHEMAS[sec.type], sec, where, cfg.problems)

    for text in overrides:
        try:
            stype, sname, key, value = _parse_override(text)
        except ValueError as e:
            cfg.problems.append(("--set", str(e)))
            continue
        if stype not in SCHEMAS:
            cfg.problems.append(("--set", "unknown section type %r" % stype))
            continue
        sec = Section(stype, sname, 0)
        sec.options[key] = (value, 0)
        if stype == "service":
            if not _is_name(sname) or len(sname) > 32:
                cfg.problems.append(("--set", "bad service name %r" % sname))
                continue
            svc = cfg.services.get(sname)
            if svc is None:
                svc = cfg.services[sname] = Service(sname)
                svc._line, svc._explicit = 0, set()
            svc._explicit.add(key)
            target = svc
        else:
            target = cfg if stype == "broker" else cfg.location
        _apply(target, SCHEMAS[stype], sec, lambda line: "--set",
               cfg.problems)

    if not sections and not cfg.services:
        svc = cfg.services["default"] = Service("default")
        svc._line, svc._explicit = 0, set()
        cfg.source = "defaults"
    else:
        cfg.source = path or "overrides"
    _finish(cfg, at, euid, environ)
    return cfg


def _finish(cfg, at, euid, environ):
    """Defaults that depend on other options, and cross-option checks."""
    p = cfg.problems
    if not cfg.state_dir:
        cfg.state_dir = default_state_dir(euid, environ)
    cfg.lease_path = cfg.lease_file or cfg.state_dir.rstrip("/") + "/leases"
    if len(cfg.ifname_prefix) + len(str(cfg.tunnel_ids[1])) > 15:
        p.append((at(0), "ifname_prefix %r with tunnel ids up to %d makes "
                  "interface names longer than 15 characters"
                  % (cfg.ifname_prefix, cfg.tunnel_ids[1])))
    ports = {}
    for text in cfg.listen:
        try:
            fam, host, port = parse_listen(text)
        except ValueError:
            continue  # already reported
        if (host, port) in ports:
            p.append((at(0), "listen %s given twice" % text))
        ports[(host, port)] = fam
    for svc in cfg.services.values():
        where = at(svc._line) if svc._line else "--set"
        svc.family = int(svc.family)
        if "renew_interval" not in svc._explicit:
            svc.renew_interval = max(10, svc.lifetime // 5)
        elif svc.renew_interval * 2 > svc.lifetime:
            p.append((where, "service %s: renew_interval %d must be at most "
                      "half of lifetime %d" % (svc.name, svc.renew_interval,
                                               svc.lifetime)))
        if svc.endpoint:
            fam = 6 if ":" in svc.endpoint else 4
            if fam != svc.family:
                p.append((where, "service %s: endpoint %s is not an IPv%d "
                          "address (family %d)" % (svc.name, svc.endpoint,
                                                   svc.family, svc.family)))
        if svc.restrict == "dns+web" and not svc.ports:
            svc.ports = list(DNS_WEB_PORTS)
        elif svc.restrict == "none" and svc.ports:
            p.append((where, "service %s: ports only apply with restrict "
                      "'dns+web'" % svc.name))
        if not svc.capacity or svc.capacity > cfg.max_leases:
            svc.capacity = cfg.max_leases
        if svc.encap == "udp":
            top = svc.udp_port + svc.capacity - 1
            if top > 65535:
                p.append((where, "service %s: udp_port %d + capacity does "
                          "not fit below 65536 (the exit uses one UDP port "
                          "per tunnel)" % (svc.name, svc.udp_port)))
        kind = KINDS[svc.kind]
        if svc.encap not in kind.encaps:
            p.append((where, "service %s: kind %s has no encap %s (only %s)"
                      % (svc.name, svc.kind, svc.encap,
                         ", ".join(kind.encaps))))
        elif not svc.mtu:
            svc.mtu = auto_mtu(svc.kind, svc.encap, svc.path_mtu)
        if svc.kind != "l2tpv3" and svc.family != 6:
            p.append((where, "service %s: kind %s runs over IPv6 only"
                      % (svc.name, svc.kind)))
        if kind.layer == 3:
            if svc.bridge:
                p.append((where, "service %s: kind %s is routed, bridge does "
                          "not apply" % (svc.name, svc.kind)))
            if svc.bridge_backend != "linux":
                p.append((where, "service %s: kind %s is routed, "
                          "bridge_backend does not apply" % (svc.name, svc.kind)))
        elif svc.bridge_backend == "linux" and svc.capacity > LINUX_BRIDGE_PORTS \
                and "capacity" in svc._explicit:
            p.append((where, "service %s: capacity %d is more than a Linux "
                      "bridge's %d ports (use bridge_backend 'ovs')"
                      % (svc.name, svc.capacity, LINUX_BRIDGE_PORTS)))
        elif not svc.bridge:
            svc.bridge = ("br-" + svc.name)[:15]
        _check_pools(svc, where, p, kind.layer)
    routed = [s for s in cfg.enabled_services() if KINDS[s.kind].layer == 3]
    if len({s.isolate for s in routed}) > 1:
        p.append((at(0), "services %s: routed services share one isolation "
                  "rule, so isolate must be the same for all of them"
                  % ", ".join(s.name for s in routed)))
    if routed and cfg.filter == "ebtables":
        p.append((at(0), "services %s: routed tunnels need nft for their "
                  "source check and isolation, but filter is 'ebtables'"
                  % ", ".join(s.name for s in routed)))
    _check_pool_overlap(cfg.enabled_services(), at(0), p)
    if not cfg.enabled_services():
        p.append((at(0), "no enabled service: clients can lease nothing"))


def _check_pool_overlap(services, where, p):
    """Services may share a pool only as the very same pool and length:
    the broker tells items apart by their text."""
    seen = []
    for svc in services:
        for opt, length in (("prefix_pool", svc.prefix_length),
                            ("ipv4_pool", 32)):
            pool = getattr(svc, opt)
            if not pool:
                continue
            try:
                family, net, n = parse_prefix(pool)
            except ValueError:
                continue        # reported where the option is read
            bits = 32 if family == 4 else 128
            for other, ofam, onet, on, olen, opool in seen:
                if ofam != family or (pool, length) == (opool, olen):
                    continue
                m = min(n, on)
                if net >> (bits - m) == onet >> (bits - m):
                    p.append((where, "services %s and %s: pools %s and %s "
                              "overlap (share a pool only with the same "
                              "pool and prefix_length)"
                              % (other, svc.name, opool, pool)))
            seen.append((svc.name, family, net, n, length, pool))


def pool_size(pool, length):
    """(family, first network as int, step, count) of the prefixes of
    `length` in `pool` ('NET/LEN'); the broker hands them out in order."""
    family, value, n = parse_prefix(pool)
    bits = 128 if family == 6 else 32
    return family, value, 1 << (bits - length), 1 << (length - n)


def _check_pools(svc, where, p, layer=2):
    """Pools need their companions, and a pool is what `provides` says."""
    if svc.prefix_pool:
        n = int(svc.prefix_pool.rpartition("/")[2])
        if svc.prefix_length < n:
            p.append((where, "service %s: prefix_length %d is shorter than "
                      "prefix_pool %s" % (svc.name, svc.prefix_length,
                                          svc.prefix_pool)))
    elif "prefix_length" in svc._explicit:
        p.append((where, "service %s: prefix_length needs a prefix_pool"
                  % svc.name))
    if layer == 3:
        _check_routed(svc, where, p)
        return
    if svc.ipv4_pool:
        if not svc.ipv4_gateway:
            p.append((where, "service %s: ipv4_pool needs ipv4_gateway (the "
                      "bridge's IPv4 address, the clients' gateway)"
                      % svc.name))
        elif in_prefixes(*parse_addr(svc.ipv4_gateway),
                         [parse_prefix(svc.ipv4_pool)]):
            p.append((where, "service %s: ipv4_gateway %s lies inside "
                      "ipv4_pool %s" % (svc.name, svc.ipv4_gateway,
                                        svc.ipv4_pool)))
    elif svc.ipv4_gateway:
        p.append((where, "service %s: ipv4_gateway needs an ipv4_pool"
                  % svc.name))
    for pool, name, opt in ((svc.prefix_pool, "ipv6-prefix", "prefix_pool"),
                            (svc.ipv4_pool, "ipv4-public", "ipv4_pool")):
        if pool and name not in svc.provides:
            svc.provides.append(name)
        elif not pool and name in svc.provides:
            p.append((where, "service %s: provides %s needs a %s"
                      % (svc.name, name, opt)))


# Private and shared (CGN) IPv4 space: a routed client with such an address
# reaches the Internet only through the exit's NAT.
_PRIVATE4 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")


def _check_routed(svc, where, p):
    """A routed service has no bridge to run DHCP or RA on: everything the
    client gets comes from its pools, and every pool is offered."""
    if svc.prefix_pool and svc.mtu and svc.mtu < 1280:
        p.append((where, "service %s: mtu %d is below 1280, where Linux "
                  "turns IPv6 off, so prefix_pool cannot be routed"
                  % (svc.name, svc.mtu)))
    if svc.ipv4_gateway:
        p.append((where, "service %s: kind %s is point-to-point, "
                  "ipv4_gateway does not apply" % (svc.name, svc.kind)))
    if not svc.ipv4_pool and not svc.prefix_pool:
        p.append((where, "service %s: kind %s is routed, so its clients' "
                  "addresses come from ipv4_pool and/or prefix_pool; set "
                  "at least one" % (svc.name, svc.kind)))
    want = set()
    if svc.ipv4_pool:
        v4 = [x for x in svc.provides if x.startswith("ipv4-")]
        if not v4:
            private = in_prefixes(4, _pool_first(svc.ipv4_pool),
                                  [parse_prefix(x) for x in _PRIVATE4])
            v4 = ["ipv4-nat" if private else "ipv4-public"]
        want.update(v4)
    if svc.prefix_pool:
        want.add("ipv6-single" if svc.prefix_length == 128
                 else "ipv6-prefix")
    for name in PROVIDES:
        if name in want and name not in svc.provides:
            svc.provides.append(name)
        elif name in svc.provides and name not in want:
            p.append((where, "service %s: provides %s needs %s" % (
                svc.name, name, "an ipv4_pool" if name.startswith("ipv4")
                else "a prefix_pool with prefix_length %s"
                % ("128" if name == "ipv6-single" else "below 128"))))


def _pool_first(pool):
    """The packed first address of an IPv4 pool 'NET/LEN'."""
    return parse_prefix(pool)[1].to_bytes(4, "big")


def load(path=None, overrides=(), must_exist=None, euid=None, environ=None):
    """Read and check the config. `path` None means $MICROBROKER_CONFIG or
    /etc/config/microbroker, and a missing default file means built-in
    defaults; a path given explicitly must exist. Problems are collected in
    config.problems, never raised."""
    env = os.environ if environ is None else environ
    if path is None:
        path = env.get("MICROBROKER_CONFIG") or DEFAULT_PATH
        if must_exist is None:
            must_exist = path != DEFAULT_PATH
    elif must_exist is None:
        must_exist = True
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
    except FileNotFoundError:
        if must_exist:
            cfg = build([], [], path, overrides, euid, environ)
            cfg.problems.insert(0, (path, "no such file"))
            return cfg
        return build([], [], None, overrides, euid, environ)
    except OSError as e:
        cfg = build([], [], path, overrides, euid, environ)
        cfg.problems.insert(0, (path, "cannot read: %s" % e.strerror))
        return cfg
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        cfg = build([], [], path, overrides, euid, environ)
        cfg.problems.insert(0, ("%s:%d" % (path, line), "not UTF-8"))
        return cfg
    sections, problems = parse_uci(text)
    cfg = build(sections, problems, path, overrides, euid, environ)
    return cfg
