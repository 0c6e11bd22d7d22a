"""The one request handler behind both front doors (frontdoor.py and server.py, cgi.py).

    App(config).handle(method, path, query, headers, body, remote, local,
                       content_length) -> (status, [(name, value)], bytes)

Everything a request can get wrong is decided here, so the standalone
server and the CGI entry answer byte for byte the same. This module never
imports http.server, email, urllib, json (only to read JSON bodies) nor
anything kernel-related: on OpenWrt those are separate packages, and each
import is start-up time for every CGI request.
"""

import sys

from microbroker import broker as _broker
from microbroker.broker import BrokerError, log

from microbroker.config import parse_addr, format_addr, addr_kind
from microbroker.jsonlite import dumps

REASONS = {
    200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
    429: "Too Many Requests", 500: "Internal Server Error",
    503: "Service Unavailable",
}

# Error code -> HTTP status: the one table, used for every error answer.
STATUS = {
    "bad_request": 400, "forbidden": 403, "not_found": 404,
    "unknown_service": 404, "unknown_kind": 404, "method_not_allowed": 405,
    "id_conflict": 409, "too_large": 413, "too_many": 429, "full": 503,
    "ids_exhausted": 503, "pool_exhausted": 503, "unavailable": 503,
    "busy": 503, "kernel": 500, "store": 500, "internal": 500,
}
DEFAULT_RETRY = 60      # Retry-After of a 429/503 that names none
BUSY_RETRY = 2          # the lease store's lock was held too long

# path -> (allowed methods, required fields, optional fields)
OFFERS_KEPT = 16     # offer answers serve keeps (local address x format)

ROUTES = {
    "/offer": (("GET", "POST"), (), ()),
    # service or kind: checked by the broker, which knows what is offered.
    "/lease": (("POST",), (),
               ("service", "kind", "tunnel_id", "session_id", "udp_sport",
                "token")),
    "/renew": (("POST",), ("lease_id", "secret"), ()),
    "/release": (("POST",), ("lease_id", "secret"), ()),
    "/status": (("GET", "POST"), ("lease_id", "secret"), ()),
}

_HEX = frozenset("0123456789abcdef")
_NAME = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                  "0123456789_")
MAX_FIELD = 256


def show(s, n=40):
    """Client-supplied text for a message: printable ASCII, shortened."""
    t = "".join(c if " " <= c <= "~" and c not in "'\\" else "?"
                for c in s[:n])
    return t + "..." if len(s) > n else t


def _digits(v):
    """ASCII digits only: str.isdigit() also takes '\xb2' (which int()
    refuses) and other scripts' digits (which int() reads)."""
    return v.isascii() and v.isdigit()


def _u32(name, v):
    if not _digits(v) or len(v) > 10 or not 1 <= int(v) <= 0xFFFFFFFF:
        raise BrokerError("bad_request", "%s needs a number from 1 to "
                          "4294967295" % name)
    return int(v)


def _check_field(name, v):
    """Syntax of every field; returns the typed value."""
    if name in ("tunnel_id", "session_id"):
        return _u32(name, v)
    if name == "udp_sport":
        if not _digits(v) or len(v) > 5 or not 1 <= int(v) <= 65535:
            raise BrokerError("bad_request", "udp_sport needs a port from "
                              "1 to 65535")
        return int(v)
    if name == "service":
        if not 1 <= len(v) <= 32 or not set(v) <= _NAME:
            raise BrokerError("bad_request", "service names are 1-32 "
                              "letters, digits or _")
        return v
    if name == "kind":
        if not 1 <= len(v) <= 16 or not set(v) <= _NAME:
            raise BrokerError("bad_request", "kind names are 1-16 letters, "
                              "digits or _, e.g. l2tpv3")
        return v
    if name == "lease_id":
        if len(v) != 16 or not set(v) <= _HEX:
            raise BrokerError("bad_request", "lease_id is 16 lowercase hex "
                              "digits")
        return v
    if name == "secret":
        if len(v) != 32 or not set(v) <= _HEX:
            raise BrokerError("bad_request", "secret is 32 lowercase hex "
                              "digits")
        return v
    if name == "token":
        if len(v) > 128 or any(not "!" <= c <= "~" or c in "'\"\\"
                               for c in v):
            raise BrokerError("bad_request", "tokens are up to 128 "
                              "printable characters without blanks or "
                              "quotes")
        return v
    if name == "format":
        if v not in ("json", "sh"):
            raise BrokerError("bad_request", "format is json or sh")
        return v
    raise BrokerError("bad_request", "unknown field %s" % show(name))


# ---------------------------------------------------------------- decoding

def _unquote(b):
    """Form-urlencoded bytes -> str; '+' is a blank, %XX a byte."""
    b = b.replace(b"+", b" ")
    if b"%" in b:
        parts = b.split(b"%")
        out = [parts[0]]
        for p in parts[1:]:
            h = p[:2]
            if len(h) != 2 or not all(c in b"0123456789abcdefABCDEF"
                                      for c in h):
                raise BrokerError("bad_request", "bad %-escape in form data")
            out.append(bytes((int(h, 16),)))
            out.append(p[2:])
        b = b"".join(out)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise BrokerError("bad_request", "form data is not UTF-8")


def parse_form(data):
    """Decode application/x-www-form-urlencoded (bytes) into pairs."""
    pairs = []
    for part in data.split(b"&"):
        if not part:
            continue
        k, _, v = part.partition(b"=")
        pairs.append((_unquote(k), _unquote(v)))
    return pairs


def parse_json_body(body):
    import json  # only clients that send JSON pay for it
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BrokerError("bad_request", "body is not valid JSON")
    except RecursionError:
        # json's parser recurses once per [ or {; ours are flat objects.
        raise BrokerError("bad_request", "JSON body nested too deep")
    if not isinstance(obj, dict):
        raise BrokerError("bad_request", "JSON body must be an object")
    pairs = []
    for k, v in obj.items():
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise BrokerError("bad_request", "field %s must be a string or "
                              "a whole number" % show(k))
        pairs.append((k, str(v)))
    return pairs


def _collect(pairs, fields):
    for k, v in pairs:
        # format may be in both the query and the body (the client puts it
        # in the query so that errors before the body is read use it).
        if k in fields and not (k == "format" and fields[k] == v):
            raise BrokerError("bad_request", "field %s given twice" % show(k))
        if len(v) > MAX_FIELD:
            raise BrokerError("bad_request", "field %s is too long" % show(k))
        if any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise BrokerError("bad_request", "field %s contains control "
                              "characters" % show(k))
        fields[k] = v


def answer_format(query):
    """The format a query string asks for (as parse_form would read it),
    for errors found before the rest of the request is judged."""
    if "format" not in query and "%" not in query:
        return "json"
    return _format_in(query.encode("latin-1", "replace"))


def _format_in(data):
    for part in data.split(b"&"):
        k, _, v = part.partition(b"=")
        try:
            if _unquote(k) == "format" and _unquote(v) == "sh":
                return "sh"
        except BrokerError:
            pass
    return "json"


# ---------------------------------------------------------------- encoding

to_json = dumps     # (the name the front doors and the CLI know)


_SH_KEY0 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_SH_KEY = _SH_KEY0 | frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
_SH_DROP = {i: None for i in list(range(32)) + [39, 127]}


def sh_value(v):
    """A value safe between single quotes on one line: quotes, newlines,
    NUL and other control characters are dropped."""
    if v is None:
        return ""
    if v is True or v is False:
        return "1" if v else "0"
    if isinstance(v, (list, tuple)):
        v = " ".join(sh_value(x) for x in v)
    elif isinstance(v, float):
        v = repr(v)
    return str(v).translate(_SH_DROP)


def sh_key(k):
    # Service names appear verbatim in SVC_<name>_<KEY>, so lowercase is
    # allowed after the first character.
    if not k or k[0] not in _SH_KEY0 or not set(k) <= _SH_KEY:
        raise ValueError("bad shell key %r" % k)
    return k


def flatten(obj):
    """Nested answer -> [(KEY, value)]: dict keys joined with '_' and
    upper-cased; `services` become SERVICES plus SVC_<name>_<KEY>;
    `counters` are not prefixed."""
    out = []
    for k, v in obj.items():
        if k == "services":
            out.append(("SERVICES", list(v)))
            for name, svc in v.items():
                for sk, sv in svc.items():
                    out.append(("SVC_%s_%s" % (name, sk.upper()), sv))
        elif isinstance(v, dict):
            prefix = "" if k == "counters" else k.upper() + "_"
            for sk, sv in v.items():
                out.append((prefix + sk.upper(), sv))
        else:
            out.append((k.upper(), v))
    return out


def to_sh(pairs):
    return "".join("%s='%s'\n" % (sh_key(k), sh_value(v)) for k, v in pairs)


# ---------------------------------------------------------------- the app

class App:
    """One configured broker behind the HTTP surface. The broker (lease
    store, data plane) is made on first use, so a bad path or method never
    touches the disk."""

    def __init__(self, config, broker=None, sweep_on_request=False,
                 lazy_store=False):
        import _thread
        self.config = config
        self._broker = broker
        self._making = _thread.allocate_lock()
        self.sweep_on_request = sweep_on_request
        # a CGI: the store opens when the request needs it (an offer never)
        self.lazy_store = lazy_store
        # serve's limits.WorkGate; a CGI is one request and needs none
        self.gate = None
        # serve's offer answers by what they are made of (_offer); a CGI's
        # one request needs none
        self.offers = None

    @property
    def broker(self):
        if self._broker is None:
            with self._making:   # server threads: make exactly one
                if self._broker is None:
                    from microbroker.wiring import make_broker
                    self._broker = make_broker(self.config, lazy=self.lazy_store)
        return self._broker

    def handle(self, method, path, query="", headers=None, body=b"",
               remote="", local="", content_length=None):
        """Answer one request. `headers` has lowercase names; `body` is
        None when the adapter did not read it because content_length was
        over the limit; `remote`/`local` are the peer's and our address."""
        headers = headers or {}
        # Errors use the answer format as far as it is known: a shell
        # client must get its 200 even when the rest of the request is bad.
        fmt = [answer_format(query)]
        if body and fmt[0] != "sh" and b"format" in body:
            fmt[0] = _format_in(body)
        try:
            return self._handle(method, path, query, headers, body, remote,
                                local, content_length, fmt)
        except Exception as e:
            code = http_error(e)[1]
            self._count(code=code)
            if not isinstance(e, BrokerError) and code == "internal":
                log("error", "internal error on %s %s: %s: %s", method,
                    show(path), type(e).__name__, e)
                if _broker.log.level <= 10:
                    import traceback
                    traceback.print_exc()
            return self.error(e, fmt[0])

    def _handle(self, method, path, query, headers, body, remote, local,
                content_length, fmt):
        cfg = self.config
        size = len(path) + len(query) + sum(len(k) + len(v) + 4
                                            for k, v in headers.items())
        if size > cfg.max_header:
            raise BrokerError("too_large", "request headers exceed %d bytes"
                              % cfg.max_header)
        if content_length is None:
            content_length = len(body or b"")
        if body is None or content_length > cfg.max_body or \
                len(body) > cfg.max_body:
            raise BrokerError("too_large", "request body exceeds %d bytes"
                              % cfg.max_body)
        route = "/offer" if path in ("", "/") else path
        if route == "/metrics":   # before allow/deny: a scraper is no client
            from microbroker import metrics
            return metrics.answer(self, method, remote)
        spec = ROUTES.get(route)
        if spec is None:
            raise BrokerError("not_found", "no such path %s; try /offer, "
                              "/lease, /renew, /release, /status"
                              % show(path))
        methods, required, optional = spec
        if method not in methods:
            e = BrokerError("method_not_allowed", "%s needs %s"
                            % (route, " or ".join(methods)))
            e.allow = ", ".join(methods)
            raise e
        try:
            family, packed = parse_addr(remote)
        except ValueError:
            raise BrokerError("bad_request", "cannot read the client "
                              "address %s" % show(remote))
        client = format_addr(family, packed)
        try:
            lfam, lpacked = parse_addr(local)
            local = format_addr(lfam, lpacked)
        except ValueError:
            local = ""
        _broker.check_client(cfg, family, packed)

        pairs = []
        if query:
            pairs += parse_form(query.encode("latin-1", "replace"))
        if body:
            ctype = headers.get("content-type", "").split(";")[0].strip() \
                .lower()
            if ctype == "application/x-www-form-urlencoded":
                pairs += parse_form(body)
            elif ctype == "application/json":
                pairs += parse_json_body(body)
            else:
                raise BrokerError("bad_request", "send the body as "
                                  "application/x-www-form-urlencoded or "
                                  "application/json")
        for k, v in pairs:
            if k == "format" and v == "sh":
                fmt[0] = "sh"   # (a JSON body's format, for what follows)
        fields = {}
        _collect(pairs, fields)
        if fields.get("format") in ("json", "sh"):
            fmt[0] = fields["format"]
        args = {}
        for k, v in fields.items():
            if k != "format" and k not in required and k not in optional:
                raise BrokerError("bad_request", "unknown field %s for %s"
                                  % (show(k), route))
            args[k] = _check_field(k, v)
        args.pop("format", None)
        for k in required:
            if k not in args:
                raise BrokerError("bad_request", "missing field %s" % k)

        b = self.broker
        if self.sweep_on_request:
            self._maybe_sweep(b)
        if route == "/offer":
            return self._offer(b, local, fmt[0])
        if route == "/status":
            answer = b.status(client, **args)
        elif route == "/lease":
            why = addr_kind(family, packed)
            if why:
                raise BrokerError("bad_request", "a %s address cannot be a "
                                  "tunnel endpoint" % why)
            answer = self._gated(b.lease, client, local=local, **args)
        elif route == "/renew":
            answer = self._gated(b.renew, client, **args)
        else:
            answer = b.release(client, **args)
        self._count(route, answer)
        return self.answer(200, answer, fmt[0])

    def _offer(self, b, local, fmt):
        """The offer's answer; where self.offers is a dict, kept there
        while everything it is made of stays the same (serve answers
        every offer in one thread, and encoding it was most of the cost)."""
        if self.offers is None:
            return self.answer(200, b.offer(local), fmt)
        status, counts = b.kernel_status(), b.counts()
        key = (id(b.config), local, fmt, status[0], status[1],
               tuple(sorted(status[2].items())), counts[0],
               tuple(sorted(counts[1].items())))
        got = self.offers.get(key)
        if got is None:
            got = self.answer(200, b.offer(local, status, counts), fmt)
            if len(self.offers) >= OFFERS_KEPT:
                self.offers.clear()
            self.offers[key] = got
        return got

    def _gated(self, call, *args, **kwargs):
        """A lease or renew (whose heal may build a tunnel again): through
        the gate where there is one. A release builds nothing and does not
        wait behind builds: a storm of clients stopping at once was told
        "busy" and left its leases to expire."""
        if self.gate is None:
            return call(*args, **kwargs)
        with self.gate:
            return call(*args, **kwargs)

    def _count(self, route=None, answer=None, code=None):
        """Counters for /metrics, shared by every process (metrics.py)."""
        if code is None and route not in ("/lease", "/renew", "/release"):
            return
        from microbroker import metrics
        metrics.note(self.config, route, answer, code)

    def _maybe_sweep(self, b):
        """Expiry without a daemon: at most one sweep per sweep_interval,
        across all CGI processes, timed by a stamp file's mtime."""
        import posix
        import time
        stamp = self.config.state_dir.rstrip("/") + "/sweep.stamp"
        now = time.time()
        try:
            if now - posix.stat(stamp).st_mtime < self.config.sweep_interval:
                return
        except FileNotFoundError:
            pass
        except OSError as e:
            log("warning", "sweep stamp %s: %s", stamp, e)
            return
        # Opening the store makes the state directory the stamp lives in
        # (a CGI opens it lazily: this may be the first request).
        b.store  # noqa: B018
        try:
            with open(stamp, "a"):
                pass
            posix.utime(stamp, (now, now))
            gone = b.sweep()
            if gone:
                from microbroker import metrics
                metrics.expired(self.config, gone)
        except BrokerError as e:
            log("warning", "sweep: %s", e.message)
        except OSError as e:
            log("warning", "sweep stamp %s: %s", stamp, e)

    # -- rendering

    def answer(self, status, obj, fmt):
        if fmt == "sh":
            pairs = [("STATUS", status), ("ERROR", "")] + flatten(obj)
            return 200, _headers("text/plain; charset=utf-8"), \
                to_sh(pairs).encode("utf-8")
        return status, _headers("application/json"), \
            (to_json(obj) + "\n").encode("utf-8")

    def error(self, e, fmt="json"):
        """The answer for any exception raised while handling a request."""
        status, code, message, retry = http_error(e)
        extra = []
        if retry is not None:
            extra.append(("Retry-After", str(retry)))
        allow = getattr(e, "allow", None)
        if allow:
            extra.append(("Allow", allow))
        if fmt == "sh":
            pairs = [("STATUS", status), ("ERROR", code),
                     ("MESSAGE", message)]
            if retry is not None:
                pairs.append(("RETRY_AFTER", retry))
            return 200, _headers("text/plain; charset=utf-8") + extra, \
                to_sh(pairs).encode("utf-8")
        obj = {"error": {"code": code, "message": message}}
        if retry is not None:
            obj["error"]["retry_after"] = retry
        return status, _headers("application/json") + extra, \
            (to_json(obj) + "\n").encode("utf-8")


def http_error(e):
    """Any exception -> (status, code, message, retry_after or None): the
    one place where errors become HTTP answers, by class."""
    # The lease store's classes, if the store was loaded at all (a CGI
    # refused before it opened the store does not import it for this);
    # () where not (yet: another thread may be importing it), which no
    # exception is an instance of.
    leases = sys.modules.get("microbroker.leases.errors")
    Locked = getattr(leases, "Locked", ())
    LeaseError = getattr(leases, "LeaseError", ())
    StoreError = getattr(leases, "StoreError", ())
    # A store error may arrive wrapped in a BrokerError (raised while
    # handling it): the class of what was wrapped decides.
    for x in (e, e.__cause__, e.__context__):
        if isinstance(x, Locked):
            return 503, "busy", "the lease store is busy, try again", \
                BUSY_RETRY
    if isinstance(e, BrokerError):
        code, message = e.code, e.message
        retry = e.retry_after
    elif isinstance(e, LeaseError):
        code, message = e.code, str(e) or e.code.replace("_", " ")
        retry = e.retry_after
    elif isinstance(e, StoreError):
        log("error", "lease store: %s", e)
        code, message = "store", "the lease store is not usable; see the " \
            "broker log"
        retry = None
    else:
        code, message = "internal", "internal error; see the broker log"
        retry = None
    status = STATUS.get(code, 500)
    if retry is None and status in (429, 503):
        retry = DEFAULT_RETRY
    return status, code, message, None if retry is None else int(retry)


def _headers(ctype):
    return [("Content-Type", ctype), ("Cache-Control", "no-store")]


def config_error_app(problems):
    """An App stand-in that answers every request with `unavailable`, for a
    CGI whose config does not load: the client can still read why."""
    n = len(problems)
    msg = ("this broker's configuration has %d problem%s; its operator "
           "should run microbroker check-config" % (n, "" if n == 1 else "s"))

    class _Broken(App):
        def __init__(self):
            pass

        def handle(self, method, path, query="", headers=None, body=b"",
                   *a, **kw):
            fmt = answer_format(query or "")
            if body and fmt != "sh" and b"format" in body:
                fmt = _format_in(body)
            return self.error(BrokerError("unavailable", msg), fmt)
    return _Broken()
