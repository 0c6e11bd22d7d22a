"""Filter rules for tunnel ports: nftables or ebtables.

Bridged (layer 2) ports get bridge-family rules; routed (ip6tnl) ports get
the same isolation and restriction profiles in an inet-family table, which
only nft can do.

Everything lives in a table (nft) or chains (ebtables) of our own, so the
operator's rules are never touched. Beacon drop and fallback isolation match
every pseudo-wire by the interface-name prefix (`mb*`), so they cost nothing
per lease; only a restricted lease adds (and removes) one element or rule. Commands are argv lists (never a shell);
interface and profile names are checked before they reach an argument.
"""

import errno
import posix
import zlib

from . import nftables
from .posixfs import which
from .names import check_ifname, check_prefix

TABLE = "microbroker"
BEACON_ETHERTYPE = "0xfc00"   # cjdns beacons never cross a pseudo-wire
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
# (first character, the others, most characters); interface names and
# prefixes follow names.py, like every layer.
_PROFILE = (_ALNUM, _ALNUM, 32)                 # a service name


class FilterError(RuntimeError):
    pass


def _check(name, rule):
    first, rest, most = rule
    if not isinstance(name, str) or not 0 < len(name) <= most or name[0] not in first or \
            any(c not in rest for c in name[1:]):
        raise ValueError("refusing name %r in a filter rule" % (name,))
    return name


def _ports(ports):
    out = sorted({int(p) for p in ports})
    if any(not 0 < p < 65536 for p in out):
        raise ValueError("bad port in %r" % (ports,))
    return out


def _run(argv, stdin=None, check=True):
    import subprocess       # not on a lease's path: elements go by netlink
    try:
        p = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=30)
    except OSError as e:
        raise FilterError("%s: %s" % (argv[0], e.strerror))
    if check and p.returncode != 0:
        raise FilterError("%s failed: %s" % (" ".join(argv[:3]), p.stderr.strip()))
    return p


def _signed(lines):
    """The script with the last rule of every chain it flushes commented
    with a checksum of that chain's declaration and rules, and what a
    ruleset written by it holds: {(family, chain): (rules, comment)}."""
    rules, decl, flushed = {}, {}, []
    for i, line in enumerate(lines):
        w = line.split(" ", 5)
        if line.startswith("flush chain "):
            flushed.append((w[2], w[4]))
        elif line.startswith("add rule "):
            rules.setdefault((w[2], w[4]), []).append(i)
        elif line.startswith("add chain "):
            decl[(w[2], w[4])] = line
    out, want = list(lines), {}
    for key in flushed:
        idx = rules.get(key, [])
        text = "\n".join([decl.get(key, "")] + [lines[i] for i in idx])
        tag = "microbroker %08x" % zlib.crc32(text.encode())
        if idx:
            out[idx[-1]] += ' comment "%s"' % tag
        want[key] = (len(idx), tag.encode() if idx else None)
    return out, want


def _nl_error(e, what):
    return FilterError("%s: %s" % (what, posix.strerror(e.errno) if e.errno else e))


class Nft:
    """nftables bridge family: static prefix rules and a verdict map ifname -> profile."""

    name = "nft"
    FAMILIES = ("bridge", "inet")

    def __init__(self, nft="nft"):
        self.nft = nft

    def _apply(self, script, check=True):
        return _run([self.nft, "-f", "-"], script, check)

    def _ensure(self, lines):
        """Run the script unless the ruleset already holds what it writes:
        a rule dump per family by netlink, not an nft process per lease."""
        lines, want = _signed(lines)
        if not self._holds(want):
            self._apply("\n".join(lines) + "\n")

    @staticmethod
    def _holds(want):
        """Does every chain in want {(family, chain): (rules, comment)} have
        that many rules, the last with that comment?"""
        try:
            with nftables.Nftables() as n:
                for fam in sorted({f for f, _c in want}):
                    have = {}
                    for chain, udata in n.rules(fam, TABLE):
                        have.setdefault(chain, []).append(udata)
                    for (f, chain), (count, tag) in want.items():
                        got = have.get(chain, []) if f == fam else None
                        if got is not None and (len(got) != count or
                                                tag is not None and tag not in got[-1]):
                            return False
        except OSError:
            return False        # nft itself will say what is wrong
        return True

    def ensure(self, prefix, profiles, isolate=False):
        """Our table, its chains and every profile chain, as this version
        writes them, in one call.

        isolate adds the fallback port isolation for kernels without
        IFLA_BRPORT_ISOLATED.
        """
        pw = '"%s*"' % check_prefix(prefix)
        t = "bridge " + TABLE
        # `add` of what exists is a no-op and the map keeps its elements;
        # the base chains are flushed and refilled in the same transaction,
        # so no packet sees them empty, a table of an older version gets
        # today's rules, and two processes at once cannot stack duplicates.
        lines = [
            "add table %s" % t,
            "add map %s restrict { type ifname : verdict; }" % t,
            "add chain %s input { type filter hook input priority -200; }" % t,
            "add chain %s forward { type filter hook forward priority -200; }" % t,
            "add chain %s output { type filter hook output priority -200; }" % t,
            "add chain %s isolate" % t,
            "flush chain %s input" % t,
            "flush chain %s forward" % t,
            "flush chain %s output" % t,
            "add rule %s input iifname %s ether type %s drop" % (t, pw, BEACON_ETHERTYPE),
            "add rule %s input iifname vmap @restrict" % t,
            "add rule %s forward iifname %s ether type %s drop" % (t, pw, BEACON_ETHERTYPE),
            "add rule %s forward oifname %s ether type %s drop" % (t, pw, BEACON_ETHERTYPE),
            "add rule %s forward jump isolate" % t,
            "add rule %s forward iifname vmap @restrict" % t,
            "add rule %s output oifname %s ether type %s drop" % (t, pw, BEACON_ETHERTYPE),
        ]
        lines += ["flush chain bridge %s isolate" % TABLE]
        if isolate:
            lines += ["add rule bridge %s isolate iifname %s oifname %s drop" % (TABLE, pw, pw)]
        for name, ports in sorted(profiles.items()):
            chain = "r_" + _check(name, _PROFILE)
            tcp = ", ".join(str(p) for p in [53] + [p for p in _ports(ports) if p != 53])
            rule = "add rule bridge %s %s " % (TABLE, chain)
            lines += [
                "add chain bridge %s %s" % (TABLE, chain),
                "flush chain bridge %s %s" % (TABLE, chain),
                rule + "ether type arp accept",
                # ICMP and ICMPv6: neighbour discovery, RA and path MTU need them.
                rule + "ip protocol icmp accept",
                rule + "ip6 nexthdr ipv6-icmp accept",
                rule + "ip protocol udp udp dport { 53, 67 } accept",
                rule + "ip6 nexthdr udp udp dport { 53, 547 } accept",
                rule + "ip protocol tcp tcp dport { %s } accept" % tcp,
                rule + "ip6 nexthdr tcp tcp dport { %s } accept" % tcp,
                rule + "drop",
            ]
        self._ensure(lines)

    @staticmethod
    def _inet_table():
        """Lines for the inet table and its base chains (as in ensure). It
        holds what the exit routes: routed tunnels' source check and
        profiles, and isolation between client sides."""
        t = "inet " + TABLE
        return [
            "add table %s" % t,
            "add map %s restrict { type ifname : verdict; }" % t,
            "add chain %s input { type filter hook input priority -10; }" % t,
            "add chain %s forward { type filter hook forward priority -10; }" % t,
            "add chain %s isolate" % t,
            "flush chain %s input" % t,
            "flush chain %s forward" % t,
            "add rule %s input iifname vmap @restrict" % t,
            "add rule %s forward jump isolate" % t,
            "add rule %s forward iifname vmap @restrict" % t,
        ]

    def ensure_routed(self, prefix, profiles):
        """Routed tunnels: a source check; profiles as for bridged ports."""
        pw = '"%s*"' % check_prefix(prefix)
        t = "inet " + TABLE
        lines = self._inet_table() + [
            # A chain with a hook is idempotent to add: also for tables
            # made by an older version.
            "add chain %s spoof { type filter hook prerouting priority -150; }" % t,
            "flush chain %s spoof" % t,
            # The kernel routes a tunnel's leased addresses into it and does
            # not check the inner source (IPv6 has no rp_filter): without
            # this a client could send as another client or as the exit's
            # own cjdns address.
            "add rule %s spoof iifname %s fib saddr . iif oif missing drop" % (t, pw)]
        for name, ports in sorted(profiles.items()):
            chain = "r_" + _check(name, _PROFILE)
            tcp = ", ".join(str(p) for p in [53] + [p for p in _ports(ports) if p != 53])
            rule = "add rule %s %s " % (t, chain)
            lines += [
                "add chain %s %s" % (t, chain),
                "flush chain %s %s" % (t, chain),
                # No neighbour discovery on a point-to-point link, but path
                # MTU and errors still need ICMP.
                rule + "meta l4proto { icmp, ipv6-icmp } accept",
                rule + "udp dport 53 accept",
                rule + "tcp dport { %s } accept" % tcp,
                rule + "drop",
            ]
        self._ensure(lines)

    def ensure_isolation(self, sides):
        """Drop what the exit would route from one isolated client side to
        another, or back into the same: port isolation stops frames, not a
        client that sends to another's address through the exit as its
        gateway. A side is an isolated service's bridge, or `prefix*`
        for all routed tunnels."""
        t = "inet " + TABLE
        names = ['"%s*"' % check_prefix(s[:-1]) if s.endswith("*") else
                 '"%s"' % check_ifname(s) for s in sorted(sides)]
        lines = self._inet_table() + ["flush chain %s isolate" % t]
        lines += ["add rule %s isolate iifname %s oifname %s drop" % (t, a, b)
                  for a in names for b in names]
        self._ensure(lines)

    def add_port(self, ifname, profile, ports=(), family="bridge"):
        """Send a restricted port's traffic through its profile: one element
        of the restrict map, by netlink."""
        key = nftables.ifname_key(check_ifname(ifname))
        chain = "r_" + _check(profile, _PROFILE)
        fam = _family(family)
        try:
            with nftables.Nftables() as n:
                try:
                    n.add_elements(fam, TABLE, "restrict", {key: chain})
                except OSError as e:
                    if e.errno != errno.EEXIST:
                        raise
                    # Mapped to another profile (a changed config, a leftover):
                    # re-point it in one transaction.
                    n.replace_elements(fam, TABLE, "restrict", [key], {key: chain})
        except OSError as e:
            raise _nl_error(e, "nft add element %s %s restrict %s" % (fam, TABLE, ifname))

    def remove_port(self, ifname, family="bridge"):
        """Its element out of the restrict map; absent is fine."""
        key = nftables.ifname_key(check_ifname(ifname))
        try:
            with nftables.Nftables() as n:
                n.delete_elements(_family(family), TABLE, "restrict", [key])
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise _nl_error(e, "nft delete element %s %s restrict %s"
                                % (family, TABLE, ifname))

    def ports(self, family="bridge"):
        """Interfaces mapped to a profile."""
        return set(self._port_map(family))

    def _port_map(self, family, n=None, genid=None):
        """{ifname: profile} from the restrict map, {} if there is none."""
        fam = _family(family)
        try:
            if n is None:
                with nftables.Nftables() as n:
                    found = n.elements(fam, TABLE, "restrict")
            else:
                found = n.elements(fam, TABLE, "restrict", genid)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return {}
            raise _nl_error(e, "nft list map %s %s restrict" % (fam, TABLE))
        out = {}
        for key, chain in found.items():
            name = key.split(b"\0", 1)[0].decode(errors="replace")
            out[name] = chain[2:] if chain and chain.startswith("r_") else (chain or "")
        return out

    def sync_ports(self, want, family="bridge", keep=()):
        """Make the restrict map want {ifname: (profile, ports)}, leaving
        the names in keep as they are. Returns (changed, problems).

        Reconcile needs it: a `nft flush ruleset` takes the elements with
        it, and a lease whose links survived would go on unrestricted. One
        transaction, against the generation the map was read at (another
        process changing it in between makes the kernel refuse it, and we
        read again); if the kernel refuses it otherwise, one per element,
        so one bad entry does not keep the others open."""
        fam = _family(family)
        try:
            with nftables.Nftables() as n:
                for _try in range(3):
                    genid = n.genid()
                    try:
                        have = self._port_map(fam, n, genid)
                        return self._sync(n, fam, have, want, keep, genid)
                    except OSError as e:
                        if e.errno != errno.ERESTART:
                            raise
                raise FilterError("nft map %s %s restrict: changing under us" % (fam, TABLE))
        except FilterError:
            raise
        except OSError as e:
            raise _nl_error(e, "nft map %s %s restrict" % (fam, TABLE))

    def _sync(self, n, fam, have, want, keep, genid):
        problems, steps = [], {}
        for name in sorted(set(have) | set(want)):
            if name in keep or (name in want and have.get(name) == want[name][0]):
                continue
            try:
                key = nftables.ifname_key(check_ifname(name))
                add = {key: "r_" + _check(want[name][0], _PROFILE)} if name in want else {}
                steps[name] = ([key] if name in have else [], add)
            except ValueError as e:
                problems.append(str(e))
        if not steps:
            return [], problems
        delete = [k for d, _a in steps.values() for k in d]
        add = {k: c for _d, a in steps.values() for k, c in a.items()}
        try:
            n.replace_elements(fam, TABLE, "restrict", delete, add, genid)
            return sorted(steps), problems
        except OSError as e:
            if e.errno == errno.ERESTART:
                raise
        changed = []
        for name, (d, a) in steps.items():
            try:
                n.replace_elements(fam, TABLE, "restrict", d, a)
                changed.append(name)
            except OSError as e:
                problems.append("%s: %s" % (name, e.strerror))
        return changed, problems


class Ebtables:
    """ebtables: chains MB-IN, MB-FWD, MB-OUT jumped to from the builtin ones."""

    name = "ebtables"
    FAMILIES = ("bridge",)      # it sees bridged frames only
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

    @staticmethod
    def static_rules(prefix, isolate):
        pw = check_prefix(prefix) + "+"
        r = [("MB-IN", "-i", pw, "-p", BEACON_ETHERTYPE, "-j", "DROP"),
             ("MB-FWD", "-i", pw, "-p", BEACON_ETHERTYPE, "-j", "DROP"),
             ("MB-FWD", "-o", pw, "-p", BEACON_ETHERTYPE, "-j", "DROP"),
             ("MB-OUT", "-o", pw, "-p", BEACON_ETHERTYPE, "-j", "DROP")]
        if isolate:
            r.append(("MB-FWD", "-i", pw, "-o", pw, "-j", "DROP"))
        return r

    def _chains(self):
        """{chain: [entries, rule argv lists]} from one `ebtables -L`.

        ebtables-nft ignores --Lx, so parse the plain listing both print.
        """
        out, chain = {}, None
        for line in self._e("-L", check=False).stdout.splitlines():
            if line.startswith("Bridge chain: "):
                chain = line[len("Bridge chain: "):].split(",")[0]
                n = line.partition("entries: ")[2].split(",")[0].strip()
                out[chain] = [int(n) if n.isdigit() else -1, []]
            elif chain and line.strip() and not line.startswith("Bridge "):
                out[chain][1].append(line.split())
        return out

    def ensure(self, prefix, profiles, isolate=False):
        """Our chains in place; one listing call when nothing needs doing
        (a CGI process calls this on every lease)."""
        check_prefix(prefix)
        for name, ports in profiles.items():
            self.profile_chain(name, ports)
        have = self._chains()
        fresh = False
        for builtin, ours in self.CHAINS:
            if ours not in have:
                self._e("-N", ours, "-P", "RETURN")
                fresh = True
            if ["-j", ours] not in have.get(builtin, [0, []])[1]:
                self._e("-I", builtin, "-j", ours)
        static = self.static_rules(prefix, isolate)
        n = sum(have.get(c, [0])[0] for _, c in self.CHAINS)
        if fresh or n < len(static):
            for chain, *spec in static:
                if self._e("-C", chain, *spec, check=False).returncode != 0:
                    self._e("-A", chain, *spec)
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

    def ensure_routed(self, prefix, profiles):
        raise FilterError("ebtables filters only bridged frames: the source check, "
                          "isolation and restrictions of routed (ip6tnl) tunnels need nft")

    def ensure_isolation(self, sides):
        # What the exit routes between clients: ebtables cannot see it.
        pass

    def add_port(self, ifname, profile, ports=(), family="bridge"):
        check_ifname(ifname)
        _family(family, ("bridge",))
        chain = self.profile_chain(profile, ports)
        self.remove_port(ifname)    # a retry must not stack duplicates
        self._e("-A", "MB-IN", "-i", ifname, "-j", chain)
        self._e("-A", "MB-FWD", "-i", ifname, "-j", chain)

    def remove_port(self, ifname, family="bridge"):
        check_ifname(ifname)
        if family != "bridge":
            return
        for chain in ("MB-IN", "MB-FWD"):
            for parts in self._chains().get(chain, [0, []])[1]:
                if _after(parts, "-i") == ifname:
                    self._e("-D", chain, *parts, check=False)

    def ports(self, family="bridge"):
        return set(self._rules(family))

    def _rules(self, family, chains=None):
        """{ifname: ([profile chains in MB-IN], [in MB-FWD])}, in rule order."""
        if family != "bridge":
            return {}
        chains = self._chains() if chains is None else chains
        out = {}
        for k, chain in enumerate(("MB-IN", "MB-FWD")):
            for parts in chains.get(chain, [0, []])[1]:
                n, target = _after(parts, "-i"), _after(parts, "-j", "")
                if n and target.startswith("MB-R-"):
                    out.setdefault(n, ([], []))[k].append(target)
        return out

    def sync_ports(self, want, family="bridge", keep=()):
        """The port rules want {ifname: (profile, ports)}, leaving the
        names in keep as they are. Returns (changed, problems)."""
        _family(family, ("bridge",))
        have = self._rules(family)
        changed, problems = [], []
        for n in sorted(set(have) | set(want)):
            if n in keep:
                continue
            try:
                if n in want:
                    chain = self.profile_chain(*want[n])
                    # Exactly one rule in each chain: ebtables obeys the
                    # first of duplicates, which may be a stale one.
                    if have.get(n) == ([chain], [chain]):
                        continue
                    self.add_port(n, *want[n])      # removes what was there first
                else:
                    self.remove_port(n)
                changed.append(n)
            except (ValueError, FilterError) as e:
                problems.append("%s: %s" % (n, e))
        return changed, problems


def _family(family, allowed=("bridge", "inet")):
    if family not in allowed:
        raise ValueError("no filter family %r here" % (family,))
    return family


def _after(parts, flag, default=None):
    try:
        return parts[parts.index(flag) + 1]
    except (ValueError, IndexError):
        return default


def probe(prefer=None):
    """The filter backend present here: nft first (OpenWrt 22.03+), else ebtables."""
    order = [prefer] if prefer else ["nft", "ebtables"]
    for name in order:
        path = which(name)
        if path:
            return Nft(path) if name == "nft" else Ebtables(path)
    return None
