"""`microbroker serve`: the long-running service. The front door
(frontdoor.py) listens and reads; this module starts it, sweeps expired
leases on a timer, takes SIGHUP (reload), SIGTERM and SIGINT, and stops
cleanly: no more accepting, then a bounded wait for answers in flight.
What runs before it listens stays on the interpreter's C modules
(_signal, not signal and its enums; threads.py, not threading).
"""

import _signal
import os
import time

from microbroker import jsonlite
from microbroker.broker import BrokerError, log
from microbroker.frontdoor import FrontDoor, encode_answer
from microbroker.limits import Refuser, SourceLimits, WorkGate
from microbroker.threads import Event, Slots

# Lease and renew requests at once (the rest wait in order): a few
# overlap one's kernel round trips with another's Python; more only share
# one interpreter lock. A wait well inside a client's 10 s timeout.
WORK_SLOTS = 4
WORK_WAIT = 4.0             # seconds


def _answer_slowly(app):
    def slow(sock, addr, head, deadline, head_limit):
        from microbroker import server   # http.server's handler
        server.answer(app, sock, addr, head, deadline, head_limit)
    return slow


class Server:
    """All listeners of one broker, plus the periodic sweep."""

    def __init__(self, app, listen=None):
        self.app = app
        cfg = app.config
        self.stopping = Event()
        self.slots = Slots(cfg.max_connections)
        self.sources = SourceLimits(cfg.source_connections,
                                    cfg.request_rate, cfg.request_burst)
        self.refuser = Refuser(
            lambda e, fmt: encode_answer(app.error(e, fmt)))
        self.door = FrontDoor(app, listen if listen is not None
                              else cfg.listen, self.slots, self.sources,
                              self.refuser, _answer_slowly(app))
        app.gate = WorkGate(WORK_SLOTS, WORK_WAIT)
        app.offers = {}

    def start(self):
        """Bind every listen address and start answering; returns
        [(host, port)] as bound."""
        bound = self.door.bind()
        # The front door's threads and those it starts (which inherit the
        # mask) never take SIGTERM/SIGINT/SIGHUP: only the main thread,
        # waiting in run(), may be woken by them.
        mask = _signal.pthread_sigmask(_signal.SIG_BLOCK,
                                       {_signal.SIGTERM, _signal.SIGINT,
                                        _signal.SIGHUP})
        try:
            self.refuser.start()
            self.door.start()
        finally:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
        return bound

    def run(self, wake_fd=None, stop_asked=lambda: False, on_wake=None):
        """Sweep every sweep_interval until stop() or stop_asked(). A byte
        on wake_fd (signal.set_wakeup_fd) ends a wait early, and on_wake()
        runs then (a reload)."""
        import select
        interval = self.app.config.sweep_interval
        due = time.monotonic() + interval
        while not self.stopping.is_set() and not stop_asked():
            left = due - time.monotonic()
            if left <= 0:
                self.sweep()
                due = time.monotonic() + interval
                continue
            if wake_fd is None:
                self.stopping.wait(min(left, 5.0))
                continue
            r, _, _ = select.select([wake_fd], [], [], min(left, 5.0))
            if r:
                try:
                    os.read(wake_fd, 512)
                except OSError:
                    pass
            if on_wake is not None:
                on_wake()

    def sweep(self):
        try:
            gone = self.app.broker.sweep()
            if gone:
                from microbroker import metrics
                metrics.expired(self.app.config, gone)
        except BrokerError as e:
            log("error", "sweep: %s", e.message)
        except Exception as e:
            log("error", "sweep: %s: %s", type(e).__name__, e)

    def stop(self):
        """Stop accepting, then wait (bounded) for answers in flight."""
        self.stopping.set()
        self.door.stop()
        self.refuser.stop()
        cfg = self.app.config
        deadline = time.monotonic() + cfg.timeout + 2
        taken = 0
        while taken < cfg.max_connections:
            left = deadline - time.monotonic()
            if left <= 0 or not self.slots.acquire(timeout=left):
                log("warning", "stopped with %d request(s) unanswered",
                    cfg.max_connections - taken)
                break
            taken += 1
        for _ in range(taken):
            self.slots.release()


def serve(app, load=None):
    """Start, say what we are doing and what will not work, run until
    SIGTERM or SIGINT, stop cleanly. SIGHUP: reload.reload(app, load)."""
    cfg = app.config
    srv = Server(app)
    # The handler only records the signal: it may run at any bytecode of
    # the main thread, even inside a lock the rest of us holds. The wakeup
    # pipe ends the main loop's wait.
    got = []
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    old_fd = _signal.set_wakeup_fd(w)
    old = {s: _signal.signal(s, lambda signum, frame: got.append(signum))
           for s in (_signal.SIGTERM, _signal.SIGINT)}
    hups = []
    old[_signal.SIGHUP] = _signal.signal(
        _signal.SIGHUP, lambda signum, frame: hups.append(signum))

    def on_wake():
        if hups and not got:
            del hups[:]
            from microbroker import reload
            try:
                reload.reload(app, load or (lambda: app.config))
            except Exception as e:
                log("error", "reload failed: %s: %s", type(e).__name__, e)

    try:
        # The lease store opens once we listen: offers read its counts
        # file alone, and leases wait for the reconcile anyway.
        app.lazy_store = True
        b = app.broker
        b.hold_leases()  # offers at once, leases after the reconcile
        b.kernel_status()   # known before the first offer, which must not ask
        b.prepare_offers()
        bound = srv.start()
        names = ", ".join(s.name for s in cfg.enabled_services())
        log("info", "microbroker listening on %s; services: %s; leases in "
            "%s", ", ".join("[%s]:%d" % a if ":" in a[0] else "%s:%d" % a
                            for a in bound), names, cfg.lease_path)
        b.open_store()
        # http.server and email (~2 s of a start under emulation) while
        # the front door already answers offers; lease requests wait for
        # the reconcile below anyway.
        from microbroker import server  # noqa: F401
        # A long-running process pays json's import once, and every lease
        # row and answer after it is written and read by json's C code.
        jsonlite.load_json()
        ok, reason, _kinds = b.kernel_status()
        if not ok:
            if getattr(b.dataplane, "dry_run", False):
                log("warning", "%s", reason)
            else:
                log("warning", "this host cannot build tunnels: %s; lease "
                    "requests will be answered 'unavailable'", reason)
        elif not got:
            try:
                done = b.reconcile()
                log("info", "start-up reconcile done: %s",
                    done or "the kernel matched the lease store")
            except Exception as e:
                log("error", "reconcile at start failed: %s: %s",
                    type(e).__name__, e)
        b.leases_ready()
        if not got:
            srv.sweep()
        srv.run(r, lambda: bool(got), on_wake)
        log("info", "signal %d: shutting down", got[0])
    finally:
        srv.stop()
        _signal.set_wakeup_fd(old_fd)
        for s, h in old.items():
            _signal.signal(s, h)
        os.close(r)
        os.close(w)
    log("info", "stopped")
