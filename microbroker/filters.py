"""Bridge-layer filter rules for pseudo-wire ports: nftables or ebtables.

Everything lives in a table (nft) or chains (ebtables) of our own, so the
operator's rules are never touched. Commands are argv lists (never a shell);
interface and profile names are checked before they reach an argument.
"""

import re
import shutil
import subprocess
import zlib

TABLE = "microbroker"
BEACON_ETHERTYPE = "0xfc00"   # cjdns beacons never cross a pseudo-wire
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")
_PROFILE = re.compile(r"^[A-Za-z0-9_]{1,24}$")


class FilterError(Exception):
    pass


def _check(name, rx=_NAME):
    if not isinstance(name, str) or not rx.match(name):
        raise ValueError("refusing name %r in a filter rule" % (name,))
    return name


def _ports(ports):
    out = sorted({int(p) for p in ports})
    if any(not 0 < p < 65536 for p in out):
        raise ValueError("bad port in %r" % (ports,))
    return out


def _run(argv, stdin=None, check=True):
    try:
        p = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=30)
    except OSError as e:
        raise FilterError("%s: %s" % (argv[0], e.strerror))
    if check and p.returncode != 0:
        raise FilterError("%s failed: %s" % (" ".join(argv[:3]), p.stderr.strip()))
    return p


class Nft:
    """nftables bridge family: sets of our ports and a verdict map to profiles.

    A lease adds its interface to a set (beacon drop) and, when restricted,
    maps it to its profile's chain: one `nft` call per lease, no rule handles.
    """

    name = "nft"

    def __init__(self, nft="nft"):
        self.nft = nft

    def _apply(self, script, check=True):
        return _run([self.nft, "-f", "-"], script, check)

    def ensure(self, profiles):
        """Create our table if missing and (re)write every profile chain."""
        lines = []
        if _run([self.nft, "list", "table", "bridge", TABLE], check=False).returncode != 0:
            lines += [
                "add table bridge %s" % TABLE,
                "add set bridge %s pw { type ifname; }" % TABLE,
                "add map bridge %s restrict { type ifname : verdict; }" % TABLE,
                "add set bridge %s iso { type ifname; }" % TABLE,
                "add chain bridge %s input { type filter hook input priority -200; }" % TABLE,
                "add chain bridge %s forward { type filter hook forward priority -200; }" % TABLE,
                "add chain bridge %s output { type filter hook output priority -200; }" % TABLE,
                "add rule bridge %s input iifname @pw ether type %s drop" % (TABLE,
                                                                           BEACON_ETHERTYPE),
                "add rule bridge %s input iifname vmap @restrict" % TABLE,
                "add rule bridge %s forward iifname @pw ether type %s drop" % (TABLE,
                                                                             BEACON_ETHERTYPE),
                "add rule bridge %s forward oifname @pw ether type %s drop" % (TABLE,
                                                                             BEACON_ETHERTYPE),
                # Fallback isolation for kernels without IFLA_BRPORT_ISOLATED.
                "add rule bridge %s forward iifname @iso oifname @iso drop" % TABLE,
                "add rule bridge %s forward iifname vmap @restrict" % TABLE,
                "add rule bridge %s output oifname @pw ether type %s drop" % (TABLE,
                                                                            BEACON_ETHERTYPE),
            ]
        for name, ports in sorted(profiles.items()):
            chain = "r_" + _check(name, _PROFILE)
            tcp = ", ".join(str(p) for p in [53] + [p for p in _ports(ports) if p != 53])
            lines += [
                "add chain bridge %s %s" % (TABLE, chain),
                "flush chain bridge %s %s" % (TABLE, chain),
                "add rule bridge %s %s ether type arp accept" % (TABLE, chain),
                # ICMP and ICMPv6: neighbour discovery, RA and path MTU need them.
                "add rule bridge %s %s ip protocol icmp accept" % (TABLE, chain),
                "add rule bridge %s %s ip6 nexthdr ipv6-icmp accept" % (TABLE, chain),
                "add rule bridge %s %s ip protocol udp udp dport { 53, 67 } accept" % (TABLE,
                                                                                     chain),
                "add rule bridge %s %s ip6 nexthdr udp udp dport { 53, 547 } accept" % (TABLE,
                                                                                      chain),
                "add rule bridge %s %s ip protocol tcp tcp dport { %s } accept" % (TABLE, chain,
                                                                                 tcp),
                "add rule bridge %s %s ip6 nexthdr tcp tcp dport { %s } accept" % (TABLE, chain,
                                                                                 tcp),
                "add rule bridge %s %s drop" % (TABLE, chain),
            ]
        if lines:
            self._apply("\n".join(lines) + "\n")

    def add_port(self, ifname, profile=None, isolate=False, ports=()):
        _check(ifname)
        lines = ["add element bridge %s pw { %s }" % (TABLE, ifname)]
        if profile:
            lines.append("add element bridge %s restrict { %s : jump r_%s }" %
                         (TABLE, ifname, _check(profile, _PROFILE)))
        if isolate:
            lines.append("add element bridge %s iso { %s }" % (TABLE, ifname))
        self._apply("\n".join(lines) + "\n")

    def remove_port(self, ifname):
        _check(ifname)
        # One call each: deleting an absent element fails its whole transaction.
        for what in ("pw", "restrict", "iso"):
            self._apply("delete element bridge %s %s { %s }\n" % (TABLE, what, ifname),
                        check=False)

    def ports(self):
        """Interfaces in our port set (for reconcile)."""
        p = _run([self.nft, "list", "set", "bridge", TABLE, "pw"], check=False)
        if p.returncode != 0:
            return set()
        m = re.search(r"elements = \{([^}]*)\}", p.stdout)
        if not m:
            return set()
        return {e.strip().strip('"') for e in m.group(1).split(",") if e.strip()}


class Ebtables:
    """ebtables: chains MB-IN, MB-FWD, MB-OUT jumped to from the builtin ones."""

    name = "ebtables"
    CHAINS = (("INPUT", "MB-IN"), ("FORWARD", "MB-FWD"), ("OUTPUT", "MB-OUT"))

    def __init__(self, ebtables="ebtables"):
        self.eb = ebtables

    def _e(self, *args, check=True):
        return _run([self.eb, "-t", "filter"] + [str(a) for a in args], check=check)

    @staticmethod
    def profile_chain(name, ports):
        # The port list is in the name, so a changed config makes a new chain.
        sig = zlib.crc32(",".join(map(str, _ports(ports))).encode()) & 0xFFFFFF
        return "MB-R-%s-%06x" % (_check(name, _PROFILE)[:16], sig)

    @staticmethod
    def profile_rules(ports):
        r = [("-p", "ARP"), ("-p", "IPv4", "--ip-proto", "icmp"),
             ("-p", "IPv6", "--ip6-proto", "ipv6-icmp")]
        r += [("-p", "IPv4", "--ip-proto", "udp", "--ip-dport", p) for p in (53, 67)]
        r += [("-p", "IPv6", "--ip6-proto", "udp", "--ip6-dport", p) for p in (53, 547)]
        for p in [53] + [p for p in _ports(ports) if p != 53]:
            r.append(("-p", "IPv4", "--ip-proto", "tcp", "--ip-dport", p))
            r.append(("-p", "IPv6", "--ip6-proto", "tcp", "--ip6-dport", p))
        return r

    def _chains(self):
        """{chain: (entries, rule lines)} from one `ebtables -L`."""
        out, chain = {}, None
        for line in self._e("-L", check=False).stdout.splitlines():
            if line.startswith("Bridge chain: "):
                chain = line[len("Bridge chain: "):].split(",")[0]
                m = re.search(r"entries: (\d+)", line)
                out[chain] = [int(m.group(1)) if m else -1, []]
            elif chain and line.strip() and not line.startswith("Bridge "):
                out[chain][1].append(line.split())
        return out

    def ensure(self, profiles):
        """Our chains in place; one listing call when nothing needs doing
        (a CGI process calls this on every lease)."""
        have = self._chains()
        for builtin, ours in self.CHAINS:
            if ours not in have:
                self._e("-N", ours, "-P", "RETURN")
            if ["-j", ours] not in have.get(builtin, [0, []])[1]:
                self._e("-I", builtin, "-j", ours)
        for name, ports in sorted(profiles.items()):
            chain = self.profile_chain(name, ports)
            rules = self.profile_rules(ports)
            if have.get(chain, [0])[0] == len(rules) + 1:
                continue
            if chain in have:
                self._e("-F", chain)
            else:
                self._e("-N", chain)
            # DROP first, accepts inserted above it: a half-built chain
            # (a crash mid-way) fails closed. -P with -N is not for ebtables-nft.
            self._e("-A", chain, "-j", "DROP")
            for spec in reversed(rules):
                self._e("-I", chain, "1", *spec, "-j", "ACCEPT")

    def _rules(self, ifname, profile, isolate, ports=()):
        r = [("MB-IN", "-i", ifname, "-p", BEACON_ETHERTYPE, "-j", "DROP"),
             ("MB-FWD", "-i", ifname, "-p", BEACON_ETHERTYPE, "-j", "DROP"),
             ("MB-FWD", "-o", ifname, "-p", BEACON_ETHERTYPE, "-j", "DROP"),
             ("MB-OUT", "-o", ifname, "-p", BEACON_ETHERTYPE, "-j", "DROP")]
        if isolate:
            # Fallback isolation: nothing from this port to another pseudo-wire.
            r.append(("MB-FWD", "-i", ifname, "-o", "mb+", "-j", "DROP"))
        if profile:
            chain = self.profile_chain(profile, ports)
            r += [("MB-IN", "-i", ifname, "-j", chain), ("MB-FWD", "-i", ifname, "-j", chain)]
        return r

    def add_port(self, ifname, profile=None, isolate=False, ports=()):
        _check(ifname)
        self.remove_port(ifname)    # a retry must not stack duplicates
        for chain, *spec in self._rules(ifname, profile, isolate, ports):
            self._e("-A", chain, *spec)

    def _listing(self):
        """(chain, rule argv) of every rule in our chains, from `ebtables -L`.

        ebtables-nft ignores --Lx, so parse the plain listing both print.
        """
        chain = None
        p = self._e("-L", check=False)
        for line in p.stdout.splitlines():
            if line.startswith("Bridge chain: "):
                chain = line[len("Bridge chain: "):].split(",")[0]
            elif line.strip() and chain and chain.startswith("MB-") and \
                    not line.startswith("Bridge "):
                yield chain, line.split()

    def remove_port(self, ifname):
        _check(ifname)
        for chain, parts in list(self._listing()):
            if ifname in (_after(parts, "-i"), _after(parts, "-o")):
                self._e("-D", chain, *parts, check=False)

    def ports(self):
        return {_after(parts, "-o") for chain, parts in self._listing()
                if chain == "MB-OUT"} - {None}


def _after(parts, flag):
    try:
        return parts[parts.index(flag) + 1]
    except (ValueError, IndexError):
        return None


def probe(prefer=None):
    """The filter backend present here: nft first (OpenWrt 22.03+), else ebtables."""
    order = [prefer] if prefer else ["nft", "ebtables"]
    for name in order:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
        if path:
            return Nft(path) if name == "nft" else Ebtables(path)
    return None
