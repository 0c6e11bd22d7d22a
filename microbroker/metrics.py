"""GET /metrics: the broker in Prometheus' text format (version 0.0.4).

Gauges come from the lease store at scrape time: leases by service and
state, each service's capacity, the broker's max_leases, whether the
kernel can build tunnels. Counters (grants, renews, releases, expiries,
errors by code) must add up over every process that answers requests:
the threaded server and any number of CGI processes at once. They live
in a small text file beside the lease file (LEASE_FILE.stats) of
`name{labels} value` lines (linefile.py), a series' value the sum of its
lines: a count appends one line under a lock of its own
(LEASE_FILE.stats.lock), never under the lease store's lock, and past
COMPACT bytes the file is rewritten with one line per series. A line a
kill cut short is skipped by readers and cut off by the next count: that
count is lost, the others stay. The file is not fsynced: counters are
monitoring, not state.
"""

import posix

from microbroker import linefile

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "microbroker_"
STATES = ("pending", "up", "closing")

# counter -> help text; the label each one carries
COUNTERS = {
    "grants_total": ("Leases granted or re-issued, by service.", "service"),
    "renews_total": ("Leases renewed, by service.", "service"),
    "releases_total": ("Leases released by their clients.", None),
    "expiries_total": ("Leases expired and torn down.", None),
    "errors_total": ("Requests answered with an error, by code.", "code"),
}

_lock = None


def stats_path(config):
    return config.lease_path + ".stats"


def _safe(v):
    # Label values are service names and error codes (letters, digits, _);
    # anything else is not ours and is not written.
    return bool(v) and len(v) <= 64 and all(
        c.isascii() and (c.isalnum() or c == "_") for c in v)


def _key(name, value=None):
    """The series a counter is kept as: name{label="value"}."""
    label = COUNTERS[name][1]
    if label and value is not None and _safe(value):
        return '%s%s{%s="%s"}' % (PREFIX, name, label, value)
    return PREFIX + name


def read(path):
    """{series: value} from the stats file ({} if missing): the sum of each
    series' complete lines; a line that does not parse is skipped."""
    try:
        with open(path, "rb") as f:
            text = f.read(READ_LIMIT)
    except OSError:
        return {}
    out = {}
    prefix = PREFIX.encode()
    for line in text.split(b"\n")[:-1]:
        series, _, value = line.rpartition(b" ")
        if not series.startswith(prefix) or not value.isdigit() \
                or len(value) > 18 or not series.isascii():
            continue
        series = series.decode()
        out[series] = out.get(series, 0) + int(value)
    return out


READ_LIMIT = 1 << 20    # bytes of the stats file read() reads
# Seconds a count waits for the stats file's lock before it is dropped.
COUNT_WAIT = 0.2
# Bytes of lines past which the next count rewrites the file, one line a
# series.
COMPACT = 16384


def _lock_within(fd, seconds):
    import fcntl
    import time
    end = time.monotonic() + seconds
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() >= end:
                return False
            time.sleep(0.005)


def count(path, name, label_value=None, n=1):
    """Add n to one counter in the stats file, under its own lock. A
    failure (read-only state dir, full disk, the lock held past
    COUNT_WAIT by a stopped process) loses the count, never the request
    nor its time."""
    global _lock
    if n <= 0:
        return
    if _lock is None:
        import _thread
        _lock = _thread.allocate_lock()
    key = _key(name, label_value)
    with _lock:     # fcntl locks are per process: threads take this first
        try:
            fd = posix.open(path + ".lock", posix.O_RDWR | posix.O_CREAT | posix.O_CLOEXEC,
                         0o600)
        except OSError:
            return
        try:
            if not _lock_within(fd, COUNT_WAIT):
                return
            def whole():
                values = read(path)
                values[key] = values.get(key, 0) + n
                return b"".join(b"%s %d\n" % (k.encode(), v)
                                for k, v in sorted(values.items()))
            linefile.add(path, b"%s %d\n" % (key.encode(), n), 0o600, COMPACT, whole,
                         READ_LIMIT)
        except OSError:
            pass
        finally:
            posix.close(fd)


def _esc(v):
    return str(v).replace("\\", "\\\\").replace("\n", "\\n") \
        .replace('"', '\\"')


def render(config, store, kernel_ok=None):
    """The whole scrape as text."""
    from microbroker import __version__
    out = []

    def metric(name, kind, help_text, samples):
        out.append("# HELP %s%s %s" % (PREFIX, name, help_text))
        out.append("# TYPE %s%s %s" % (PREFIX, name, kind))
        for labels, value in samples:
            lab = ",".join('%s="%s"' % (k, _esc(v)) for k, v in labels)
            out.append("%s%s%s %s" % (PREFIX, name, "{%s}" % lab if lab
                                      else "", value))

    services = [s.name for s in config.enabled_services()]
    by = {(s, st): 0 for s in services for st in STATES}
    for lease in store.leases():
        k = (lease.service, lease.state)
        by[k] = by.get(k, 0) + 1
    metric("info", "gauge", "The broker's version.",
           [((("version", __version__), ("name", config.name)), 1)])
    metric("leases", "gauge", "Leases in the store, by service and state.",
           [((("service", s), ("state", st)), n)
            for (s, st), n in sorted(by.items())])
    metric("capacity", "gauge", "Leases a service may hold.",
           [((("service", s.name),), s.capacity)
            for s in config.enabled_services()])
    metric("leases_max", "gauge", "Leases the broker may hold in all.",
           [((), config.max_leases)])
    if kernel_ok is not None:
        metric("kernel_ok", "gauge", "1 if this host can build the enabled "
               "services' tunnels.", [((), 1 if kernel_ok else 0)])
    values = read(stats_path(config))
    for name, (help_text, label) in COUNTERS.items():
        series = PREFIX + name
        samples = []
        for key, v in sorted(values.items()):
            if key == series:
                samples.append(((), v))
            elif key.startswith(series + "{"):
                lv = key[len(series) + 2 + len(label) + 1:-2]
                samples.append((((label, lv),), v))
        if not samples and not label:
            samples = [((), 0)]
        metric(name, "counter", help_text, samples)
    return "\n".join(out) + "\n"


# route -> the counter its successful answer adds to
ROUTE_COUNTERS = {"/lease": "grants_total", "/renew": "renews_total",
                  "/release": "releases_total"}


def note(config, route=None, answer=None, code=None):
    """Count one answer: a route's success (web.App) or an error code."""
    path = stats_path(config)
    if code is not None:
        count(path, "errors_total", code)
    elif route in ROUTE_COUNTERS:
        count(path, ROUTE_COUNTERS[route], (answer or {}).get("service"))


def expired(config, leases):
    count(stats_path(config), "expiries_total", n=len(leases))


def allowed(config, remote):
    """May `remote` (the peer's address as text) read /metrics?"""
    from microbroker.config import in_prefixes, parse_addr
    try:
        family, packed = parse_addr(remote)
    except ValueError:
        return False
    return in_prefixes(family, packed, config.metrics_allow or [])


def answer(app, method, remote):
    """(status, headers, body) for GET /metrics; BrokerError if refused."""
    from microbroker.broker import BrokerError
    if method != "GET":
        e = BrokerError("method_not_allowed", "/metrics needs GET")
        e.allow = "GET"
        raise e
    if not allowed(app.config, remote):
        raise BrokerError("forbidden", "/metrics is not for your address "
                          "(broker option metrics_allow)")
    b = app.broker
    try:
        ok = b.kernel_status()[0] or getattr(b.dataplane, "dry_run", False)
    except Exception:
        ok = False
    try:
        body = render(app.config, b.store, ok)
    except Exception as e:
        from microbroker.broker import _store_error
        raise _store_error(e) or e
    return 200, [("Content-Type", CONTENT_TYPE),
                 ("Cache-Control", "no-store")], body.encode("utf-8")
