"""Reconcile: make the exit's kernel match the live leases, from one set of dumps.

`reconcile(dataplane, live, services)` is what `Dataplane.reconcile` runs:
bridges and filter tables first, then live leases missing in the kernel
rebuilt by `Dataplane.up`, Open vSwitch ports, tunnels and links in our id
range that no live lease owns removed, routes to leased prefixes and
addresses, and the filter map of restricted leases.
"""

import errno
import socket

from . import l2tp, rtnl
from .dataplane import (OVS_DATAPATH, IdInUse, KernelUnavailable, bridge_name, layer,
                        lease_routes, ovs_backed, profile_ports, restrict_profile)
from .kinds import KINDS


def reconcile(dp, live, services):
    """Make the kernel match the live leases (a list); idempotent.

    Live leases missing in the kernel are rebuilt, tunnels in our id
    range that no live lease owns removed, and the same for the routes
    to leased prefixes and addresses. The broker sweeps expired leases
    first (so their down hooks run). Afterwards `dp.foreign_ids` holds the
    (tunnel_id, session_id) pairs in the kernel, (tunnel_id, 0) for a
    bare tunnel, that no live lease holds: from the same dumps.
    """
    report = {"rebuilt": [], "removed": [], "links_removed": [], "failed": [],
              "routes_added": [], "routes_removed": [], "filters_fixed": []}
    by_name = {s.name: s for s in services}
    dp.recheck_services()       # check bridges and tables again, not from memory
    lo, hi = dp.config.tunnel_ids
    try:
        l2 = l2tp.L2TP()
    except l2tp.NotAvailable as e:
        if any(l.kind == "l2tpv3" for l in live) or \
                any(s.kind == "l2tpv3" for s in services):
            raise
        l2 = None      # an exit of GRE and ip6tnl only, without L2TP modules
    try:
        with rtnl.Rtnl() as rt:
            tunnels = l2.tunnel_remotes() if l2 else {}     # {id: remote}
            sessions = l2.session_ids() if l2 else set()
            # Bridges and filter rules first: a restart after `nft flush
            # ruleset` or a reboot must not leave beacons or isolation open.
            ready = set()
            for svc in services:
                try:
                    dp.ensure_service(svc, rt)
                    ready.add(svc.name)
                except (OSError, ValueError, KernelUnavailable) as e:
                    report["failed"].append("service %s: %s" % (svc.name, e))
            ovs = any(ovs_backed(s) for s in services)
            links = link_dump(rt, ovs)
            owned = set()
            for lease in live:
                owned.add(lease.tunnel_id)
                svc = by_name.get(lease.service)
                if svc is None:
                    continue
                link = links.get(lease.ifname)
                if intact(lease, link, tunnels.get(lease.tunnel_id), sessions):
                    continue
                try:
                    if lease.tunnel_id in tunnels and tunnels[lease.tunnel_id] != lease.remote:
                        l2.delete_tunnel(lease.tunnel_id)
                    dp.up(lease, svc)
                    report["rebuilt"].append(lease.lease_id)
                except (OSError, ValueError, KernelUnavailable, IdInUse) as e:
                    report["failed"].append("%s: %s" % (lease.lease_id, e))
            # Open vSwitch ports before the tunnels that no lease owns:
            # vswitchd must let go of a port before its device goes.
            _ovs_ports(dp, rt, live, services, ready, report, links)
            for tid in sorted(tunnels):
                if lo <= tid <= hi and tid not in owned:
                    try:
                        l2.delete_tunnel(tid)
                    except l2tp.NotFound:
                        pass
                    report["removed"].append(tid)
            dp.foreign_ids = foreign(live, tunnels, sessions, report["removed"])
            _remove_links(dp, rt, links, owned, report)
            if report["rebuilt"] or report["links_removed"]:
                links = link_dump(rt, ovs)    # indexes changed
            _routes(rt, live, by_name, services, report, links)
    finally:
        if l2 is not None:
            l2.close()
    f = dp.filters()
    if f is not None:
        _sync_ports(f, live, by_name, ready, report,
                    any(KINDS[s.kind].layer == 3 for s in services))
    return report


def _ovs_ports(dp, rt, live, services, ready, report, links):
    """Open vSwitch bridges: leased ports and flow tables (ovs.py).
    `links` has the devices on the kernel datapath; one of a lease
    that is not (its port gone from OVSDB) is looked up by name."""
    for svc in services:
        if svc.name not in ready or not ovs_backed(svc) or KINDS[svc.kind].layer != 2:
            continue
        mine = [l for l in live if l.service == svc.name]
        present = set()
        for lease in mine:
            if lease.ifname in links or _has_link(rt, lease.ifname):
                present.add(lease.ifname)
        try:
            dp.ovs_call("reconcile", svc, bridge_name(svc), mine, present, report)
        except Exception as e:
            report["failed"].append("service %s: Open vSwitch: %s" % (svc.name, e))


def _has_link(rt, name):
    try:
        rt.link(name)
    except rtnl.NoSuchLink:
        return False
    return True


def _sync_ports(f, live, by_name, ready, report, routed):
    """Every restricted lease in the filter map, whether or not its
    links were rebuilt: rules can go while links stay. A lease whose
    service is gone from the config, or could not be set up now, keeps
    what it has: no rule is dropped that nothing replaces."""
    want = {"bridge": {}, "inet": {}}
    keep = set()
    for lease in live:
        svc = by_name.get(lease.service)
        if svc is None or svc.name not in ready:
            keep.add(lease.ifname)
            continue
        profile = restrict_profile(svc)
        if profile and not (layer(lease) == 2 and ovs_backed(svc)):
            want["bridge" if layer(lease) == 2 else "inet"][lease.ifname] = \
                (profile, profile_ports(svc))
    for family in f.FAMILIES:
        if family == "inet" and not (routed or want["inet"]):
            continue        # no routed service: save a process
        try:
            changed, problems = f.sync_ports(want[family], family, keep)
        except (OSError, RuntimeError) as e:
            changed, problems = [], [str(e)]
        report["filters_fixed"] += changed
        report["failed"] += ["%s filter rules: %s" % (family, p) for p in problems]


def link_dump(rt, ovs=False):
    """{name: Link} of what reconcile looks at: bridge ports (as
    `bridge link`: a few attributes each), bridges, and the GRE and
    ip6tnl links by kind, filtered in the kernel. A full link dump
    costs several times as much at a thousand leases. Ports of Open
    vSwitch bridges are no Linux bridge's: with `ovs`, the links whose
    master is the kernel datapath (OVS_DATAPATH) are added; l2tpeth
    has no link kind to filter by."""
    links = {l.name: l for l in rt.bridge_ports()}
    if ovs:
        try:
            links.update((l.name, l) for l in
                         rt.links_of_master(rt.ifindex(OVS_DATAPATH)))
        except rtnl.NoSuchLink:
            pass    # the userspace (netdev) datapath: no kernel master
    for kind in ("bridge", "ip6gretap", "ip6tnl"):
        links.update((l.name, l) for l in rt.links_of_kind(kind))
    return links


def foreign(live, tunnels, sessions, removed):
    """Kernel id pairs no live lease holds, less the tunnels removed."""
    ours = {(l.tunnel_id, l.session_id) for l in live}
    skip = set(removed) | {l.tunnel_id for l in live} | {t for t, _s in sessions}
    out = {p for p in sessions if p not in ours and p[0] not in removed}
    return out | {(t, 0) for t in tunnels if t not in skip}


def intact(lease, link, remote, sessions):
    """Is the lease's interface in the kernel as up() would build it?
    `remote`: its tunnel's, None without a tunnel."""
    if link is None or link.mtu != lease.mtu or not link.flags & rtnl.IFF_UP:
        return False
    if lease.kind == "l2tpv3":
        return remote is not None and remote == lease.remote and \
            (lease.tunnel_id, lease.session_id) in sessions and bool(link.master)
    return link.kind == lease.kind and link.remote == lease.remote and \
        link.local == lease.local and \
        (layer(lease) == 3 or bool(link.master))


def _remove_links(dp, rt, links, owned, report):
    """GRE and ip6tnl links named for a tunnel id in our range that no
    live lease owns (L2TP ones go with their tunnels)."""
    lo, hi = dp.config.tunnel_ids
    n = len(dp.prefix)
    for name, link in sorted(links.items()):
        if link.kind not in ("ip6gretap", "ip6tnl") or not name.startswith(dp.prefix):
            continue
        digits = name[n:]
        if not digits.isdigit() or not lo <= int(digits) <= hi or int(digits) in owned:
            continue
        try:
            rt.delete_link(name)
        except rtnl.NoSuchLink:
            pass
        report["links_removed"].append(name)


def pool_routes(services):
    """(family, parsed pool, length) of every pool: routes of that length
    inside a pool are ours."""
    from .config import parse_prefix
    out = []
    for svc in services:
        if getattr(svc, "prefix_pool", ""):
            out.append((socket.AF_INET6, parse_prefix(svc.prefix_pool), svc.prefix_length))
        if getattr(svc, "ipv4_pool", ""):
            out.append((socket.AF_INET, parse_prefix(svc.ipv4_pool), 32))
    return out


def _routes(rt, live, by_name, services, report, links):
    """Routes of live leases present and right; routes of a pool's
    length inside a pool that no live lease owns removed."""
    from .config import in_prefixes, parse_addr
    want = {}
    for lease in live:
        svc = by_name.get(lease.service)
        if svc is not None:
            for dst, via, dev in lease_routes(lease, svc):
                want[dst] = (via, dev, lease.lease_id)
    pools = pool_routes(services)
    have = {}
    for family in sorted({fam for fam, _p, _l in pools} |
                         {socket.AF_INET6 if ":" in d else socket.AF_INET for d in want}):
        for r in rt.routes(family):
            have.setdefault("%s/%d" % (r.dst, r.dst_len), []).append(r)
    index = {name: l.index for name, l in links.items()}
    for dst, (via, dev, lease_id) in sorted(want.items()):
        ok = any(r.gateway == via and r.oif == index.get(dev) and
                 r.type == rtnl.RTN_UNICAST for r in have.get(dst, ()))
        if ok:
            continue
        try:
            rt.add_route(dst, dev=dev, via=via)
            report["routes_added"].append(dst)
        except (OSError, ValueError) as e:
            report["failed"].append("%s: route %s: %s" % (lease_id, dst, e))
    for dst, routes in sorted(have.items()):
        if dst in want:
            continue
        addr, _s, plen = dst.partition("/")
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        mine = any(fam == family and int(plen) == length and
                   in_prefixes(*parse_addr(addr), [pool]) and pool[2] <= length
                   for fam, pool, length in pools)
        if not mine:
            continue
        for _r in routes:
            try:
                rt.delete_route(dst)
            except rtnl.LinkError as e:
                if e.errno != errno.ESRCH:
                    report["failed"].append("route %s: %s" % (dst, e))
                    break
        report["routes_removed"].append(dst)
