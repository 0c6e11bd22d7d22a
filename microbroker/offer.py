"""The offer: every enabled service with its room and whether this exit's
kernel can build it, for a client to choose from (docs/api.md)."""

from microbroker import __version__
from microbroker.kinds import KINDS

API_VERSION = 1


def offer(broker, local=None, status=None, counts=None):
    """Everything a client needs to choose. `local` is the address the
    request arrived on (the endpoint of services that configure none);
    `status` and `counts`: broker.kernel_status() and broker.counts(),
    where the caller has them already."""
    cfg = broker.config
    ok, reason, kernel = status or broker.kernel_status()
    total, counts = counts or broker.counts()
    services = {}
    for svc in cfg.enabled_services():
        used = counts.get(svc.name, 0)
        services[svc.name] = {
            "kind": svc.kind, "layer": KINDS[svc.kind].layer,
            "encap": svc.encap, "family": svc.family,
            "endpoint": broker.endpoint(svc, local),
            "provides": list(svc.provides), "restrict": svc.restrict,
            "ports": list(svc.ports), "mtu": svc.mtu,
            "lifetime": svc.lifetime,
            "renew_interval": svc.renew_interval,
            "capacity": svc.capacity, "used": used,
            "free": free(broker, svc, total, counts),
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


def free(broker, svc, total, counts):
    """What a new lease of svc still finds: the least of the service's,
    the broker's (max_leases) and its Linux bridge's (BR_MAX_PORTS - 1)
    room (Broker.limits)."""
    room = min(svc.capacity - counts.get(svc.name, 0),
               broker.config.max_leases - total)
    for names, most, _why in broker.limits(svc):
        room = min(room, most - sum(counts.get(n, 0) for n in names))
    return max(0, room)
