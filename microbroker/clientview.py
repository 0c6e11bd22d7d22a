"""A lease as its client sees it: the store keeps the exit's side (ids,
ends, UDP ports), the answer turns them round (docs/api.md)."""

from microbroker.addresses import routed_address


def view(lease, svc, secret=None):
    """The lease from its client's side; `secret` goes only into a
    grant (or re-issue) of the lease."""
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
    lifetime = svc.lifetime if svc else int(lease.expires - lease.renewed)
    prefix = extra.get("prefix", "")
    v.update({
        "mtu": lease.mtu, "ifname": ("mb-" + lease.service)[:15],
        "mac": lease.mac or "",
        "prefix": prefix, "ipv4": extra.get("ipv4", ""),
        "ipv4_gateway": svc.ipv4_gateway if svc and extra.get("ipv4") else "",
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
