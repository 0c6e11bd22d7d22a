"""SIGHUP in `serve`: read the config again and apply it in place.

    reload(app, load) -> report dict, or None when the new config has
    problems (the old one stays, the problems are logged)

A service that is gone (or disabled) or whose shape changed ends its
leases: the shape is everything a live lease was built from and cannot
follow (SHAPE: kind, encap, endpoint, bridge, MTU, filter profile, address
pools). Everything else (lifetime, renew_interval, capacity, tokens,
texts, provides, the broker's quotas, allow/deny, hooks, logging) applies
to the next request, and the live tunnels of those services are not
touched. Options that a running server cannot change (RESTART: where it
listens, the lease file, the id ranges and interface prefix, the data
plane) keep their old values until a restart, and the log says so.
A reconcile afterwards builds the bridges and filter tables of new
services and puts tunnels back into a bridge that was recreated.
"""

from microbroker.broker import log

SHAPE = ("kind", "encap", "family", "endpoint", "udp_port", "mtu", "bridge",
         "isolate", "restrict", "ports", "prefix_pool", "prefix_length",
         "ipv4_pool", "ipv4_gateway")
RESTART = ("listen", "state_dir", "lease_file", "tunnel_ids", "session_ids",
           "ifname_prefix", "dataplane", "filter", "max_connections",
           "timeout", "max_header", "max_body", "log")


def _services(cfg):
    return {s.name: s for s in cfg.enabled_services()}


def _public(svc):
    return {k: v for k, v in vars(svc).items() if not k.startswith("_")}


def diff(old, new):
    """(added, removed, reshaped, changed) service names, and the RESTART
    options that differ."""
    a, b = _services(old), _services(new)
    added = sorted(set(b) - set(a))
    removed = sorted(set(a) - set(b))
    reshaped, changed = [], []
    for name in sorted(set(a) & set(b)):
        if any(getattr(a[name], k) != getattr(b[name], k) for k in SHAPE):
            reshaped.append(name)
        elif _public(a[name]) != _public(b[name]):
            changed.append(name)
    restart = [k for k in RESTART if getattr(old, k) != getattr(new, k)]
    return added, removed, reshaped, changed, restart


def reload(app, load):
    """Apply the config `load()` returns to app (web.App) and its broker."""
    new = load()
    if new.problems:
        log("error", "reload: the config has %d problem(s), keeping the "
            "running one; first: %s: %s", len(new.problems),
            *new.problems[0])
        return None
    b = app.broker
    old = app.config
    added, removed, reshaped, changed, restart = diff(old, new)
    for k in restart:
        setattr(new, k, getattr(old, k))   # until a restart
    new.lease_path = old.lease_path
    if restart:
        log("warning", "reload: %s changed; that takes a restart (the "
            "running values stay)", ", ".join(restart))
    log.configure(old.log, new.log_level, new.log_client_addresses)
    ending = set(removed) | set(reshaped)
    lock = getattr(b, "lock", None)
    if lock is not None:
        lock.acquire()
    try:
        app.config = b.config = new
        if getattr(b.dataplane, "config", None) is not None:
            b.dataplane.config = new
        store = b.store
        for k in ("max_leases", "max_per_client"):
            if hasattr(store, k):
                setattr(store, k, getattr(new, k))
        gone = [l for l in store.leases() if l.service in ending or
                l.service not in _services(new)]
        gone = [l for l in gone if store.remove(l.lease_id)]
    finally:
        if lock is not None:
            lock.release()
    for lease in gone:
        why = "ended (service %s %s by reload)" % (
            lease.service, "reshaped" if lease.service in reshaped
            else "removed")
        b._take_down(lease, why)
    report = {"added": added, "removed": removed, "reshaped": reshaped,
              "changed": changed, "restart_needed": restart,
              "leases_ended": len(gone)}
    # Bridges and tables of new services; tunnels back into a bridge that
    # was recreated (procd signals a reload when a netdev changed).
    try:
        report["reconcile"] = b.reconcile()
    except Exception as e:
        log("error", "reload: reconcile failed: %s: %s", type(e).__name__, e)
    log("info", "reloaded %s: services added %s, removed %s, reshaped %s, "
        "changed %s; %d lease(s) ended", new.path or "built-in defaults",
        ",".join(added) or "-", ",".join(removed) or "-",
        ",".join(reshaped) or "-", ",".join(changed) or "-", len(gone))
    return report
