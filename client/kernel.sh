# microbroker-client's kernel side: the `ip` calls that build and remove
# a lease's tunnel (L2TPv3, ip6gretap, ip6tnl), the 0xfc00 beacon filter
# (nft or ebtables), bridge ports and addresses.  Sourced by
# microbroker-client and, for its probes (can_build), by the netifd proto
# handler; installed as /usr/lib/microbroker-client/kernel.sh.
#
# The lease comes in S_* and the interface in IF; errors leave LAST_ERR.
# From the includer: warn, cleaned, is_num, is_u32, now, WORK (a private
# directory) (microbroker-client has them all; the handler calls only
# path_of, ip, kind_layer, can_build and cannot_build, which need none).
#
# Every process costs a router with a slow CPU about as much as an HTTP
# request: functions on the lease and renew paths hand back their result
# in a variable (named in their comment) rather than by $(...), and what
# `ip` prints is read from a file in $WORK, not through a pipe.

# path_of NAME: NAME as found on $PATH, in PATH_FOUND.  A BusyBox built
# with "prefer applets" would otherwise run its own `ip` (no l2tp) or
# `wget` instead of ip-full's or uclient-fetch.
path_of() {
	local d IFS=:
	PATH_FOUND=
	for d in $PATH; do
		[ -f "${d:-.}/$1" ] && [ -x "${d:-.}/$1" ] && {
			PATH_FOUND=${d:-.}/$1
			return 0
		}
	done
	return 1
}

NL='
'
IP=
ip_find() {	# IP: the path of `ip`
	[ -n "$IP" ] && return 0
	path_of ip && IP=$PATH_FOUND
}

ip() {
	ip_find || {
		echo "ip: not found" >&2
		return 127
	}
	"$IP" "$@"
}

# ip_batch [OPTIONS]: the `ip` commands on stdin in one process (iproute2's
# -batch, ip/ip.c batch()), which stops at the first that fails: then
# IP_ERR is what it said and IP_LINE the number of that line.  Only for
# values checked to be one word each (batch lines are split on blanks).
ip_batch() {
	IP_LINE=
	ip_find || { IP_ERR="ip: not found"; return 127; }
	IP_ERR=$("$IP" "$@" -batch - 2>&1 >/dev/null) && return 0
	case "$IP_ERR" in
	*"Command failed -:"*)
		IP_LINE=${IP_ERR##*Command failed -:}
		IP_LINE=${IP_LINE%%[!0-9]*}
		IP_ERR=${IP_ERR%Command failed -:*}
		IP_ERR=${IP_ERR%"$NL"} ;;
	esac
	return 1
}

# ip_show ARGS...: what `ip ARGS` prints, in $WORK/ip (read it with
# `read`, in this shell); 1 if it failed.
ip_show() {
	ip "$@" >"$WORK/ip" 2>/dev/null
}

kind_layer() {	# LAYER 2: Ethernet (bridged or routed by us), 3: routed by the exit
	case "$1" in
	l2tpv3|ip6gretap) LAYER=2 ;;
	ip6tnl) LAYER=3 ;;
	*) LAYER=; return 1 ;;
	esac
}

# can_build KIND: does this router's `ip` know how to build KIND?  ip-full
# has `ip l2tp`; ip-full and ip-tiny know the ip6gretap and ip6tnl link
# types, BusyBox's ip applet neither.  Whether the kernel module is there
# shows when the link is added (link_add).  Each probe runs once.
CAN_L2TP=
LINK_TYPES=	# what `ip link help` says, with its TYPE list
can_build() {
	case "$1" in
	l2tpv3)
		if [ -z "$CAN_L2TP" ]; then
			CAN_L2TP=no
			ip_find && case "$("$IP" l2tp help 2>&1)" in
				*"l2tp add tunnel"*) CAN_L2TP=yes ;;
			esac
		fi
		[ "$CAN_L2TP" = yes ] ;;
	ip6gretap|ip6tnl)
		[ -n "$LINK_TYPES" ] || ! ip_find ||
			LINK_TYPES="$("$IP" link help 2>&1) "
		case "$LINK_TYPES" in *"$1"[!a-z0-9_]*) return 0 ;; esac
		return 1 ;;
	*) return 1 ;;
	esac
}

cannot_build() {	# cannot_build KIND: what to install for KIND
	case "$1" in
	l2tpv3) echo "\`ip l2tp\` is missing: install ip-full (opkg install ip-full); BusyBox ip and ip-tiny have no l2tp" ;;
	*) echo "this \`ip\` cannot build $1 links: install ip-full or ip-tiny (opkg install ip-tiny); BusyBox's ip applet has no $1" ;;
	esac
}

# rand16: RAND, 1..65535, from the kernel's random uuid (a file `read`
# takes in: no process), else hexdump.
rand16() {
	local u n=
	if read -r u </proc/sys/kernel/random/uuid 2>/dev/null; then
		u=${u%%-*}
		u=${u#????}
		case "$u" in *[!0-9a-f]*) u= ;; ????) ;; *) u= ;; esac
		[ -z "$u" ] || n=$((0x$u))
	fi
	is_num "$n" || n=$(hexdump -n 2 -e '/2 "%u"' /dev/urandom 2>/dev/null)
	is_num "$n" || { now; n=$(( ($$ * 7919 + NOW + ${RSEED:=0}) % 65536 )); }
	RSEED=$((${RSEED:-0} + 4099))
	RAND=$((n % 65535 + 1))
}

# probe_lease: one `ip` for what a new lease asks this kernel first, at
# start-up: its L2TP tunnels and sessions (choose_ids) and what has our
# interface's name (teardown_local), in $WORK/probe.  Without -force ip
# stops at the first line that fails (ip.c, "Command failed -:N"): lines
# 1 and 2 answered say this `ip` has l2tp (CAN_L2TP); line 3 failing is
# our name being free.  Else can_build asks `ip l2tp help`, which knows
# without the kernel (ipl2tp.c exits when the l2tp family is missing;
# ip-tiny and BusyBox's ip have no l2tp).  The answers stand until the
# first nap (PROBED_IDS, PROBED_NAME): another client can take an id
# between any listing and our build, which lease_from handles.
probe_lease() {
	local line rc=0 gone=
	PROBED_IDS= PROBED_NAME=
	ip_find || return 1
	"$IP" -d -batch - >"$WORK/probe" 2>"$WORK/probe.err" <<EOF || rc=1
l2tp show tunnel
l2tp show session
link show dev $IF
EOF
	if [ $rc = 1 ]; then
		while IFS= read -r line; do
			case "$line" in
			"Device \"$IF\" does not exist.") gone=1 ;;
			"Command failed -:3") rc=3 ;;
			"Command failed -:"*) rc=1 ;;
			esac
		done <"$WORK/probe.err"
		[ $rc = 3 ] || return 1
	fi
	CAN_L2TP=yes
	PROBED_IDS=1
	[ $rc = 0 ] || [ -n "$gone" ] && PROBED_NAME=1
	return 0
}

# choose_ids [KIND]: our tunnel and session id (MY_TID, MY_SID), random and
# free here; for ip6gretap MY_TID is the key we propose to receive with.
choose_ids() {
	local used= n tries=0 line out="$WORK/ip"
	case "$1" in
	ip6gretap|ip6tnl) ;;
	*)
		if [ -n "$PROBED_IDS" ]; then
			out=$WORK/probe
			PROBED_IDS=
		else
			ip_show -force -batch - <<EOF
l2tp show tunnel
l2tp show session
EOF
		fi
		while read -r line; do
			case "$line" in
			"Tunnel "*,*) used="$used ${line%%,*} " ;;
			"Session "*" in "*) used="$used ${line%% in *} " ;;
			esac
		done <"$out" ;;
	esac
	while :; do
		rand16
		n=$RAND
		case "$used" in
		*" Tunnel $n "*|*" Session $n "*) ;;
		*) break ;;
		esac
		tries=$((tries + 1))
		[ $tries -lt 50 ] || break
	done
	MY_TID=$n
	MY_SID=$n
}

# sessions_read IFNAME [FILE]: from `ip l2tp show session` in FILE
# ($WORK/ip), the tunnel whose session is IFNAME, in TUNNEL_OF ('' if
# none).
sessions_read() {
	local t= line
	TUNNEL_OF=
	while read -r line; do
		case "$line" in
		"Session "*" in tunnel "*) t=${line##* } ;;
		"interface name: $1") is_u32 "$t" && TUNNEL_OF=$t; return 0 ;;
		esac
	done <"${2:-$WORK/ip}"
}

tunnel_of() {	# tunnel_of IFNAME: the tunnel whose session is IFNAME, in TUNNEL_OF
	TUNNEL_OF=
	ip_show l2tp show session || return 0
	sessions_read "$1"
}

has_link() {
	ip link show dev "$1" >/dev/null 2>&1
}

# link_read IFNAME [FILE]: from `ip -d link show` in FILE ($WORK/ip): LINK_KIND
# (ip6gretap, ip6tnl or '', the first word of a line) and LINK_REMOTE
# (the word after "remote"), LINK_FOUND 1 if IFNAME's line is there.
link_read() {
	local w rest
	LINK_KIND= LINK_REMOTE= LINK_FOUND=
	while read -r w rest; do
		case "$w" in
		[0-9]*:) case "$rest" in "$1: "*|"$1@"*) LINK_FOUND=1 ;; esac ;;
		ip6gretap|ip6tnl) [ -n "$LINK_KIND" ] || LINK_KIND=$w ;;
		esac
		case " $rest " in
		*" remote "*) rest=${rest#*remote }; LINK_REMOTE=${rest%% *} ;;
		esac
	done <"${2:-$WORK/ip}"
}

link_kind() {	# link_kind IFNAME: LINK_KIND, '' if none or not a tunnel
	LINK_KIND=
	ip_show -d link show dev "$1" && link_read "$1"
}

# tunnel_up: is the tunnel of S_* here, with our interface?  One `ip`:
# L2TPv3, the link and a session of that name in our tunnel (which then
# exists); the others, the link of our kind to our remote.
tunnel_up() {
	case "$S_KIND" in
	l2tpv3)
		ip_show -force -batch - <<EOF
link show dev $IF
l2tp show session
EOF
		link_read "$IF"
		[ -n "$LINK_FOUND" ] || return 1
		sessions_read "$IF"
		[ "$TUNNEL_OF" = "$S_TUNNEL_ID" ] ;;
	ip6gretap|ip6tnl)
		link_kind "$IF" || return 1
		[ "$LINK_KIND" = "$S_KIND" ] && [ "$LINK_REMOTE" = "$S_REMOTE" ] ;;
	*) return 1 ;;
	esac
}

pause() {	# a short wait: L2TP deletes finish on a kernel workqueue
	usleep 100000 2>/dev/null || sleep 1
}

# --- 0xfc00 beacon filter: cjdns must not find peers through the tunnel.
# One nft table (bridge family) or one ebtables chain per interface, so
# that removing ours never touches anybody else's rules.

nft_add() {
	local t="mbclient-$IF"
	nft -f - <<EOF
table bridge $t
delete table bridge $t
table bridge $t {
	chain input {
		type filter hook input priority 0; policy accept;
		iifname "$IF" ether type 0xfc00 drop
	}
	chain forward {
		type filter hook forward priority 0; policy accept;
		iifname "$IF" ether type 0xfc00 drop
		oifname "$IF" ether type 0xfc00 drop
	}
	chain output {
		type filter hook output priority 0; policy accept;
		oifname "$IF" ether type 0xfc00 drop
	}
}
EOF
}

nft_del() {
	nft delete table bridge "mbclient-$IF" 2>/dev/null
}

eb_add() {
	local c="mbclient-$IF"
	eb_del
	ebtables -N "$c" -P RETURN &&
	ebtables -A "$c" -p 0xfc00 -j DROP &&
	ebtables -I INPUT -i "$IF" -j "$c" &&
	ebtables -I FORWARD -i "$IF" -j "$c" &&
	ebtables -I FORWARD -o "$IF" -j "$c" &&
	ebtables -I OUTPUT -o "$IF" -j "$c" && return 0
	eb_del
	return 1
}

eb_del() {
	local c="mbclient-$IF" rule n
	for rule in "INPUT -i" "FORWARD -i" "FORWARD -o" "OUTPUT -o"; do
		n=0
		# $rule is one of ours above: chain and flag, split on purpose
		while [ $n -lt 10 ] && ebtables -D $rule "$IF" -j "$c" 2>/dev/null; do
			n=$((n + 1))
		done
	done
	ebtables -F "$c" 2>/dev/null
	ebtables -X "$c" 2>/dev/null
	return 0
}

filters_add() {
	S_FILTER=
	case "$FILTER" in
	none) return 0 ;;
	auto|nft)
		if command -v nft >/dev/null 2>&1 && nft_add 2>/dev/null; then
			S_FILTER=nft
			return 0
		fi
		if [ "$FILTER" = nft ]; then
			LAST_ERR="nft could not add the beacon filter (kmod-nft-bridge missing?)"
			return 1
		fi
		;;
	esac
	if command -v ebtables >/dev/null 2>&1 && eb_add 2>/dev/null; then
		S_FILTER=ebtables
		return 0
	fi
	if [ "$FILTER" = ebtables ]; then
		LAST_ERR="ebtables could not add the beacon filter"
		return 1
	fi
	warn "no 0xfc00 beacon filter on $IF: install kmod-nft-bridge (nft) or ebtables"
	return 0
}

# filters_del nft|ebtables|any|'': remove the beacon filter we installed
# (any: whichever is there, for an interface found without its state).
filters_del() {
	case "$1" in
	nft|any) command -v nft >/dev/null 2>&1 && nft_del ;;
	esac
	case "$1" in
	ebtables|any) command -v ebtables >/dev/null 2>&1 && eb_del ;;
	esac
	return 0
}

# bridge_join: a netifd bridge (@NET) takes our link through ubus (a
# bridge by name is a line of ether_lines).
bridge_join() {
	case "$S_BRIDGE" in
	@*)
		ubus call "network.interface.${S_BRIDGE#@}" add_device \
			"{ \"name\": \"$IF\" }" >/dev/null || {
			LAST_ERR="netifd did not add $IF to interface ${S_BRIDGE#@}"
			return 1
		} ;;
	esac
	return 0
}

bridge_leave() {
	case "$S_BRIDGE" in
	@*) ubus call "network.interface.${S_BRIDGE#@}" remove_device \
		"{ \"name\": \"$IF\" }" >/dev/null 2>&1 ;;
	esac
	return 0
}

# line_of N TEXT: line N of TEXT (the first is 1), in LINE.
line_of() {
	local n=1 rest="$2$NL"
	LINE=
	while [ -n "$rest" ]; do
		[ "$n" != "$1" ] || { LINE=${rest%%"$NL"*}; return 0; }
		rest=${rest#*"$NL"}
		n=$((n + 1))
	done
	return 1
}

# batch_run: the `ip` commands in CMDS (one a line, no empty lines) in one
# process; if one fails, LAST_ERR says which and why, FAILED is its line
# and IP_LINE its number (none when `ip` gave up on a bad argument:
# invarg() exits at once).
batch_run() {
	FAILED=
	ip_batch <<EOF && return 0
$CMDS
EOF
	[ -z "$IP_LINE" ] || ! line_of "$IP_LINE" "$CMDS" || FAILED=$LINE
	cleaned "$IP_ERR"
	LAST_ERR="ip ${FAILED:-"-batch"} failed${CLEAN:+: $CLEAN}"
	# iplink.c: 'argument "BRIDGE" is wrong: Device does not exist'
	case "$S_BRIDGE:$IP_ERR" in
	@*) ;;
	?*:*"\"$S_BRIDGE\""*"not exist"*) LAST_ERR="no bridge $S_BRIDGE here" ;;
	esac
	return 1
}

# build: the client end of the lease in S_*, per kind.
build() {
	case "$S_KIND" in
	l2tpv3) build_l2tp ;;
	ip6gretap) build_gre ;;
	ip6tnl) build_ip6tnl ;;
	*) LAST_ERR="cannot build kind $S_KIND"; return 1 ;;
	esac
}

# build_l2tp: the beacon filter, then tunnel, session and the Ethernet
# steps in one `ip` (ether_lines, ether_up).
build_l2tp() {
	local udp=
	can_build l2tpv3 || {
		LAST_ERR=$(cannot_build l2tpv3)
		return 1
	}
	filters_add || return 1
	# two keywords and two checked port numbers
	[ "$S_ENCAP" != udp ] || udp=" udp_sport $S_UDP_SPORT udp_dport $S_UDP_DPORT"
	CMDS="l2tp add tunnel tunnel_id $S_TUNNEL_ID peer_tunnel_id $S_PEER_TUNNEL_ID encap $S_ENCAP local $S_LOCAL remote $S_REMOTE$udp
l2tp add session name $IF tunnel_id $S_TUNNEL_ID session_id $S_SESSION_ID peer_session_id $S_PEER_SESSION_ID"
	ether_lines
	if batch_run; then
		ether_up
		return
	fi
	case "$IP_LINE:$IP_ERR" in
	1:*"File exists"*) ID_TAKEN="tunnel id"
		LAST_ERR="ip $FAILED: tunnel $S_TUNNEL_ID exists here" ;;
	1:*) LAST_ERR="$LAST_ERR (kmod-l2tp-ip loaded? is $S_LOCAL an address of this host?)" ;;
	# the name is ours and free (teardown_local): the session id
	2:*"File exists"*) ID_TAKEN="session id" ;;
	esac
	return 1
}

# build_gre: Ethernet over GRE over IPv6, keyed both ways.
build_gre() {
	can_build ip6gretap || {
		LAST_ERR=$(cannot_build ip6gretap)
		return 1
	}
	filters_add || return 1
	CMDS="link add $IF type ip6gretap local $S_LOCAL remote $S_REMOTE ikey $S_IKEY okey $S_OKEY encaplimit none"
	ether_lines
	link_add ip6gretap kmod-gre6 || return 1
	ether_up
}

# build_ip6tnl: IPv4 and IPv6 in IPv6, routed: no MAC, bridge or filter;
# the link, its MTU, up and its addresses in one `ip`.
build_ip6tnl() {
	[ -z "$S_BRIDGE" ] || {
		LAST_ERR="ip6tnl is routed, -b does not apply"
		return 1
	}
	S_FILTER=
	CMDS="link add $IF type ip6tnl mode any local $S_LOCAL remote $S_REMOTE encaplimit none
link set dev $IF mtu $S_MTU
link set dev $IF up"
	address_lines
	link_add ip6tnl kmod-ip6-tunnel
}

# link_add KIND KMOD: CMDS, whose first line is `link add $IF type KIND
# ...`; when the kernel does not know KIND, LAST_ERR names the package
# that brings it.
link_add() {
	local kind="$1" kmod="$2" err
	can_build "$kind" || {
		LAST_ERR=$(cannot_build "$kind")
		return 1
	}
	batch_run && return 0
	[ "$IP_LINE" = 1 ] || return 1
	err=$CLEAN
	# our name is free (teardown_local): a link with these keys is there
	case "$err" in *"File exists"*) [ "$kind" != ip6gretap ] || ID_TAKEN=key ;; esac
	case "$err" in
	*"nknown device type"*|*"not supported"*)
		LAST_ERR="the kernel cannot build $kind links ($err): install $kmod (opkg install $kmod)" ;;
	*)
		LAST_ERR="ip $FAILED failed${err:+: $err} ($kmod installed? is $S_LOCAL an address of this host?)" ;;
	esac
	return 1
}

# ether_lines: lines of CMDS for a new layer 2 link: MTU, MAC, bridge, up
# and addresses.  The beacon filter names the interface, so it is in
# place before (filters_add); a bridge of netifd's (@NET) takes the link
# before it goes up (ether_up).
ether_lines() {
	CMDS="$CMDS${NL}link set dev $IF mtu $S_MTU"
	[ -z "$S_MAC" ] || CMDS="$CMDS${NL}link set dev $IF address $S_MAC"
	case "$S_BRIDGE" in
	@*) return 0 ;;
	?*) CMDS="$CMDS${NL}link set dev $IF master $S_BRIDGE" ;;
	esac
	CMDS="$CMDS${NL}link set dev $IF up"
	address_lines
}

# ether_up: into a bridge of netifd's (@NET) through ubus, then up.
ether_up() {
	case "$S_BRIDGE" in @*) ;; *) return 0 ;; esac
	bridge_join || return 1
	CMDS="link set dev $IF up"
	batch_run
}

# address_lines: lines of CMDS for our addresses; not when bridged (the
# bridge's own config decides) nor under netifd (netifd_update tells it).
# Layer 2: the leased IPv4 address on our end with a host route to its
# gateway; the prefix needs nothing here: the exit routes it to our
# link-local address.  Layer 3: our IPv4 and IPv6 addresses on the link.
# Default routes stay the operator's choice (-D, layer 3 only).  `ip`
# takes the family from each address.
address_lines() {
	[ -z "$S_BRIDGE" ] && [ -z "$NETIFD" ] || return 0
	if [ "$S_KIND" != ip6tnl ]; then
		[ -n "$S_IPV4" ] || return 0
		CMDS="$CMDS${NL}addr add $S_IPV4/32 dev $IF${NL}route replace $S_IPV4_GATEWAY/32 dev $IF"
		return 0
	fi
	[ -z "$S_IPV4" ] || CMDS="$CMDS${NL}addr add $S_IPV4/32 dev $IF"
	[ -z "$S_IPV6" ] || CMDS="$CMDS${NL}addr add $S_IPV6/128 dev $IF"
	[ -n "$DEFROUTE" ] || return 0
	# Two halves rather than default: more specific than the router's own
	# default routes, which stay for when the tunnel is gone.
	[ -z "$S_IPV4" ] ||
		CMDS="$CMDS${NL}route replace 0.0.0.0/1 dev $IF${NL}route replace 128.0.0.0/1 dev $IF"
	[ -z "$S_IPV6$S_PREFIX" ] ||
		CMDS="$CMDS${NL}route replace ::/1 dev $IF${NL}route replace 8000::/1 dev $IF"
	return 0
}

# teardown_local [FILTER [nowait]]: remove our end (bridge port, the beacon
# filter FILTER (default: the one in S_FILTER), tunnel or link), whatever
# of it exists; found by the state or by the interface name.  Addresses
# and routes go with the link.  Unless nowait, wait until the interface
# is gone (an L2TP session goes on a kernel workqueue), so that it can be
# built again under its name.
teardown_local() {
	local t= kind= n=0
	[ "$NOTIFIED" != 1 ] || NOTIFIED=
	bridge_leave
	filters_del "${1-$S_FILTER}"
	case "$S_KIND" in
	l2tpv3) t=$S_TUNNEL_ID ;;
	ip6gretap|ip6tnl) has_link "$IF" && kind=$S_KIND ;;
	*)
		# no link of that name: nothing of ours is here
		if [ -n "$PROBED_NAME" ]; then
			PROBED_NAME=
			link_read "$IF" "$WORK/probe"
			[ -n "$LINK_FOUND" ] || return 0
			kind=$LINK_KIND
			[ -n "$kind" ] || { sessions_read "$IF" "$WORK/probe"; t=$TUNNEL_OF; }
		else
			link_kind "$IF" || return 0
			kind=$LINK_KIND
			[ -n "$kind" ] || { tunnel_of "$IF"; t=$TUNNEL_OF; }
		fi ;;
	esac
	[ -z "$t" ] || ip l2tp del tunnel tunnel_id "$t" >/dev/null 2>&1
	[ -z "$kind" ] || ip link del "$IF" >/dev/null 2>&1
	[ "$2" != nowait ] || return 0
	while has_link "$IF"; do
		n=$((n + 1))
		[ $n -le 50 ] || {
			warn "$IF is still there"
			return 1
		}
		pause
	done
	return 0
}
