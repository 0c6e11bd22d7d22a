"""The operator's up/down hook: its argv, its environment, running it.

    HOOK EVENT IFNAME LEASE_ID SERVICE CLIENT

with the whole lease in the environment as MB_* variables (environ()
lists them), so a hook can add the interface to a firewall set, account
traffic, or announce a prefix without asking the broker anything. The
hook runs without a shell, stdin from /dev/null, its stdout discarded;
the last 200 bytes of its stderr go into the error of a failing hook.
"""

COUNTERS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")

# lease attribute -> variable, in the order docs/debian.md lists them
FIELDS = (
    ("lease_id", "MB_LEASE_ID"), ("service", "MB_SERVICE"),
    ("kind", "MB_KIND"), ("encap", "MB_ENCAP"), ("ifname", "MB_IFNAME"),
    ("client", "MB_CLIENT"), ("local", "MB_LOCAL"), ("remote", "MB_REMOTE"),
    ("tunnel_id", "MB_TUNNEL_ID"), ("peer_tunnel_id", "MB_PEER_TUNNEL_ID"),
    ("session_id", "MB_SESSION_ID"),
    ("peer_session_id", "MB_PEER_SESSION_ID"),
    ("udp_port", "MB_UDP_PORT"), ("peer_udp_port", "MB_PEER_UDP_PORT"),
    ("mtu", "MB_MTU"), ("mac", "MB_MAC"), ("state", "MB_STATE"),
    ("created", "MB_CREATED"), ("renewed", "MB_RENEWED"),
    ("expires", "MB_EXPIRES"),
)


def _text(v):
    if isinstance(v, float):
        v = int(v)
    # One line of printable text: values come from the store, which holds
    # what the broker wrote, but a hook may eval them in sh.
    return "".join(c for c in str(v) if " " <= c <= "~")


def environ(event, lease, service=None, counters=None, base=None):
    """The hook's environment: `base` (default: PATH only) plus MB_EVENT
    and the lease. `service` adds MB_BRIDGE (layer 2) and MB_LIFETIME;
    `counters` (a down event) the exit side's rx/tx."""
    env = dict(base if base is not None else {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    env["MB_EVENT"] = event
    for attr, var in FIELDS:
        env[var] = _text(getattr(lease, attr, "") or "")
    extra = getattr(lease, "extra", None) or {}
    env["MB_PREFIX"] = _text(extra.get("prefix", ""))
    env["MB_IPV4"] = _text(extra.get("ipv4", ""))
    if service is not None:
        env["MB_LIFETIME"] = str(int(service.lifetime))
        env["MB_BRIDGE"] = _text(getattr(service, "bridge", "") or "")
        gw = getattr(service, "ipv4_gateway", "") if extra.get("ipv4") \
            else ""
        env["MB_IPV4_GATEWAY"] = _text(gw or "")
    if counters is not None:
        for k in COUNTERS:
            env["MB_" + k.upper()] = str(int(counters.get(
                k, getattr(lease, k, 0)) or 0))
    return env


def argv(path, event, lease):
    return [path, event, lease.ifname, lease.lease_id, lease.service,
            lease.remote]


class HookError(RuntimeError):
    """The hook could not run, timed out or exited non-zero."""


def run(path, event, lease, timeout, service=None, counters=None):
    """Run the hook once; HookError if it fails."""
    import subprocess
    try:
        r = subprocess.run(argv(path, event, lease),
                           env=environ(event, lease, service, counters),
                           stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HookError("hook %s: %s" % (event, e))
    if r.returncode != 0:
        err = r.stderr.decode("utf-8", "replace").strip()[-200:]
        raise HookError("hook %s exited %d: %s" % (event, r.returncode, err))
