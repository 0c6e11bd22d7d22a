"""Configuration: a small reader for OpenWrt's UCI file format, the
broker's schema and defaults; the checks behind `check-config` that take
several options together are configcheck.py's.

Only the standard library's cheapest modules are imported here, because
every CGI request parses the config file again.

File layout (`/etc/config/microbroker`)::

    config broker               # at most one; every option has a default
    config location             # at most one; where traffic leaves
    config service 'NAME'       # one per offer, NAME is [A-Za-z0-9_]{1,32}

With no file at all the defaults give one working service, `default`
(L2TPv3 Ethernet pseudo-wire over IPv6, encap ip).
"""

import posix

from microbroker import posixfs
from microbroker.addresses import (  # noqa: F401 (config.parse_addr etc.)
    addr_kind, format_addr, in_prefixes, norm_addr, parse_addr, parse_prefix,
    pool_size)
from microbroker.kinds import KINDS, auto_mtu

DEFAULT_PATH = "/etc/config/microbroker"
DEFAULT_PORT = 8053
DEFAULT_LISTEN = ("[::]:%d" % DEFAULT_PORT, "0.0.0.0:%d" % DEFAULT_PORT)
PROVIDES = ("ipv4-nat", "ipv4-public", "ipv6-single", "ipv6-prefix")
RESTRICTS = ("none", "dns+web")
DNS_WEB_PORTS = (53, 80, 443)
# A Linux bridge's port numbers are BR_PORT_BITS (10) wide, port 0 unused
# (net/bridge/br_private.h): at most 1,023 ports.
BR_MAX_PORTS = 1 << 10
# Seconds a lease outlives two renew intervals: a client renews
# renew_interval after its last request ended (which may have taken its
# whole 10 s timeout) and retries once when a renew fails.
RENEW_MARGIN = 20
METRICS_ALLOW = ("::1/128", "127.0.0.0/8")


class ConfigError(Exception):
    """The configuration has problems; .problems lists (where, message)."""

    def __init__(self, problems):
        self.problems = problems
        Exception.__init__(self, "; ".join(
            "%s: %s" % (w, m) if w else m for w, m in problems))


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

def _is_name(s, extra=""):
    return bool(s) and all(c in _NAME_CHARS or c in extra for c in s)


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz"
                        "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
MAX_FILE = 1 << 20      # a config file larger than this is refused


def _uci_section(type, name, line):
    from microbroker.uci import Section
    return Section(type, name, line)


def parse_uci(data):
    """UCI text (bytes, or str) into ([uci.Section], [(line, problem)]),
    read as libuci reads it (see uci.py); names and values as str."""
    from microbroker import uci
    if isinstance(data, str):
        data = data.encode("utf-8")
    sections, problems = uci.parse(data)
    if problems:
        return [], problems
    problems = uci.decode(sections)
    return ([], problems) if problems else (sections, [])


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
            if not v.isascii():
                raise ValueError
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
    from microbroker.names import check_ifname
    return check_ifname(v) if v else ""


def _ifprefix(v):
    from microbroker.names import check_prefix
    return check_prefix(v)


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
    # New leases (not re-issues) per minute, all clients together, after a
    # burst of lease_burst; 0: no limit. Shared by CGI processes (the store).
    "lease_rate": (_int(0, 100000), 60, False),
    "lease_burst": (_int(1, 100000), 256, False),
    # When full, a lease that has carried no traffic (exit rx counters) this
    # many seconds after it was granted makes room for a newcomer; 0: never.
    "idle_grace": (_int(0, 7 * 86400), 600, False),
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
    # Client addresses (and leased prefixes) in log lines; off: they read
    # "[address]" (like tunneldigger-broker's log_ip_addresses)
    "log_client_addresses": (_bool, False, False),
    # Who may GET /metrics; loopback by default, empty: nobody
    "metrics_allow": (_prefix, [parse_prefix(t) for t in METRICS_ALLOW],
                      True),
    "max_body": (_int(64, 65536), 4096, False),     # bytes, else 413
    "max_header": (_int(256, 65536), 8192, False),  # bytes, else 413
    # `serve` only (under uhttpd its own -n/-N/-t options bound this):
    "max_connections": (_int(1, 4096), 64, False),  # all sources, else 503
    "source_connections": (_int(1, 4096), 8, False),  # per address, else 429
    # requests per second per source address (0: no limit), and how many
    # may come at once; past them 429 with Retry-After
    "request_rate": (_float(0, 10000), 5.0, False),
    "request_burst": (_int(1, 10000), 20, False),
    # seconds for one request: reading, answering and draining together
    "timeout": (_int(1, 300), 10, False),
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
    # renew_interval: at most (lifetime - RENEW_MARGIN) / 2, see _finish
    "lifetime": (_int(2 * 10 + RENEW_MARGIN, 7 * 86400), 600, False),
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
    euid = posix.geteuid() if euid is None else euid
    env = posixfs.environ() if environ is None else environ
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
        sec = _uci_section(stype, sname, 0)
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
    """Defaults that depend on other options; then the checks across
    options (configcheck.py)."""
    if not cfg.state_dir:
        cfg.state_dir = default_state_dir(euid, environ)
    cfg.lease_path = cfg.lease_file or cfg.state_dir.rstrip("/") + "/leases"
    for svc in cfg.services.values():
        svc.family = int(svc.family)
        if "renew_interval" not in svc._explicit:
            svc.renew_interval = max(10, min(svc.lifetime // 5, (
                svc.lifetime - RENEW_MARGIN) // 2))
        if svc.restrict == "dns+web" and not svc.ports:
            svc.ports = list(DNS_WEB_PORTS)
        if not svc.capacity or svc.capacity > cfg.max_leases:
            svc.capacity = cfg.max_leases
        kind = KINDS[svc.kind]
        if svc.encap in kind.encaps and not svc.mtu:
            svc.mtu = auto_mtu(svc.kind, svc.encap, svc.path_mtu)
        if kind.layer == 3:
            want = routed_provides(svc)
            for name in PROVIDES:
                if name in want and name not in svc.provides:
                    svc.provides.append(name)
        else:
            if not svc.bridge:
                svc.bridge = ("br-" + svc.name)[:15]
            for pool, name in ((svc.prefix_pool, "ipv6-prefix"),
                               (svc.ipv4_pool, "ipv4-public")):
                if pool and name not in svc.provides:
                    svc.provides.append(name)
    from microbroker import configcheck
    configcheck.check(cfg, at)


# Private and shared (CGN) IPv4 space: a routed client with such an address
# reaches the Internet only through the exit's NAT.
_PRIVATE4 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")


def routed_provides(svc):
    """What a routed service's pools give its clients, as `provides`
    names: every pool is offered (an IPv4 pool as the ipv4-* that
    `provides` names, else nat or public by its addresses)."""
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
    return want


def _pool_first(pool):
    """The packed first address of an IPv4 pool 'NET/LEN'."""
    return parse_prefix(pool)[1].to_bytes(4, "big")


def load(path=None, overrides=(), must_exist=None, euid=None, environ=None):
    """Read and check the config. `path` None means $MICROBROKER_CONFIG or
    /etc/config/microbroker, and a missing default file means built-in
    defaults; a path given explicitly must exist. Problems are collected in
    config.problems, never raised."""
    env = posixfs.environ() if environ is None else environ
    if path is None:
        path = env.get("MICROBROKER_CONFIG") or DEFAULT_PATH
        if must_exist is None:
            must_exist = path != DEFAULT_PATH
    elif must_exist is None:
        must_exist = True
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE + 1)
    except FileNotFoundError:
        if must_exist:
            cfg = build([], [], path, overrides, euid, env)
            cfg.problems.insert(0, (path, "no such file"))
            return cfg
        return build([], [], None, overrides, euid, env)
    except OSError as e:
        cfg = build([], [], path, overrides, euid, env)
        cfg.problems.insert(0, (path, "cannot read: %s" % e.strerror))
        return cfg
    if len(raw) > MAX_FILE:
        cfg = build([], [], path, overrides, euid, env)
        cfg.problems.insert(0, (path, "larger than %d bytes: not read"
                                % MAX_FILE))
        return cfg
    sections, problems = parse_uci(raw)
    cfg = build(sections, problems, path, overrides, euid, env)
    return cfg
