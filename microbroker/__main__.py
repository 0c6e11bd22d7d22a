"""Command line: python3 -m microbroker COMMAND (console script
`microbroker`). Imports are lazy, and the options are read by hand
(argparse costs more start-up time than a CGI request may take)."""

import sys

USAGE = """\
usage: microbroker [options] COMMAND

commands:
  serve          run the standalone HTTP server (until SIGTERM/SIGINT;
                 SIGHUP reloads the config)
  cgi            answer one CGI request from the environment
  offer          print the offer
  leases         list every lease with its kernel counters (--json)
  sweep          remove expired leases and their tunnels (for cron)
  reconcile      make the kernel match the lease store
  check-leases   read every lease record and check the store's invariants
  repair-leases  keep every lease that still reads, move the damaged
                 file aside (stop the server first), then reconcile
  check-config   report every problem in the config, with its line
  version        print the version

options:
  -c, --config FILE      config file (default $MICROBROKER_CONFIG or
                         /etc/config/microbroker; built-in defaults if
                         that does not exist)
  -s, --set SEC.OPT=VAL  override an option: broker.max_leases=10,
                         location.city=Berlin, service.NAME.mtu=1400
  -l, --listen ADDR      listen address, repeatable: [::]:8053, 0.0.0.0:8053
  --state-dir DIR        where the lease file lives
  --dataplane MODE       kernel (default) or none (grant leases, build
                         nothing: tests and dry runs)
  --log TARGET           stderr (default) or syslog
  --log-level LEVEL      debug, info, warning, error
  -f, --format FMT       json (default) or sh, for `offer`
  --json                 JSON instead of a table, for `leases`
  -h, --help             this text; `microbroker COMMAND -h`: that command's
"""

# command -> (synopsis, what it does, which options apply)
HELP = {
    "serve": ("serve [-c FILE] [-l ADDR]... [-s SEC.OPT=VAL]...",
              "Run the standalone HTTP server on every listen address until "
              "SIGTERM or SIGINT. SIGHUP reloads the config in place: "
              "changed services apply at once, leases of removed or "
              "reshaped services end, live tunnels of other services stay. "
              "At start the kernel is reconciled with the lease file.",
              "-c -s -l --state-dir --dataplane --log --log-level"),
    "cgi": ("cgi [-c FILE]",
            "Answer one CGI request (uhttpd: /cgi-bin/microbroker) from the "
            "environment; settings come from the config file only.", "-c"),
    "offer": ("offer [-c FILE] [-f json|sh]",
              "Print the offer a client would get (JSON or the shell "
              "format).", "-c -s -f"),
    "leases": ("leases [-c FILE] [--json]",
               "List every lease: client, service, kind, interface, state, "
               "age, expiry and the exit side's rx/tx counters, read from "
               "the kernel (the stored ones where the kernel has none).",
               "-c -s --state-dir --dataplane --json"),
    "sweep": ("sweep [-c FILE]",
              "Remove expired leases and their tunnels, print them (for "
              "cron, with the CGI front door).", "-c -s --state-dir"),
    "reconcile": ("reconcile [-c FILE]",
                  "Make the kernel match the lease file: rebuild missing "
                  "tunnels, remove orphaned ones; prints what it did.",
                  "-c -s --state-dir --dataplane"),
    "check-leases": ("check-leases [-c FILE]",
                     "Read every lease record and check the store's "
                     "invariants; exit 1 if something is wrong.",
                     "-c -s --state-dir"),
    "repair-leases": ("repair-leases [-c FILE]",
                      "Keep every lease that still reads, move the damaged "
                      "file aside (stop the server first), then run "
                      "reconcile.", "-c -s --state-dir"),
    "check-config": ("check-config [FILE]",
                     "Report every problem in the config with its line; "
                     "exit 1 if there is one, else summarise the services.",
                     "-c -s"),
    "version": ("version", "Print the version.", ""),
}


def command_help(command):
    import textwrap
    synopsis, text, opts = HELP[command]
    out = ["usage: microbroker " + synopsis, ""]
    out += textwrap.wrap(text, 76)
    if opts:
        out += ["", "options: " + opts + " (see microbroker -h)"]
    return "\n".join(out) + "\n"

COMMANDS = ("serve", "cgi", "offer", "leases", "sweep", "reconcile",
            "check-config", "check-leases", "repair-leases", "version")
# option -> (override key or None, takes a value)
OPTIONS = {
    "-c": "config", "--config": "config", "-s": "set", "--set": "set",
    "-l": "listen", "--listen": "listen", "--state-dir": "state_dir",
    "--dataplane": "dataplane", "--log": "log", "--log-level": "log_level",
    "-f": "format", "--format": "format",
}


class Usage(Exception):
    """A usage error (its text), or a help request (empty text); .command
    names the command whose help to print, if one was given."""

    command = None


def parse_args(argv):
    """-> (command, config path or None, [overrides], format, [args]);
    --json makes the format "json-table" (for leases)."""
    command, path, overrides, fmt, listen, rest = None, None, [], "json", \
        [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            e = Usage("")
            e.command = command or next((w for w in argv if w in COMMANDS),
                                        None)
            raise e
        if a == "--json":
            fmt = "json-table"
            i += 1
            continue
        name, eq, value = a.partition("=") if a.startswith("--") \
            else (a, "", "")
        if name in OPTIONS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise Usage("%s needs a value" % a)
                value = argv[i]
            key = OPTIONS[name]
            if key == "config":
                path = value
            elif key == "set":
                overrides.append(value)
            elif key == "listen":
                listen.append(value)
            elif key == "format":
                if value not in ("json", "sh"):
                    raise Usage("--format is json or sh")
                fmt = value
            else:
                overrides.append("broker.%s=%s" % (key, value))
        elif a.startswith("-") and a != "-":
            raise Usage("unknown option %s" % a)
        elif command is None:
            if a not in COMMANDS:
                raise Usage("unknown command %r" % a)
            command = a
        else:
            rest.append(a)
        i += 1
    if listen:
        overrides.append("broker.listen=" + " ".join(listen))
    if command is None:
        raise Usage("no command given")
    return command, path, overrides, fmt, rest


def _load(path, overrides):
    from microbroker import config
    return config.load(path, overrides)


def _report(cfg, out):
    for where, msg in cfg.problems:
        out.write("%s: %s\n" % (where, msg) if where else msg + "\n")


def cmd_check_config(path, overrides, rest):
    if rest:
        if len(rest) > 1 or path:
            raise Usage("check-config takes one file")
        path = rest[0]
    cfg = _load(path, overrides)
    if cfg.problems:
        _report(cfg, sys.stdout)
        sys.stdout.write("%d problem%s\n" % (len(cfg.problems), "" if len(
            cfg.problems) == 1 else "s"))
        return 1
    svcs = cfg.enabled_services()
    src = cfg.path or "built-in defaults (no %s)" % (
        path or "/etc/config/microbroker")
    sys.stdout.write(
        "ok: %s\n  listen %s\n  leases in %s (max %d, %d per client)\n"
        "  dataplane %s\n  services: %s\n" % (
            src, " ".join(cfg.listen), cfg.lease_path, cfg.max_leases,
            cfg.max_per_client, cfg.dataplane,
            ", ".join("%s (%s encap %s over IPv%d, mtu %d)" % (
                s.name, s.kind, s.encap, s.family, s.mtu) for s in svcs)))
    return 0


def cmd_leases(command, path, overrides):
    """check-leases / repair-leases: the store alone, without the broker
    (which would refuse a corrupt file), as JSON."""
    cfg = _load(path, overrides)
    if cfg.problems:
        _report(cfg, sys.stderr)
        return 1
    from microbroker.leases import LeaseStore
    from microbroker.web import to_json
    try:
        store = LeaseStore(cfg.lease_path, tunnel_ids=cfg.tunnel_ids,
                           session_ids=cfg.session_ids,
                           ifname_prefix=cfg.ifname_prefix)
        report = store.check() if command == "check-leases" else \
            store.repair()
    except Exception as e:
        code = getattr(e, "code", None)
        if code != "store" and not isinstance(e, (OSError, ValueError)):
            raise
        sys.stderr.write("microbroker: %s: %s\n" % (cfg.lease_path, e))
        return 1
    sys.stdout.write(to_json(report) + "\n")
    if command == "repair-leases":
        sys.stderr.write("microbroker: kept %d lease(s); run `microbroker "
                         "reconcile` (or start the server) to match the "
                         "kernel\n" % report.get("kept", 0))
        return 0
    return 0 if report.get("ok") else 1


def _app(path, overrides):
    cfg = _load(path, overrides)
    if cfg.problems:
        _report(cfg, sys.stderr)
        sys.stderr.write("microbroker: config has problems, see above (or "
                         "run check-config)\n")
        return None
    from microbroker.broker import log
    log.configure(cfg.log, cfg.log_level, cfg.log_client_addresses)
    from microbroker.web import App
    return App(cfg)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        command, path, overrides, fmt, rest = parse_args(argv)
        if rest and command != "check-config":
            raise Usage("%s takes no arguments" % command)
    except Usage as e:
        if not str(e) and e.command:
            sys.stdout.write(command_help(e.command))
            return 0
        if str(e):
            sys.stderr.write("microbroker: %s\n\n" % e)
        (sys.stderr if str(e) else sys.stdout).write(USAGE)
        return 2 if str(e) else 0

    if command == "version":
        from microbroker import __version__
        sys.stdout.write("microbroker %s\n" % __version__)
        return 0
    if command == "cgi":
        if path:
            import os
            os.environ["MICROBROKER_CONFIG"] = path
        if overrides:
            sys.stderr.write("microbroker: cgi takes its settings from the "
                             "config file only\n")
            return 2
        from microbroker.cgi import run
        run()       # answers, then ends the process
    if command == "check-config":
        return cmd_check_config(path, overrides, rest)

    if command in ("check-leases", "repair-leases"):
        return cmd_leases(command, path, overrides)

    app = _app(path, overrides)
    if app is None:
        return 1
    from microbroker.broker import BrokerError, log
    try:
        if command == "serve":
            # http.client (imported by http.server) loads ssl when it can:
            # libssl and libcrypto, ~4 MiB resident in a process that never
            # speaks TLS (OpenWrt's python3-light has no ssl at all). None
            # in sys.modules makes `import ssl` fail for the whole process,
            # so http.client and anything after it (urllib.request) agree.
            sys.modules.setdefault("ssl", None)
            from microbroker.service import serve
            serve(app, lambda: _load(path, overrides))
            return 0
        b = app.broker
        if command == "offer":
            status, headers, body = app.answer(200, b.offer(), fmt)
            sys.stdout.write(body.decode("utf-8"))
        elif command == "leases":
            from microbroker import listing
            rows = listing.rows(b.store, b.dataplane, b.clock())
            sys.stdout.write(listing.to_json(rows) if fmt == "json-table"
                             else listing.table(rows))
        elif command == "sweep":
            gone = b.sweep()
            if gone:
                from microbroker import metrics
                metrics.expired(app.config, gone)
            for lease in gone:
                sys.stdout.write("expired %s %s %s\n" % (
                    lease.lease_id, lease.service, lease.client))
        elif command == "reconcile":
            from microbroker.web import to_json
            sys.stdout.write(to_json(b.reconcile() or {}) + "\n")
        return 0
    except BrokerError as e:
        log("error", "%s: %s", e.code, e.message)
        return 1
    except OSError as e:
        log("error", "%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
