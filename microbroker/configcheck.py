"""check-config's checks across options: what every option read alone
allows but the options together do not (a renew interval without margin
in its lifetime, more tunnels than a bridge has ports, overlapping pools,
a kind with an encap or a family it has not, ...).

config.build runs them on every load, after the defaults that depend on
other options are set; each problem is appended as (where, message).
"""

from microbroker.addresses import in_prefixes, parse_addr, parse_prefix
from microbroker.config import (BR_MAX_PORTS, PROVIDES, RENEW_MARGIN,
                                parse_listen, routed_provides)
from microbroker.kinds import KINDS


def check(cfg, at):
    """Append the problems of cfg's options taken together to
    cfg.problems; at(line) names a place in the file."""
    p = cfg.problems
    from microbroker.names import prefix_problem
    why = prefix_problem(cfg.ifname_prefix, cfg.tunnel_ids[1])
    if why:
        p.append((at(0), why))
    if 0 < cfg.idle_grace < 60:
        p.append((at(0), "idle_grace %d is too short for a client to bring "
                  "its tunnel up and send through it (0, or at least 60)"
                  % cfg.idle_grace))
    ports = {}
    for text in cfg.listen:
        try:
            fam, host, port = parse_listen(text)
        except ValueError:
            continue  # already reported
        if (host, port) in ports:
            p.append((at(0), "listen %s given twice" % text))
        ports[(host, port)] = fam
    for svc in cfg.services.values():
        _check_service(svc, at(svc._line) if svc._line else "--set", p)
    routed = [s for s in cfg.enabled_services() if KINDS[s.kind].layer == 3]
    if len({s.isolate for s in routed}) > 1:
        p.append((at(0), "services %s: routed services share one isolation "
                  "rule, so isolate must be the same for all of them"
                  % ", ".join(s.name for s in routed)))
    if routed and cfg.filter == "ebtables":
        p.append((at(0), "services %s: routed tunnels need nft for their "
                  "source check and isolation, but filter is 'ebtables'"
                  % ", ".join(s.name for s in routed)))
    _check_pool_overlap(cfg.enabled_services(), at(0), p)
    _check_bridge_ports(cfg, at(0), p)
    if not cfg.enabled_services():
        p.append((at(0), "no enabled service: clients can lease nothing"))


def _check_service(svc, where, p):
    if "renew_interval" in svc._explicit and \
            svc.renew_interval * 2 + RENEW_MARGIN > svc.lifetime:
        p.append((where, "service %s: renew_interval %d leaves too little "
                  "margin in lifetime %d: a lease must outlive two "
                  "renew intervals and %d s more (renew_interval at "
                  "most %d)" % (svc.name, svc.renew_interval,
                                svc.lifetime, RENEW_MARGIN, max(
                                    0, (svc.lifetime - RENEW_MARGIN) // 2))))
    if svc.endpoint:
        fam = 6 if ":" in svc.endpoint else 4
        if fam != svc.family:
            p.append((where, "service %s: endpoint %s is not an IPv%d "
                      "address (family %d)" % (svc.name, svc.endpoint,
                                               svc.family, svc.family)))
    if svc.restrict == "none" and svc.ports:
        p.append((where, "service %s: ports only apply with restrict "
                  "'dns+web'" % svc.name))
    if svc.encap == "udp":
        top = svc.udp_port + svc.capacity - 1
        if top > 65535:
            p.append((where, "service %s: udp_port %d + capacity does "
                      "not fit below 65536 (the exit uses one UDP port "
                      "per tunnel)" % (svc.name, svc.udp_port)))
    kind = KINDS[svc.kind]
    if svc.encap not in kind.encaps:
        p.append((where, "service %s: kind %s has no encap %s (only %s)"
                  % (svc.name, svc.kind, svc.encap,
                     ", ".join(kind.encaps))))
    if svc.kind != "l2tpv3" and svc.family != 6:
        p.append((where, "service %s: kind %s runs over IPv6 only"
                  % (svc.name, svc.kind)))
    if kind.layer == 3:
        if svc.bridge:
            p.append((where, "service %s: kind %s is routed, bridge does "
                      "not apply" % (svc.name, svc.kind)))
        if svc.bridge_backend != "linux":
            p.append((where, "service %s: kind %s is routed, "
                      "bridge_backend does not apply" % (svc.name, svc.kind)))
    _check_pools(svc, where, p, kind.layer)


def _check_bridge_ports(cfg, where, p):
    """Every lease of a layer 2 service is a port of its bridge, and a Linux
    bridge numbers its ports 1 .. BR_MAX_PORTS - 1: the services sharing
    a bridge must fit together (max_leases bounds them as well)."""
    by_bridge = {}
    for svc in cfg.enabled_services():
        if KINDS[svc.kind].layer == 2 and svc.bridge_backend == "linux":
            by_bridge.setdefault(svc.bridge, []).append(svc)
    for bridge, svcs in sorted(by_bridge.items()):
        ports = min(sum(s.capacity for s in svcs), cfg.max_leases)
        if ports > BR_MAX_PORTS - 1:
            p.append((where, "bridge %s: services %s may put %d tunnels on "
                      "it, but a Linux bridge holds at most %d ports; lower "
                      "their capacity, give them bridges of their own, or "
                      "use bridge_backend 'ovs'"
                      % (bridge, ", ".join(s.name for s in svcs), ports,
                         BR_MAX_PORTS - 1)))


def _check_pool_overlap(services, where, p):
    """Services may share a pool only as the very same pool and length:
    the broker tells items apart by their text."""
    seen = []
    for svc in services:
        for opt, length in (("prefix_pool", svc.prefix_length),
                            ("ipv4_pool", 32)):
            pool = getattr(svc, opt)
            if not pool:
                continue
            try:
                family, net, n = parse_prefix(pool)
            except ValueError:
                continue        # reported where the option is read
            bits = 32 if family == 4 else 128
            for other, ofam, onet, on, olen, opool in seen:
                if ofam != family or (pool, length) == (opool, olen):
                    continue
                m = min(n, on)
                if net >> (bits - m) == onet >> (bits - m):
                    p.append((where, "services %s and %s: pools %s and %s "
                              "overlap (share a pool only with the same "
                              "pool and prefix_length)"
                              % (other, svc.name, opool, pool)))
            seen.append((svc.name, family, net, n, length, pool))


def _check_pools(svc, where, p, layer=2):
    """Pools need their companions, and a pool is what `provides` says."""
    if svc.prefix_pool:
        n = int(svc.prefix_pool.rpartition("/")[2])
        if svc.prefix_length < n:
            p.append((where, "service %s: prefix_length %d is shorter than "
                      "prefix_pool %s" % (svc.name, svc.prefix_length,
                                          svc.prefix_pool)))
    elif "prefix_length" in svc._explicit:
        p.append((where, "service %s: prefix_length needs a prefix_pool"
                  % svc.name))
    if layer == 3:
        _check_routed(svc, where, p)
        return
    if svc.ipv4_pool:
        if not svc.ipv4_gateway:
            p.append((where, "service %s: ipv4_pool needs ipv4_gateway (the "
                      "bridge's IPv4 address, the clients' gateway)"
                      % svc.name))
        elif in_prefixes(*parse_addr(svc.ipv4_gateway),
                         [parse_prefix(svc.ipv4_pool)]):
            p.append((where, "service %s: ipv4_gateway %s lies inside "
                      "ipv4_pool %s" % (svc.name, svc.ipv4_gateway,
                                        svc.ipv4_pool)))
    elif svc.ipv4_gateway:
        p.append((where, "service %s: ipv4_gateway needs an ipv4_pool"
                  % svc.name))
    for pool, name, opt in ((svc.prefix_pool, "ipv6-prefix", "prefix_pool"),
                            (svc.ipv4_pool, "ipv4-public", "ipv4_pool")):
        if not pool and name in svc.provides:
            p.append((where, "service %s: provides %s needs a %s"
                      % (svc.name, name, opt)))


def _check_routed(svc, where, p):
    """A routed service has no bridge to run DHCP or RA on: everything the
    client gets comes from its pools, and every pool is offered."""
    if svc.prefix_pool and svc.mtu and svc.mtu < 1280:
        p.append((where, "service %s: mtu %d is below 1280, where Linux "
                  "turns IPv6 off, so prefix_pool cannot be routed"
                  % (svc.name, svc.mtu)))
    if svc.ipv4_gateway:
        p.append((where, "service %s: kind %s is point-to-point, "
                  "ipv4_gateway does not apply" % (svc.name, svc.kind)))
    if not svc.ipv4_pool and not svc.prefix_pool:
        p.append((where, "service %s: kind %s is routed, so its clients' "
                  "addresses come from ipv4_pool and/or prefix_pool; set "
                  "at least one" % (svc.name, svc.kind)))
    want = routed_provides(svc)
    for name in PROVIDES:
        if name in svc.provides and name not in want:
            p.append((where, "service %s: provides %s needs %s" % (
                svc.name, name, "an ipv4_pool" if name.startswith("ipv4")
                else "a prefix_pool with prefix_length %s"
                % ("128" if name == "ipv6-single" else "below 128"))))
