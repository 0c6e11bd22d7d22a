"""The CGI front door, for uhttpd or any CGI server.

Shares every line of request handling with the server (web.App); never
imports http.server nor the `cgi` module (gone in Python 3.13). Expired
leases are swept on requests, at most once per sweep_interval, so no
daemon is needed (or run `microbroker sweep` from cron).

Paths follow PATH_INFO: /cgi-bin/microbroker/lease -> /lease. The config
is $MICROBROKER_CONFIG or /etc/config/microbroker. The exit's endpoint for
services without `endpoint` is SERVER_ADDR, the address the request
arrived on.

The CGI script calls run(); main() is the same answer without ending the
process (tests, or a caller that goes on).
"""

import posix
import sys


def request_from_env(env, max_body, stdin):
    """CGI environment -> (method, path, query, headers, body,
    content_length, remote, local). body is None when over max_body."""
    headers = {}
    for k, v in env.items():
        if k.startswith("HTTP_"):
            headers[k[5:].lower().replace("_", "-")] = v
    if env.get("CONTENT_TYPE"):
        headers["content-type"] = env["CONTENT_TYPE"]
    cl = env.get("CONTENT_LENGTH", "")
    method = env.get("REQUEST_METHOD", "GET")
    if cl:
        headers["content-length"] = cl
        ok = cl.isascii() and cl.isdigit() and len(cl) <= 15
        n = int(cl) if ok else -1
        if n < 0:
            body = b""
        elif n > max_body:
            body = None
        else:
            body = _read(stdin, n) if n else b""
    elif method in ("GET", "HEAD"):
        n, body = 0, b""
    else:
        # uhttpd passes a chunked body de-chunked, with no CONTENT_LENGTH:
        # the body is whatever stdin holds until EOF.
        body = _read(stdin, max_body + 1)
        n = len(body)
        if n > max_body:
            body = None
    return (method, env.get("PATH_INFO", ""),
            env.get("QUERY_STRING", ""), headers, body, n,
            env.get("REMOTE_ADDR", ""), env.get("SERVER_ADDR", ""))


def _read(stdin, n):
    """Up to n bytes: all of them unless EOF comes first (a pipe gives
    what it has, not what was asked for)."""
    parts = []
    while n > 0:
        b = stdin.read(n)
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def run():
    """The CGI script's entry: answer this process's request, then end it.

    The interpreter's orderly shutdown frees every module and object one by
    one: ~4 ms after a CGI request's imports, over a quarter of a bare
    interpreter's start, for a process that is about to end anyway. Of it
    the answer needs only stdout and stderr flushed, done here; the lease
    store and the counters files are written to survive a kill at any
    instruction, and this is less than that. For the same reason the
    cyclic garbage collector is off: its passes over what the imports made
    (~0.27 ms of a lease or renew) would free nothing this one request
    misses."""
    import gc
    gc.disable()
    status = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        posix._exit(status)


def main(environ=None, stdin=None, stdout=None):
    """Answer the one request this process was started for; 0."""
    if environ is None:
        from microbroker import posixfs
        environ = posixfs.environ()
    env = environ
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stdout = stdout if stdout is not None else sys.stdout.buffer
    try:
        return _main(env, stdin, stdout)
    except Exception as e:
        # Whatever broke, the client still gets an answer it can read.
        sys.stderr.write("microbroker: error: %s: %s\n"
                         % (type(e).__name__, e))
        sh = "format=sh" in env.get("QUERY_STRING", "").split("&")
        if sh:
            body = (b"STATUS='500'\nERROR='internal'\nMESSAGE='internal "
                    b"error; see the broker log'\n")
            head = b"Status: 200 OK\r\nContent-Type: text/plain\r\n"
        else:
            body = (b'{"error":{"code":"internal","message":"internal '
                    b'error; see the broker log"}}\n')
            head = (b"Status: 500 Internal Server Error\r\n"
                    b"Content-Type: application/json\r\n")
        stdout.write(head + b"Content-Length: %d\r\n\r\n" % len(body)
                     + body)
        stdout.flush()
        return 0


def _main(env, stdin, stdout):
    from microbroker import config as _config
    from microbroker import web
    from microbroker.broker import BrokerError, log

    cfg = _config.load(environ=env)
    if cfg.problems:
        log("error", "config: %d problem(s), first: %s: %s",
            len(cfg.problems), *cfg.problems[0])
        app = web.config_error_app(cfg.problems)
        max_body = 4096
    else:
        log.configure(cfg.log, cfg.log_level, cfg.log_client_addresses)
        app = web.App(cfg, sweep_on_request=True, lazy_store=True)
        max_body = cfg.max_body
    method, path, query, headers, body, n, remote, local = \
        request_from_env(env, max_body, stdin)
    if n < 0:
        status, hdrs, out = app.error(BrokerError(
            "bad_request", "bad Content-Length"),
            web.answer_format(query))
    else:
        status, hdrs, out = app.handle(method, path, query, headers, body,
                                       remote, local, n)
    head = ["Status: %d %s" % (status, web.REASONS.get(status, "Error"))]
    head += ["%s: %s" % h for h in hdrs]
    head += ["Content-Length: %d" % len(out), "", ""]
    stdout.write("\r\n".join(head).encode("latin-1") + out)
    stdout.flush()
    return 0
