"""Policy: who gets which lease, and the order in which the lease store and
the exit's data plane are touched.

The broker never parses HTTP and never talks netlink: web.py hands it
checked values, and a dataplane object (microbroker.dataplane.Dataplane, or
nulldataplane.NullDataplane for `dataplane 'none'`; wiring.py picks it)
builds the kernel side. A lease is only answered once the data plane has
built it; if that fails the lease is removed again. What the client is
told is offer.py's and clientview.py's.

Imports stay cheap (no leases, no dataplane at module level) because a CGI
request loads this module every time.
"""

import _thread
import time

from microbroker.log import LEVELS, Log, log  # noqa: F401 (broker.log for the front doors)
from microbroker.addresses import lease_mac

# Retry-After for 429/503 when nothing better is known.
DEFAULT_RETRY = 60
UNAVAILABLE_RETRY = 600
# Codes answered 429 or 503 (web.STATUS), which always carry a Retry-After.
RETRY_CODES = ("too_many", "full", "ids_exhausted", "pool_exhausted",
               "unavailable", "busy")

# How often the IdInUse of a lease build is answered with other ids.
ID_RETRIES = 3
# While the start-up reconcile runs, a lease request waits this long, then
# is answered 503 busy.
STARTUP_WAIT = 2.0


class BrokerError(Exception):
    """An answer for the client: stable code, human message (web.py maps
    the code to an HTTP status)."""

    def __init__(self, code, message, retry_after=None):
        Exception.__init__(self, message)
        self.code = code
        self.message = message
        if retry_after is None and code in RETRY_CODES:
            retry_after = DEFAULT_RETRY
        self.retry_after = retry_after


def _store_error(e):
    """Turn a leases.LeaseError/StoreError into a BrokerError, or None for
    anything that is not ours to explain."""
    from microbroker.leases import Busy, LeaseError, StoreError
    if isinstance(e, Busy):
        log("warning", "lease store: %s", e)
        return BrokerError("busy", "the lease store is busy, try again",
                           e.retry_after)
    if isinstance(e, StoreError):
        # The details (paths, backends) are for the operator, not clients.
        log("error", "lease store: %s", e)
        return BrokerError("store", "the lease store is not usable; see the "
                           "broker log")
    if isinstance(e, LeaseError):
        return BrokerError(e.code, str(e) or e.code.replace("_", " "),
                           e.retry_after)
    return None


def _equal(a, b):
    """Compare secrets without stopping at the first difference."""
    a, b = a.encode(), b.encode()
    diff = len(a) ^ len(b)
    for x, y in zip(a, b if len(a) == len(b) else a):
        diff |= x ^ y
    return diff == 0


def check_client(config, family, packed):
    """Who may talk to this broker at all: deny wins over allow, and an
    empty allow list allows everyone."""
    from microbroker.config import in_prefixes
    if config.deny and in_prefixes(family, packed, config.deny):
        raise BrokerError("forbidden", "your address is denied here")
    if config.allow and not in_prefixes(family, packed, config.allow):
        raise BrokerError("forbidden", "your address is not allowed here")


COUNTERS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")

# lease.extra key -> (pool option, length option or a fixed length)
POOLS = (("prefix", "prefix_pool", "prefix_length"),
         ("ipv4", "ipv4_pool", 32))


def bridge_of(svc):
    """The Linux bridge a layer 2 service's ports join (config sets br-NAME
    by default), or None for a routed one or an Open vSwitch bridge (no
    port cap of its own)."""
    from microbroker.kinds import KINDS
    if KINDS[svc.kind].layer != 2 or \
            getattr(svc, "bridge_backend", "linux") != "linux":
        return None
    return svc.bridge


class Broker:
    """offer, lease, renew, release, status, sweep, reconcile.

    No process-wide lock: server threads and CGI processes meet in the
    lease store, whose every call is one bounded, locked transaction.  An
    offer reads the store's lock-free counts; a lease is allocated in one
    transaction and built outside any lock, ordered by its own `pending`
    state (a second request for it while it is built is answered 503)."""

    def __init__(self, config, store, dataplane, clock=time.time):
        self.config = config
        self._store = store         # None: wiring.open_store(config) on first use
        self._opening = _thread.allocate_lock()
        self.dataplane = dataplane
        self.clock = clock
        # Kernel (tunnel_id, session_id) pairs no lease of ours holds: a
        # long-lived server learns them at reconcile and from IdInUse; a
        # CGI keeps None and learns from IdInUse within its one request.
        self.foreign_ids = None
        # None: ready. A server's start-up sets an Event (a CGI never
        # waits, and importing threading is a sixth of its start).
        self.ready = None

    @property
    def store(self):
        if self._store is None:
            with self._opening:      # server threads: open exactly one
                if self._store is None:
                    from microbroker.wiring import open_store
                    self._store = open_store(self.config)
        return self._store

    def open_store(self):
        """Open the lease store now (a broken one raises here), and make
        its counts file if it has none yet: offers read that alone."""
        store = self.store
        try:
            store.counts()
        except Exception as e:
            log("warning", "lease counts: %s: %s", type(e).__name__, e)

    def prepare_offers(self):
        """Load what an offer needs and read the counts file once (a
        server, before it listens): an import in the front door's thread
        once the main thread imports http.server would wait at every file
        it opens for that thread to let go of the interpreter lock."""
        from microbroker import offer  # noqa: F401
        from microbroker.leases import counts
        counts.read(counts.path_of(self.config.lease_path))

    def hold_leases(self):
        """Lease requests wait (briefly, then 503 busy) until leases_ready():
        the server's start-up reconcile runs meanwhile; offers are answered."""
        from microbroker.threads import Event
        self.ready = Event()

    def leases_ready(self):
        if self.ready is not None:
            self.ready.set()

    # -- the offer

    def offer(self, local=None, status=None, counts=None):
        """Everything a client needs to choose (offer.py). `local` is the
        address the request arrived on (the endpoint of services that
        configure none)."""
        from microbroker.offer import offer
        return offer(self, local, status, counts)

    def counts(self):
        """(total, {service: leases}): the counts file alone while the store
        is not open (a CGI offer does not load it), else the store's."""
        try:
            if self._store is None:
                from microbroker.leases import counts
                got = counts.read(counts.path_of(self.config.lease_path))
                if got is not None:
                    return got
            return self.store.counts()
        except Exception as e:
            raise _store_error(e) or e

    def limits(self, svc):
        """(services, most, message) a new lease of svc must stay within,
        besides max_leases: the service's capacity, its bridge's ports."""
        out = [((svc.name,), svc.capacity, "service %s is full (%d leases)"
                % (svc.name, svc.capacity))]
        br = bridge_of(svc)
        if br:
            names = tuple(s.name for s in self.config.services.values()
                          if bridge_of(s) == br)
            from microbroker.config import BR_MAX_PORTS
            out.append((names, BR_MAX_PORTS - 1, "bridge %s has all its %d "
                        "ports taken" % (br, BR_MAX_PORTS - 1)))
        return out

    def kernel_status(self):
        """(ok, why, {kind: (ok, why)}) over the kinds of enabled services."""
        kernel = {k: self.dataplane.status(k)
                  for k in sorted({s.kind for s in self.config.enabled_services()})}
        ok = all(v[0] for v in kernel.values())
        reason = "; ".join(sorted({v[1] for v in kernel.values() if not v[0]}))
        return ok, reason, kernel

    @staticmethod
    def endpoint(svc, local):
        """The service's own endpoint, else the address the request
        arrived on when its family is the service's."""
        if svc.endpoint:
            return svc.endpoint
        if local and (":" in local) == (svc.family == 6):
            return local
        return ""

    # -- leases

    def lease(self, client, service=None, tunnel_id=None, session_id=None,
              token=None, udp_sport=None, local=None, kind=None):
        """Grant (or re-issue) a lease; the answer carries the secret.
        `client` is the normalised source address of the request; `kind`
        alone picks the first enabled service of that kind."""
        cfg = self.config
        svc = self._service(service, kind)
        tokens = svc.token or cfg.token
        if tokens and not (token and any(_equal(token, t) for t in tokens)):
            raise BrokerError("forbidden", "service %s needs a valid token"
                              % svc.name if token is None or token == ""
                              else "token not accepted for service %s"
                              % svc.name)
        family = 6 if ":" in client else 4
        if family != svc.family:
            raise BrokerError("bad_request", "service %s carries tunnels "
                              "over IPv%d but you came from IPv%d address %s"
                              % (svc.name, svc.family, family, client))
        endpoint = self.endpoint(svc, local)
        if not endpoint:
            raise BrokerError("unavailable", "service %s has no IPv%d "
                              "endpoint configured and this request did "
                              "not arrive on one" % (svc.name, svc.family))
        if udp_sport is not None and svc.encap != "udp":
            raise BrokerError("bad_request", "udp_sport only applies to "
                              "encap udp services")
        from microbroker.kinds import KINDS
        for name, value in (("tunnel_id", tunnel_id),
                            ("session_id", session_id)):
            if value is not None and name not in KINDS[svc.kind].ids:
                raise BrokerError("bad_request", "%s does not apply to kind "
                                  "%s (service %s)" % (name, svc.kind,
                                                       svc.name))
        ok, reason = self.dataplane.status(svc.kind)
        if not ok and not getattr(self.dataplane, "dry_run", False):
            raise BrokerError("unavailable", "this exit cannot build "
                              "tunnels now: %s" % reason, UNAVAILABLE_RETRY)
        if self.ready is not None and not self.ready.wait(STARTUP_WAIT):
            raise BrokerError("busy", "this exit is starting (reconciling "
                              "its kernel with its leases); ask again", 2)
        return self._lease(svc, client, endpoint, tunnel_id, session_id,
                           udp_sport)

    def _service(self, name, kind):
        """The enabled service a request names, by name and/or kind."""
        from microbroker.kinds import KINDS, offered
        cfg = self.config
        enabled = cfg.enabled_services()
        if name is None and kind is None:
            raise BrokerError("bad_request", "missing field service (or "
                              "kind); this exit offers %s" % offered(enabled))
        if kind is not None and not any(s.kind == kind for s in enabled):
            raise BrokerError("unknown_kind", "kind %s is not offered here%s; "
                              "this exit offers %s" % (
                                  kind, "" if kind in KINDS else
                                  " (microbroker knows %s)" % ", ".join(KINDS),
                                  offered(enabled)))
        if name is None:
            return next(s for s in enabled if s.kind == kind)
        svc = cfg.services.get(name)
        if svc is None or not svc.enabled:
            raise BrokerError("unknown_service", "no service %s here; this "
                              "exit offers %s" % (name, offered(enabled)))
        if kind is not None and svc.kind != kind:
            raise BrokerError("unknown_kind", "service %s is kind %s, not "
                              "%s; this exit offers %s"
                              % (svc.name, svc.kind, kind, offered(enabled)))
        return svc

    def _lease(self, svc, client, endpoint, tunnel_id, session_id,
               udp_sport):
        if svc.kind == "ip6tnl":
            self._one_ip6tnl(svc, client, endpoint)
        exclude = set(self.foreign_ids or ())
        from microbroker.wiring import dataplane_errors
        for attempt in range(ID_RETRIES + 1):
            lease, secret, reused = self._allocate(svc, client, endpoint,
                                                   tunnel_id, session_id,
                                                   udp_sport, exclude)
            if reused and not self._drop_reshaped([svc], [lease]):
                # The client's lease of svc from before the operator changed
                # its kind or encap: it ended, a new one takes its place.
                lease, secret, reused = self._allocate(svc, client, endpoint,
                                                       tunnel_id, session_id,
                                                       udp_sport, exclude)
            if reused:
                return self._reissue(lease, svc, client, secret)
            try:
                return self._build(lease, svc, client, secret)
            except dataplane_errors()[0] as e:
                # The kernel has these ids (another tool's, a leftover): the
                # build removed what it made; the lease goes, new ids follow.
                pair = (e.tunnel_id or lease.tunnel_id,
                        e.session_id or lease.session_id)
                log("warning", "lease %s: the kernel already has tunnel %d / "
                    "session %d; asking again with other ids",
                    lease.lease_id, pair[0], pair[1])
                exclude.add(pair)
                if self.foreign_ids is not None:
                    self.foreign_ids.add(pair)
                try:
                    self.store.remove(lease.lease_id)
                except Exception as e2:
                    raise _store_error(e2) or e2
        raise BrokerError("ids_exhausted", "the kernel holds every id this "
                          "exit tried (%d times); ask again later"
                          % (ID_RETRIES + 1), svc.renew_interval)

    def _allocate(self, svc, client, endpoint, tunnel_id, session_id,
                  udp_sport, exclude):
        """One store transaction: ids, quotas, UDP port, pool items; when
        full, one idle lease may make room (see _displace)."""
        cfg = self.config
        pools = []
        for key, pool_opt, length in POOLS:
            pool = getattr(svc, pool_opt)
            if pool:
                pools.append((key, pool, length if isinstance(length, int)
                              else getattr(svc, length)))
        mac = ""
        from microbroker.kinds import KINDS
        rate = None
        if getattr(cfg, "lease_rate", 0):
            rate = (cfg.lease_rate / 60.0, max(1, cfg.lease_burst))
        for attempt in range(2):
            now = self.clock()
            try:
                lease, secret, reused = self.store.allocate(
                    client, svc.name, svc.kind, svc.encap, endpoint, svc.mtu,
                    svc.lifetime, peer_tunnel_id=tunnel_id,
                    peer_session_id=session_id, exclude=exclude, now=now,
                    udp_ports=(svc.udp_port, svc.udp_port + svc.capacity - 1)
                    if svc.encap == "udp" else None,
                    peer_udp_port=udp_sport or 0, pools=pools,
                    limits=self.limits(svc), rate=rate)
            except Exception as e:
                from microbroker.leases import Full
                if isinstance(e, Full) and attempt == 0 and \
                        self._displace(svc, now):
                    continue
                raise _store_error(e) or e
            if not reused and not lease.mac and KINDS[svc.kind].layer == 2:
                # Stored with state "up": one write less.
                lease.mac = lease_mac(lease.tunnel_id)
            return lease, secret, reused
        raise AssertionError("not reached")

    def _displace(self, svc, now):
        """Make room for a newcomer: end the oldest lease that has never
        carried traffic (no rx counted by the exit) idle_grace seconds after
        it was granted.  Cheap client addresses cannot hold an exit full."""
        grace = getattr(self.config, "idle_grace", 0)
        if not grace:
            return False
        try:
            idle = [l for l in self.store.leases()
                    if l.state == "up" and l.created <= now - grace
                    and not l.seen and not l.rx_packets]
        except Exception as e:
            raise _store_error(e) or e
        for lease in idle[:8]:
            try:
                c = self.dataplane.counters(lease) or {}
            except Exception as e:
                log("warning", "counters of %s: %s", lease.lease_id, e)
                continue
            if int(c.get("rx_packets", 0)):
                continue
            try:
                gone = self.store.remove(lease.lease_id)
            except Exception as e:
                raise _store_error(e) or e
            if gone is None:
                continue
            self._take_down(gone, "displaced for %s (no traffic in %d s)"
                            % (svc.name, int(now - lease.created)))
            return True
        return False

    def _reissue(self, lease, svc, client, secret):
        if lease.state == "up":
            log("info", "lease %s re-issued to %s (%s)", lease.lease_id,
                client, svc.name)
            return self.view(lease, svc, secret)
        if self.clock() - lease.created < self.config.hook_timeout + 30:
            # Another request (a thread, a CGI) is building this very lease
            # right now; building it twice could roll back its work.
            raise BrokerError("unavailable", "your lease is still being "
                              "built; ask again", 2)
        return self._build(lease, svc, client, secret)

    def _build(self, lease, svc, client, secret):
        """The kernel side of an allocated lease, then state "up"; undone
        on any failure (IdInUse passes through for other ids)."""
        from microbroker.wiring import dataplane_errors
        IdInUse, KernelUnavailable = dataplane_errors()
        from microbroker.leases.store import _test_pause
        _test_pause("build")
        hooked = False
        try:
            self.dataplane.up(lease, svc)
            hooked = True
            self._hook("up", lease)
            lease = self.store.update(lease.lease_id, state="up", mac=lease.mac)
        except IdInUse:
            raise
        except Exception as e:
            self._rollback(lease, hooked)
            if isinstance(e, BrokerError):
                raise
            err = _store_error(e)
            if err is not None and err.code in ("store", "busy"):
                raise err
            if isinstance(e, KernelUnavailable):
                raise BrokerError("unavailable", "this exit cannot build "
                                  "tunnels now: %s" % e, UNAVAILABLE_RETRY)
            if getattr(e, "errno", None) == 54:     # EXFULL: the bridge
                raise BrokerError("full", "the bridge of service %s has no "
                                  "free port" % svc.name, svc.renew_interval)
            raise BrokerError("kernel", "the kernel refused the tunnel "
                              "(%s: %s); the lease was rolled back"
                              % (type(e).__name__, e))
        log("info", "lease %s granted to %s (%s, tunnel %d/%d, %s)",
            lease.lease_id, client, svc.name, lease.tunnel_id,
            lease.peer_tunnel_id, lease.ifname)
        return self.view(lease, svc, secret)

    def _drop_reshaped(self, services, leases):
        """Leases of a service whose kind or encap the operator has changed
        since: they can no longer be re-issued or rebuilt, so they end.
        Returns the other leases."""
        by_name = {s.name: s for s in services}
        stale = [l for l in leases if l.service in by_name and (l.kind, l.encap) !=
                 (by_name[l.service].kind, by_name[l.service].encap)]
        if not stale:
            return leases
        try:
            # Another process may have ended one already: only what we removed.
            ended = [l for l in stale if self.store.remove(l.lease_id)]
        except Exception as e:
            raise _store_error(e) or e
        for lease in ended:
            svc = by_name[lease.service]
            self._take_down(lease, "ended (service %s is %s/%s now, the lease %s/%s)" % (
                svc.name, svc.kind, svc.encap, lease.kind, lease.encap))
        gone = {l.lease_id for l in stale}
        return [l for l in leases if l.lease_id not in gone]

    def _one_ip6tnl(self, svc, client, endpoint):
        # The kernel tells ip6tnl tunnels apart by their two addresses only.
        try:
            mine = self.store.leases(client=client)
        except Exception as e:
            raise _store_error(e) or e
        for l in mine:
            if l.kind == "ip6tnl" and l.local == endpoint and \
                    l.service != svc.name and l.state != "closing":
                raise BrokerError("id_conflict", "your lease %s (service %s) "
                                  "already is the ip6tnl tunnel between %s "
                                  "and %s; release it first" % (
                                      l.lease_id, l.service, client,
                                      endpoint))

    def _rollback(self, lease, hooked):
        if hooked:  # the up hook may have done half its work
            try:
                self._hook("down", lease)
            except Exception as e:
                log("warning", "rollback of %s: %s", lease.lease_id, e)
        try:
            self.dataplane.down(lease)
        except Exception as e:
            log("warning", "rollback of %s: data plane: %s", lease.lease_id,
                e)
        try:
            self.store.remove(lease.lease_id)
        except Exception as e:
            log("error", "rollback of %s: store: %s", lease.lease_id, e)

    def renew(self, client, lease_id, secret):
        """The heartbeat: push `expires` out by the service's lifetime."""
        lifetimes = {s.name: s.lifetime for s in self.config.enabled_services()}
        try:
            lease = self.store.renew(lease_id, secret, client, lifetimes,
                                     now=self.clock())
        except Exception as e:
            raise _store_error(e) or e
        svc = self.config.services.get(lease.service)
        if lease.service not in lifetimes:
            raise BrokerError("unknown_service", "service %s is no longer "
                              "offered; the lease ends at its expiry"
                              % lease.service)
        self._heal(lease, svc)
        return self.view(lease, svc)

    def _heal(self, lease, svc):
        """A renewed lease whose interface is gone from the exit (deleted by
        hand, a module reloaded, a race with a teardown) is built again: its
        client believes it is up, and would otherwise stay cut off until
        the lease ends."""
        present = getattr(self.dataplane, "present", None)
        if present is None or lease.state != "up":
            return
        try:
            if present(lease):
                return
            log("warning", "lease %s: %s was gone from the kernel; building it again",
                lease.lease_id, lease.ifname)
            self.dataplane.up(lease, svc)
            self._hook("up", lease)
        except Exception as e:
            log("error", "lease %s: rebuilding %s failed: %s: %s", lease.lease_id,
                lease.ifname, type(e).__name__, e)

    def release(self, client, lease_id, secret):
        try:
            lease = self.store.release(lease_id, secret, client)
        except Exception as e:
            raise _store_error(e) or e
        self._take_down(lease, "released")
        return {"released": True, "lease_id": lease.lease_id}

    def status(self, client, lease_id, secret):
        """The lease with the exit side's counters."""
        try:
            lease = self.store.authorize(lease_id, secret, client)
        except Exception as e:
            raise _store_error(e) or e
        lease = self._refresh_counters(lease)
        svc = self.config.services.get(lease.service)
        view = self.view(lease, svc)
        view["counters"] = {k: getattr(lease, k) for k in COUNTERS}
        return view

    def _refresh_counters(self, lease):
        try:
            c = self.dataplane.counters(lease) or {}
        except Exception as e:
            log("warning", "counters of %s: %s", lease.lease_id, e)
            return lease
        fields = {k: int(c[k]) for k in COUNTERS
                  if k in c and int(c[k]) != getattr(lease, k)}
        if not fields:
            return lease
        if fields.get("rx_packets", lease.rx_packets) > lease.rx_packets:
            fields["seen"] = self.clock()
        try:
            return self.store.update(lease.lease_id, **fields)
        except Exception as e:
            log("warning", "storing counters of %s: %s", lease.lease_id, e)
            for k, v in fields.items():
                setattr(lease, k, v)
            return lease

    # -- expiry

    def sweep(self):
        """Remove expired leases and their tunnels; returns them."""
        if getattr(self.config, "traffic_keepalive", False) and \
                not getattr(self.dataplane, "dry_run", False):
            self._keep_busy_alive()
        try:
            gone = self.store.sweep(now=self.clock())
        except Exception as e:
            raise _store_error(e) or e
        for lease in gone:
            self._take_down(lease, "expired")
        return gone

    def _keep_busy_alive(self):
        """A lease whose tunnel still receives traffic is alive even without
        HTTP renewals (a client that only forwards); a silent one expires."""
        now = self.clock()
        try:
            due = [l for l in self.store.leases() if l.expires <= now and l.state == "up"]
        except Exception as e:
            raise _store_error(e) or e
        for lease in due:
            svc = self.config.services.get(lease.service)
            if svc is None:
                continue
            try:
                c = self.dataplane.counters(lease) or {}
            except Exception as e:
                log("warning", "counters of %s: %s", lease.lease_id, e)
                continue
            rx = int(c.get("rx_packets", 0))
            if rx > lease.rx_packets:
                fields = {k: int(c[k]) for k in COUNTERS if k in c}
                self.store.update(lease.lease_id, seen=now, expires=now + svc.lifetime,
                                  **fields)
                log("info", "lease %s kept alive by traffic (%d packets in)",
                    lease.lease_id, rx - lease.rx_packets)

    def _take_down(self, lease, why):
        try:
            self.dataplane.down(lease)
        except Exception as e:
            # The lease is gone from the store either way; reconcile will
            # find the orphaned tunnel.
            log("error", "lease %s %s but its tunnel stays: %s",
                lease.lease_id, why, e)
        else:
            log("info", "lease %s %s (%s, %s)", lease.lease_id, why,
                lease.client, lease.service)
        try:
            self._hook("down", lease)
        except Exception as e:
            log("warning", "hook down for %s: %s", lease.lease_id, e)

    def reconcile(self):
        """Make the kernel match the lease store; then lease requests held
        by hold_leases() go ahead, and this broker keeps the kernel's ids
        that no lease holds (foreign_ids, from the reconcile's own dumps),
        so that no lease asks the kernel for its whole id set again."""
        try:
            services = self.config.enabled_services()
            try:
                live = self.store.leases()
            except Exception as e:
                raise _store_error(e) or e
            live = self._drop_reshaped(services, live)
            report = self.dataplane.reconcile(live, services)
            for w in getattr(self.dataplane, "warnings", ()):
                log("warning", "%s", w)
            self.foreign_ids = set(self.dataplane.foreign_ids)
            return report
        finally:
            self.leases_ready()

    # -- hooks

    def _hook(self, event, lease):
        """Run the configured hook (hooks.py: HOOK EVENT IFNAME LEASE_ID
        SERVICE CLIENT, the lease in MB_* variables). A failing `up` hook
        fails the lease (it may be what bridges the interface), a failing
        `down` hook is only logged."""
        path = self.config.hook
        if not path:
            return
        from microbroker import hooks
        counters = None
        if event == "down":
            # The kernel's, while the link is still there (a rollback);
            # else the last ones the store holds.
            try:
                counters = self.dataplane.counters(lease) or {}
            except Exception:
                counters = {}
        hooks.run(path, event, lease, self.config.hook_timeout,
                  self.config.services.get(lease.service), counters)

    # -- what the client sees

    def view(self, lease, svc, secret=None):
        """The lease from the client's side (clientview.py)."""
        from microbroker.clientview import view
        return view(lease, svc, secret)
