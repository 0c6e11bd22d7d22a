"""The tunnel kinds an exit can offer, as one table.

A kind says what the client gets (layer 2: an Ethernet port on the
service's bridge; layer 3: a routed point-to-point link whose addresses
come from the lease), which encapsulations it has, its per-packet overhead
over the outer IPv6 header, which lease ids it uses and which kernel module
builds it. The broker, the config check and the dataplane all read this
table; the kernel calls per kind live in dataplane.py.
"""

# Outer IPv6 header; the kinds below add their own on top.
IPV6_HEADER = 40
ETH_HEADER = 14


class Kind:
    __slots__ = ("name", "layer", "encaps", "overhead", "ids", "module", "text")

    def __init__(self, name, layer, encaps, overhead, ids, module, text):
        self.name = name
        self.layer = layer          # 2: bridged Ethernet, 3: routed
        self.encaps = encaps
        self.overhead = overhead    # encap -> bytes over the inner packet
        self.ids = ids              # lease fields a client may propose
        self.module = module        # what the exit's kernel needs
        self.text = text


KINDS = {
    # L2TPv3 data header: session id (4) + default L2-specific sublayer (4);
    # over UDP also the UDP header (8) and the v3 flags word (4).
    "l2tpv3": Kind("l2tpv3", 2, ("ip", "udp"),
                   {"ip": IPV6_HEADER + 8 + ETH_HEADER,
                    "udp": IPV6_HEADER + 8 + 8 + 4 + ETH_HEADER},
                   ("tunnel_id", "session_id"), "l2tp_eth, l2tp_ip6",
                   "Ethernet pseudo-wire, L2TPv3 over IPv6"),
    # GRE with a key (8); the encapsulation-limit option is switched off.
    "ip6gretap": Kind("ip6gretap", 2, ("ip",),
                      {"ip": IPV6_HEADER + 8 + ETH_HEADER},
                      ("tunnel_id",), "ip6_gre",
                      "Ethernet pseudo-wire, GRE over IPv6"),
    "ip6tnl": Kind("ip6tnl", 3, ("ip",), {"ip": IPV6_HEADER},
                   (), "ip6_tunnel",
                   "routed IPv4 and IPv6 in IPv6"),
}

# The smallest MTU that still carries IPv6: below it the outer packets are
# fragmented instead.
MIN_MTU = 1280


def auto_mtu(kind, encap, path_mtu):
    """The inner MTU for a path MTU between exit and client."""
    return max(MIN_MTU, path_mtu - KINDS[kind].overhead[encap])


def offered(services):
    """'l2tpv3 (service default), ip6tnl (service v6)' for error messages."""
    return ", ".join("%s (service %s)" % (s.kind, s.name) for s in services) or "nothing"
