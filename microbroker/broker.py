"""Policy: who gets which lease, and the order in which the lease store and
the exit's data plane are touched.

The broker never parses HTTP and never talks netlink: web.py hands it
checked values, and a dataplane object (microbroker.dataplane.Dataplane, or
NullDataplane here for `dataplane 'none'`) builds the kernel side. A lease
is only answered once the data plane has built it; if that fails the lease
is removed again.

Imports stay cheap (no leases, no dataplane at module level) because a CGI
request loads this module every time.
"""

import os
import sys
import time

from microbroker import __version__

API_VERSION = 1

# code -> HTTP status, from docs/api.md; "internal" covers our own bugs.
STATUS = {
    "bad_request": 400, "forbidden": 403, "not_found": 404,
    "unknown_service": 404, "unknown_kind": 404, "method_not_allowed": 405,
    "id_conflict": 409,
    "too_large": 413, "too_many": 429, "full": 503, "ids_exhausted": 503,
    "pool_exhausted": 503, "unavailable": 503, "kernel": 500, "store": 500,
    "internal": 500,
}

# Retry-After for 429/503 when nothing better is known.
DEFAULT_RETRY = 60
UNAVAILABLE_RETRY = 600


class BrokerError(Exception):
    """An answer for the client: stable code, human message."""

    def __init__(self, code, message, retry_after=None):
        Exception.__init__(self, message)
        self.code = code
        self.message = message
        self.status = STATUS[code]
        if retry_after is None and self.status in (429, 503):
            retry_after = DEFAULT_RETRY
        self.retry_after = retry_after


# ---------------------------------------------------------------- logging
# `logging` is a separate package on OpenWrt (python3-logging) and costs
# start-up time; this is all the broker needs.

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


# ---------------------------------------------------------------- data planes

class NullDataplane:
    """`dataplane 'none'`: grants leases and builds nothing. For tests and
    dry runs; the offer says so (kernel false with this reason)."""

    dry_run = True

    def __init__(self, config=None):
        pass

    def status(self, kind=None):
        return False, "dataplane none: leases are granted but no " \
                      "tunnels are built (dry run)"

    def up(self, lease, service):
        pass

    def down(self, lease):
        pass

    def counters(self, lease):
        return {}

    def kernel_ids(self):
        return set()

    def reconcile(self, store, services):
        return {}


class BrokenDataplane(NullDataplane):
    """Stands in when the kernel data plane cannot even be loaded, so the
    broker still answers offers and says why leases are unavailable."""

    dry_run = False

    def __init__(self, reason):
        self.reason = reason

    def status(self, kind=None):
        return False, self.reason

    def up(self, lease, service):
        raise BrokerError("unavailable", self.reason, UNAVAILABLE_RETRY)

    def reconcile(self, store, services):
        raise BrokerError("unavailable", self.reason, UNAVAILABLE_RETRY)


def make_dataplane(config):
    if config.dataplane == "none":
        return NullDataplane(config)
    try:
        from microbroker import dataplane
        return dataplane.Dataplane(config)
    except Exception as e:  # a missing module or its set-up failing
        reason = "kernel dataplane unavailable: %s: %s" % (
            type(e).__name__, e)
        return BrokenDataplane(reason)


def open_store(config):
    """The LeaseStore for this config, creating the state directory."""
    from microbroker.leases import LeaseStore
    for d in (config.state_dir, os.path.dirname(config.lease_path)):
        try:
            os.makedirs(d or ".", 0o700, exist_ok=True)
        except OSError as e:
            raise BrokerError("store", "cannot create %s: %s"
                              % (d, e.strerror))
    try:
        return LeaseStore(config.lease_path, tunnel_ids=config.tunnel_ids,
                          session_ids=config.session_ids,
                          max_leases=config.max_leases,
                          max_per_client=config.max_per_client,
                          ifname_prefix=config.ifname_prefix)
    except Exception as e:   # wrong backend, newer schema, ...
        raise _store_error(e) or e


def make_broker(config, store=None, dataplane=None):
    if store is None:
        store = open_store(config)
    if dataplane is None:
        dataplane = make_dataplane(config)
    return Broker(config, store, dataplane)


def _store_error(e):
    """Turn a leases.LeaseError/StoreError into a BrokerError, or None for
    anything that is not ours to explain."""
    code = getattr(e, "code", None)
    if code == "store":
        # The details (paths, backends) are for the operator, not clients.
        log("error", "lease store: %s", e)
        return BrokerError("store", "the lease store is %s; see the broker "
                           "log" % ("busy, try again" if type(e).__name__ ==
                                    "Locked" else "not usable"))
    if code in STATUS and isinstance(e, Exception):
        return BrokerError(code, str(e) or code.replace("_", " "),
                           getattr(e, "retry_after", None))
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

# Locally administered unicast (02), then "mb", then the exit tunnel id's
# low 24 bits: unique among the leases of one exit, and stable, so the
# exit knows the client's link-local address before the client is up.
MAC_OUI = "02:6d:62"


def lease_mac(tunnel_id):
    t = tunnel_id & 0xFFFFFF
    return "%s:%02x:%02x:%02x" % (MAC_OUI, t >> 16, (t >> 8) & 0xFF, t & 0xFF)


def routed_address(prefix):
    """The client's own address in a routed IPv6 prefix: the address of a
    /128, else the prefix's first host (NET::1 of a /64)."""
    if not prefix:
        return ""
    from microbroker.config import format_addr, parse_prefix
    _f, value, length = parse_prefix(prefix)
    if length < 128:
        value += 1
    return format_addr(6, value.to_bytes(16, "big"))


def _pool_item(pool, length, index):
    """The index-th prefix of `length` in pool: 'NET/LEN' for IPv6
    prefixes, a bare address for IPv4 (each one is a /32)."""
    from microbroker.config import format_addr, pool_size
    family, first, step, _count = pool_size(pool, length)
    packed = (first + index * step).to_bytes(16 if family == 6 else 4, "big")
    text = format_addr(family, packed)
    return text if family == 4 else "%s/%d" % (text, length)


# lease.extra key -> (pool option, length option or a fixed length, what)
POOLS = (("prefix", "prefix_pool", "prefix_length", "prefix"),
         ("ipv4", "ipv4_pool", 32, "address"))


class Broker:
    """offer, lease, renew, release, status, sweep. Not thread-safe by
    itself: each public call takes self.lock, a plain lock the threaded
    server shares (a CGI process has only one thread)."""

    def __init__(self, config, store, dataplane, clock=time.time):
        import _thread
        self.config = config
        self.store = store
        self.dataplane = dataplane
        self.clock = clock
        self.lock = _thread.allocate_lock()

    # -- the offer

    def offer(self, local=None):
        """Everything a client needs to choose. `local` is the address the
        request arrived on (the endpoint of services that configure none)."""
        from microbroker.kinds import KINDS
        cfg = self.config
        ok, reason, kernel = self.kernel_status()
        with self.lock:
            try:
                total = self.store.count()
                counts = {s.name: self.store.count(service=s.name)
                          for s in cfg.enabled_services()}
            except Exception as e:
                raise _store_error(e) or e
        services = {}
        for svc in cfg.enabled_services():
            used = counts[svc.name]
            services[svc.name] = {
                "kind": svc.kind, "layer": KINDS[svc.kind].layer,
                "encap": svc.encap, "family": svc.family,
                "endpoint": self._endpoint(svc, local),
                "provides": list(svc.provides), "restrict": svc.restrict,
                "ports": list(svc.ports), "mtu": svc.mtu,
                "lifetime": svc.lifetime,
                "renew_interval": svc.renew_interval,
                "capacity": svc.capacity, "used": used,
                "free": max(0, svc.capacity - used),
                "token": bool(svc.token or cfg.token),
                "kernel": bool(kernel[svc.kind][0]),
                "text": svc.text,
            }
        loc = cfg.location
        return {
            "broker": {"name": cfg.name, "software": "microbroker",
                       "version": __version__, "api": API_VERSION},
            "location": {"country": loc.country, "city": loc.city,
                         "latitude": loc.latitude,
                         "longitude": loc.longitude, "text": loc.text},
            "dataplane": cfg.dataplane,
            "kernel": bool(ok),
            "kernel_reason": "" if ok else reason,
            "leases": {"used": total, "max": cfg.max_leases,
                       "max_per_client": cfg.max_per_client},
            "services": services,
        }

    def kernel_status(self):
        """(ok, why, {kind: (ok, why)}) over the kinds of enabled services."""
        kernel = {k: self.dataplane.status(k)
                  for k in sorted({s.kind for s in self.config.enabled_services()})}
        ok = all(v[0] for v in kernel.values())
        reason = "; ".join(sorted({v[1] for v in kernel.values() if not v[0]}))
        return ok, reason, kernel

    @staticmethod
    def _endpoint(svc, local):
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
        endpoint = self._endpoint(svc, local)
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
        with self.lock:
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
        store, dp = self.store, self.dataplane
        now = self.clock()
        kernel = []
        self._drop_reshaped([svc], client)
        if svc.kind == "ip6tnl":
            self._one_ip6tnl(svc, client, endpoint)

        def in_kernel(tid, sid):
            # Leftover tunnels (a crash, another tool) must not be handed
            # out again; ask the kernel once per request, lazily.
            if not kernel:
                kernel.append(dp.kernel_ids())
                kernel.append({t for t, _ in kernel[0]})
                kernel.append({s for _, s in kernel[0]})
            return tid in kernel[1] or sid in kernel[2]

        try:
            if store.count(service=svc.name, client=client) == 0 and \
                    store.count(service=svc.name) >= svc.capacity:
                raise BrokerError("full", "service %s is full (%d leases)"
                                  % (svc.name, svc.capacity),
                                  svc.renew_interval)
            lease, secret, reused = store.allocate(
                client, svc.name, svc.kind, svc.encap, endpoint, svc.mtu,
                svc.lifetime, peer_tunnel_id=tunnel_id,
                peer_session_id=session_id, in_kernel=in_kernel, now=now)
        except BrokerError:
            raise
        except Exception as e:
            raise _store_error(e) or e
        if reused and lease.state == "up":
            log("info", "lease %s re-issued to %s (%s)", lease.lease_id,
                client, svc.name)
            return self.view(lease, svc, secret)
        if reused and now - lease.created < self.config.hook_timeout + 30:
            # Another process (CGI) is building this very lease right now;
            # building it twice could roll back its work.
            raise BrokerError("unavailable", "your lease is still being "
                              "built; ask again", 2)
        hooked = False
        try:
            if svc.encap == "udp" and not lease.udp_port:
                lease = self._udp_ports(lease, svc, udp_sport)
            lease = self._addresses(lease, svc)
            dp.up(lease, svc)
            hooked = True
            self._hook("up", lease)
            lease = store.update(lease.lease_id, state="up", mac=lease.mac)
        except Exception as e:
            self._rollback(lease, hooked)
            if isinstance(e, BrokerError):
                raise
            err = _store_error(e)
            if err is not None and err.code == "store":
                raise err
            if type(e).__name__ == "KernelUnavailable":
                raise BrokerError("unavailable", "this exit cannot build "
                                  "tunnels now: %s" % e, UNAVAILABLE_RETRY)
            raise BrokerError("kernel", "the kernel refused the tunnel "
                              "(%s: %s); the lease was rolled back"
                              % (type(e).__name__, e))
        log("info", "lease %s granted to %s (%s, tunnel %d/%d, %s)",
            lease.lease_id, client, svc.name, lease.tunnel_id,
            lease.peer_tunnel_id, lease.ifname)
        return self.view(lease, svc, secret)

    def _drop_reshaped(self, services, client=None):
        """Leases of a service whose kind or encap the operator has changed
        since: they can no longer be re-issued or rebuilt, so they end."""
        by_name = {s.name: s for s in services}
        try:
            stale = [l for l in self.store.leases(client=client)
                     if l.service in by_name and (l.kind, l.encap) !=
                     (by_name[l.service].kind, by_name[l.service].encap)]
            # Another process may have ended one already: only what we removed.
            stale = [l for l in stale if self.store.remove(l.lease_id)]
        except Exception as e:
            raise _store_error(e) or e
        for lease in stale:
            svc = by_name[lease.service]
            self._take_down(lease, "ended (service %s is %s/%s now, the lease %s/%s)" % (
                svc.name, svc.kind, svc.encap, lease.kind, lease.encap))

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

    def _udp_ports(self, lease, svc, udp_sport):
        # The kernel makes one UDP socket per tunnel, so every tunnel of a
        # service needs its own exit port: the lowest free one from
        # udp_port on.
        used = {l.udp_port for l in self.store.leases()
                if l.service == svc.name and l.lease_id != lease.lease_id}
        for port in range(svc.udp_port, svc.udp_port + svc.capacity):
            if port not in used:
                return self.store.update(lease.lease_id, udp_port=port,
                                         peer_udp_port=udp_sport or port)
        raise BrokerError("ids_exhausted", "no free UDP port left for "
                          "service %s" % svc.name, svc.renew_interval)

    def _addresses(self, lease, svc):
        """The lease's MAC and, from the service's pools, its prefix and
        IPv4 address (kept when a rebuilt lease has them already)."""
        from microbroker.kinds import KINDS
        fields = {}
        if not lease.mac and KINDS[svc.kind].layer == 2:
            fields["mac"] = lease_mac(lease.tunnel_id)
        extra = dict(lease.extra or {})
        wanted = [key for key, pool, _l, _w in POOLS
                  if getattr(svc, pool) and not extra.get(key)]
        for key in wanted:
            extra[key] = self._pick(key, svc, lease, ())
        if not wanted:
            # The MAC alone is stored with state "up": one write less.
            if fields:
                lease = lease.replace(**fields)
            return lease
        fields["extra"] = extra
        lease = self.store.update(lease.lease_id, **fields)
        # A CGI process may have picked the same item between our scan and
        # our update: the lower tunnel id keeps it, the other picks again.
        for key in wanted:
            lost = set()
            for _ in range(8):
                rival = [l for l in self.store.leases()
                         if l.lease_id != lease.lease_id
                         and (l.extra or {}).get(key) == lease.extra[key]
                         and l.tunnel_id < lease.tunnel_id]
                if not rival:
                    break
                lost.add(lease.extra[key])
                extra = dict(lease.extra)
                extra[key] = self._pick(key, svc, lease, lost)
                lease = self.store.update(lease.lease_id, extra=extra)
        return lease

    def _pick(self, key, svc, lease, skip):
        """The first item of the service's pool no other lease holds."""
        from microbroker.config import pool_size
        _k, pool_opt, length, what = next(p for p in POOLS if p[0] == key)
        pool = getattr(svc, pool_opt)
        length = length if isinstance(length, int) else getattr(svc, length)
        used = {(l.extra or {}).get(key) for l in self.store.leases()
                if l.lease_id != lease.lease_id} | set(skip)
        count = pool_size(pool, length)[3]
        # At most len(used) items are taken: the scan stops before that.
        for i in range(min(count, len(used) + 1)):
            item = _pool_item(pool, length, i)
            if item not in used:
                return item
        raise BrokerError("pool_exhausted", "no free %s left in %s %s of "
                          "service %s" % (what, pool_opt, pool, svc.name),
                          svc.renew_interval)

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
        with self.lock:
            try:
                lease = self.store.get(lease_id)
                svc = self.config.services.get(lease.service)
                if svc is None or not svc.enabled:
                    self.store.authorize(lease_id, secret, client)
                    raise BrokerError("unknown_service", "service %s is no "
                                      "longer offered; the lease ends at "
                                      "its expiry" % lease.service)
                lease = self.store.renew(lease_id, secret, client,
                                         svc.lifetime, now=self.clock())
            except BrokerError:
                raise
            except Exception as e:
                raise _store_error(e) or e
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
        with self.lock:
            try:
                lease = self.store.release(lease_id, secret, client)
            except Exception as e:
                raise _store_error(e) or e
            self._take_down(lease, "released")
        return {"released": True, "lease_id": lease.lease_id}

    def status(self, client, lease_id, secret):
        """The lease with the exit side's counters."""
        with self.lock:
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
        with self.lock:
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
        with self.lock:
            self._drop_reshaped(self.config.enabled_services())
            report = self.dataplane.reconcile(self.store,
                                              self.config.enabled_services())
            for w in getattr(self.dataplane, "warnings", ()):
                log("warning", "%s", w)
            return report

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
        """The lease from the client's side: ids and endpoints turned
        round (the store keeps the exit's side)."""
        v = {"lease_id": lease.lease_id}
        if secret is not None:
            v["secret"] = secret
        v.update({
            "service": lease.service, "kind": lease.kind,
            "encap": lease.encap, "local": lease.remote,
            "remote": lease.local,
        })
        if lease.kind == "l2tpv3":
            v.update({
                "tunnel_id": lease.peer_tunnel_id,
                "peer_tunnel_id": lease.tunnel_id,
                "session_id": lease.peer_session_id,
                "peer_session_id": lease.session_id,
            })
        elif lease.kind == "ip6gretap":
            # The exit receives with key tunnel_id and sends peer_tunnel_id.
            v.update({"ikey": lease.peer_tunnel_id, "okey": lease.tunnel_id})
        if lease.encap == "udp":
            v["udp_sport"] = lease.peer_udp_port
            v["udp_dport"] = lease.udp_port
        extra = lease.extra or {}
        lifetime = svc.lifetime if svc else int(lease.expires -
                                                lease.renewed)
        prefix = extra.get("prefix", "")
        v.update({
            "mtu": lease.mtu, "ifname": ("mb-" + lease.service)[:15],
            "mac": lease.mac or "",
            "prefix": prefix, "ipv4": extra.get("ipv4", ""),
            "ipv4_gateway": svc.ipv4_gateway if svc and extra.get("ipv4")
            else "",
            "lifetime": lifetime,
            "renew_interval": svc.renew_interval if svc else lifetime // 5,
            "expires": int(lease.expires), "state": lease.state,
        })
        if lease.kind == "ip6tnl":
            # Routed: our own address is the prefix's first, or the /128.
            v["ipv6"] = routed_address(prefix)
            if prefix.endswith("/128"):
                v["prefix"] = ""
        return v
