"""Logging for the broker and its front doors: stderr or syslog, by level.

`logging` is a separate package on OpenWrt (python3-logging) and costs
start-up time; this is all the broker needs.
"""

import sys


LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Log:
    def __init__(self):
        self.level = LEVELS["info"]
        self.syslog = None
        self.hide_addresses = False

    def configure(self, target="stderr", level="info",
                  client_addresses=False):
        """client_addresses False: logmask.py keeps them out of lines (loaded
        by the first line that has arguments: most CGI requests log none)."""
        self.level = LEVELS[level]
        self.syslog = None
        self.hide_addresses = not client_addresses
        if target == "syslog":
            try:
                import syslog
            except ImportError:
                self("warning", "no syslog module here, logging to stderr")
                return
            syslog.openlog("microbroker", syslog.LOG_PID, syslog.LOG_DAEMON)
            self.syslog = syslog

    def __call__(self, level, message, *args):
        n = LEVELS[level]
        if n < self.level:
            return
        if args:
            if self.hide_addresses:
                from microbroker.logmask import mask
                args = mask(args)
            message = message % args
        if self.syslog is not None:
            prio = {10: self.syslog.LOG_DEBUG, 20: self.syslog.LOG_INFO,
                    30: self.syslog.LOG_WARNING}.get(n, self.syslog.LOG_ERR)
            self.syslog.syslog(prio, message)
            return
        try:
            sys.stderr.write("microbroker: %s: %s\n" % (level, message))
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass  # no stderr (daemonised, closed): nothing we can do


log = Log()
