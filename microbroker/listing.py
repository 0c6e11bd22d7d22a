"""`microbroker leases`: every lease as the operator sees it, like `wg
show`: who, which service and kind, the exit's interface, state, age,
expiry and the exit side's rx/tx counters.

Counters come from the kernel through the dataplane's counters(); where
it has none (dataplane none, a link gone, no permission) the stored ones
are shown and the row says so (`counters_from`).
"""

COUNTERS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")


def rows(store, dataplane, now):
    """One dict per lease, oldest first."""
    out = []
    for lease in sorted(store.leases(), key=lambda l: (l.created,
                                                       l.lease_id)):
        counters, source = None, "kernel"
        try:
            c = dataplane.counters(lease)
            if c:
                counters = {k: int(c.get(k, 0)) for k in COUNTERS}
        except Exception:
            pass
        if counters is None:
            counters = {k: int(getattr(lease, k, 0) or 0) for k in COUNTERS}
            source = "store"
        extra = lease.extra or {}
        out.append({
            "lease_id": lease.lease_id, "client": lease.client,
            "service": lease.service, "kind": lease.kind,
            "encap": lease.encap, "ifname": lease.ifname,
            "state": lease.state, "mtu": lease.mtu, "mac": lease.mac or "",
            "prefix": extra.get("prefix", ""), "ipv4": extra.get("ipv4", ""),
            "created": int(lease.created), "expires": int(lease.expires),
            "age": max(0, int(now - lease.created)),
            "expires_in": int(lease.expires - now),
            "counters": counters, "counters_from": source,
        })
    return out


def to_json(rows):
    from microbroker.jsonlite import dumps
    return dumps({"leases": rows, "count": len(rows)}) + "\n"


def duration(s):
    """Seconds as the largest two units: 45s, 3m05s, 2h10m, 4d03h;
    negative: past."""
    sign, s = ("-", -s) if s < 0 else ("", s)
    for unit, div, sub, subdiv in (("d", 86400, "h", 3600),
                                   ("h", 3600, "m", 60),
                                   ("m", 60, "s", 1)):
        if s >= div:
            return "%s%d%s%02d%s" % (sign, s // div, unit,
                                     s % div // subdiv, sub)
    return "%s%ds" % (sign, s)


def size(n):
    """Bytes in 1024 steps, as `ip -h` prints them."""
    for unit in ("", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return "%d%s" % (n, unit) if not unit or n >= 10 else \
                "%.1f%s" % (n, unit)
        n /= 1024.0


HEAD = ("LEASE", "CLIENT", "SERVICE", "KIND", "IFNAME", "STATE", "AGE",
        "EXPIRES", "RX", "TX")


def table(rows):
    """A fixed-width table; RX/TX are bytes (packets)."""
    lines = [HEAD]
    for r in rows:
        c = r["counters"]
        mark = "" if r["counters_from"] == "kernel" else "*"
        lines.append((
            r["lease_id"], r["client"], r["service"], r["kind"], r["ifname"],
            r["state"], duration(r["age"]),
            duration(r["expires_in"]) if r["expires_in"] >= 0 else "expired",
            "%s (%d)%s" % (size(c["rx_bytes"]), c["rx_packets"], mark),
            "%s (%d)%s" % (size(c["tx_bytes"]), c["tx_packets"], mark)))
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(HEAD))]
    text = "".join("  ".join(str(v).ljust(w) for v, w in zip(l, widths))
                   .rstrip() + "\n" for l in lines)
    n = len(rows)
    text += "%d lease%s" % (n, "" if n == 1 else "s")
    if any(r["counters_from"] != "kernel" for r in rows):
        text += "; * counters as last stored (the kernel had none)"
    return text + "\n"
