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
        self.mask = None

    def configure(self, target="stderr", level="info",
                  client_addresses=False):
        """client_addresses False: logmask.py keeps them out of lines."""
        self.level = LEVELS[level]
        self.syslog = None
        if client_addresses:
            self.mask = None
        else:
            from microbroker.logmask import mask
            self.mask = mask
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
            message = message % (self.mask(args) if self.mask else args)
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
