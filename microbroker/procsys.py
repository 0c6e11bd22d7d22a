"""Per-interface settings under /proc/sys/net, written as sysctl(8)
writes them: a file write, not a process."""

import errno

from .names import check_ifname

# Directories beside the interfaces' under conf/: every interface's, and
# new ones'.
NOT_INTERFACES = ("all", "default")


def disable_ipv6(ifname):
    """net.ipv6.conf.IFNAME.disable_ipv6 = 1, before the link is up: a
    bridge port needs no IPv6 of its own. Without it every port gets a
    link-local address, its fe80::/64 route and a multicast route, each
    added to a list that grows with the ports (building at 600 ports took
    1.9x the time at none), and it sends router solicitations and MLD
    reports down the client's tunnel. True if it took; False where the
    kernel has no IPv6 or /proc/sys is not ours to write (a container):
    the port works the same, only dearer."""
    if check_ifname(ifname) in NOT_INTERFACES:
        raise ValueError("%r names every interface's setting, not one's" % ifname)
    path = "/proc/sys/net/ipv6/conf/%s/disable_ipv6" % ifname
    try:
        with open(path, "wb", buffering=0) as f:
            f.write(b"1")
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS):
            return False
        raise
    return True
