# microbroker-client's kernel side: the `ip` calls that build and remove
# a lease's tunnel (L2TPv3, ip6gretap, ip6tnl), the 0xfc00 beacon filter
# (nft or ebtables), bridge ports and addresses.  Sourced by
# microbroker-client and, for its probes (can_build), by the netifd proto
# handler; installed as /usr/lib/microbroker-client/kernel.sh.
#
# The lease comes in S_* and the interface in IF; errors leave LAST_ERR.
# From the includer: warn, clean, is_num, is_u32, now (microbroker-client
# has them all; the handler calls only path_of, ip, kind_layer, can_build
# and cannot_build, which need none).
# path_of NAME: NAME as found on $PATH.  A BusyBox built with "prefer
# applets" would otherwise run its own `ip` (no l2tp) or `wget` instead of
# ip-full's or uclient-fetch.
path_of() {
	local d IFS=:
	for d in $PATH; do
		[ -f "${d:-.}/$1" ] && [ -x "${d:-.}/$1" ] && {
			echo "${d:-.}/$1"
			return 0
		}
	done
	return 1
}

IP=
ip() {
	[ -n "$IP" ] || IP=$(path_of ip) || {
		echo "ip: not found" >&2
		return 127
	}
	"$IP" "$@"
}


kind_layer() {	# 2: Ethernet (bridged or routed by us), 3: routed by the exit
	case "$1" in
	l2tpv3|ip6gretap) echo 2 ;;
	ip6tnl) echo 3 ;;
	*) return 1 ;;
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
			ip l2tp help 2>&1 | grep -q 'l2tp add tunnel' && CAN_L2TP=yes
		fi
		[ "$CAN_L2TP" = yes ] ;;
	ip6gretap|ip6tnl)
		[ -n "$LINK_TYPES" ] || LINK_TYPES="$(ip link help 2>&1) "
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

run_ip() {
	ip "$@" || {
		LAST_ERR="ip $* failed"
		return 1
	}
}

rand16() {	# 1..65535
	local n
	n=$(hexdump -n 2 -e '/2 "%u"' /dev/urandom 2>/dev/null)
	is_num "$n" || n=$(( ($$ * 7919 + $(now) + ${RSEED:=0}) % 65536 ))
	RSEED=$((RSEED + 4099))
	echo $((n % 65535 + 1))
}

# choose_ids [KIND]: our tunnel and session id (MY_TID, MY_SID), random and
# free here; for ip6gretap MY_TID is the key we propose to receive with.
choose_ids() {
	local used= n tries=0
	case "$1" in
	ip6gretap|ip6tnl) ;;
	*) used=$(ip l2tp show tunnel 2>/dev/null; ip l2tp show session 2>/dev/null) ;;
	esac
	while :; do
		n=$(rand16)
		case "$used" in
		*"Tunnel $n,"*|*"Session $n in"*) ;;
		*) break ;;
		esac
		tries=$((tries + 1))
		[ $tries -lt 50 ] || break
	done
	MY_TID=$n
	MY_SID=$n
}

tunnel_of() {	# tunnel_of IFNAME: the tunnel whose session is IFNAME
	ip l2tp show session 2>/dev/null | {
		t=
		while read -r line; do
			case "$line" in
			"Session "*" in tunnel "*) t=${line##* } ;;
			"interface name: $1") is_u32 "$t" && echo "$t"; exit 0 ;;
			esac
		done
		exit 1
	}
}

has_tunnel() {	# has_tunnel ID
	ip l2tp show tunnel tunnel_id "$1" 2>/dev/null | grep -q "^Tunnel $1,"
}

has_link() {
	ip link show dev "$1" >/dev/null 2>&1
}

# details_kind: ip6gretap or ip6tnl, if the `ip -d link show` on stdin
# is of such a link (its kind is the first word of a line).
details_kind() {
	local w rest
	while read -r w rest; do
		case "$w" in ip6gretap|ip6tnl) echo "$w"; return 0 ;; esac
	done
	return 1
}

link_kind() {	# link_kind IFNAME
	ip -d link show dev "$1" 2>/dev/null | details_kind
}

tunnel_up() {	# is the tunnel of S_* here, with our interface?
	local d
	case "$S_KIND" in
	l2tpv3)
		has_link "$IF" && has_tunnel "$S_TUNNEL_ID" &&
			[ "$(tunnel_of "$IF")" = "$S_TUNNEL_ID" ] ;;
	ip6gretap|ip6tnl)
		d=$(ip -d link show dev "$IF" 2>/dev/null) || return 1
		[ "$(printf '%s\n' "$d" | details_kind)" = "$S_KIND" ] || return 1
		case "$d" in *"remote $S_REMOTE "*) return 0 ;; esac
		return 1 ;;
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

bridge_join() {
	case "$S_BRIDGE" in
	'') return 0 ;;
	@*)
		ubus call "network.interface.${S_BRIDGE#@}" add_device \
			"{ \"name\": \"$IF\" }" >/dev/null || {
			LAST_ERR="netifd did not add $IF to interface ${S_BRIDGE#@}"
			return 1
		} ;;
	*)
		has_link "$S_BRIDGE" || {
			LAST_ERR="no bridge $S_BRIDGE here"
			return 1
		}
		run_ip link set dev "$IF" master "$S_BRIDGE" ;;
	esac
}

bridge_leave() {
	case "$S_BRIDGE" in
	@*) ubus call "network.interface.${S_BRIDGE#@}" remove_device \
		"{ \"name\": \"$IF\" }" >/dev/null 2>&1 ;;
	esac
	return 0
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

# build_l2tp: tunnel, session, then the Ethernet steps (ether_up).
build_l2tp() {
	local udp= err
	can_build l2tpv3 || {
		LAST_ERR=$(cannot_build l2tpv3)
		return 1
	}
	[ "$S_ENCAP" != udp ] || udp="udp_sport $S_UDP_SPORT udp_dport $S_UDP_DPORT"
	# $udp: two keywords and two checked port numbers
	set -- l2tp add tunnel tunnel_id "$S_TUNNEL_ID" \
		peer_tunnel_id "$S_PEER_TUNNEL_ID" encap "$S_ENCAP" \
		local "$S_LOCAL" remote "$S_REMOTE" $udp
	err=$(ip "$@" 2>&1 >/dev/null) || {
		case "$err" in
		*"File exists"*) ID_TAKEN="tunnel id"
			LAST_ERR="ip $*: tunnel $S_TUNNEL_ID exists here" ;;
		*) LAST_ERR="ip $* failed: $(clean "$err") (kmod-l2tp-ip loaded? is $S_LOCAL an address of this host?)" ;;
		esac
		return 1
	}
	set -- l2tp add session name "$IF" tunnel_id "$S_TUNNEL_ID" \
		session_id "$S_SESSION_ID" peer_session_id "$S_PEER_SESSION_ID"
	err=$(ip "$@" 2>&1 >/dev/null) || {
		LAST_ERR="ip $* failed: $(clean "$err")"
		# the name is ours and free (teardown_local): the session id
		case "$err" in *"File exists"*) ID_TAKEN="session id" ;; esac
		return 1
	}
	ether_up
}

# build_gre: Ethernet over GRE over IPv6, keyed both ways.
build_gre() {
	link_add ip6gretap kmod-gre6 local "$S_LOCAL" remote "$S_REMOTE" \
		ikey "$S_IKEY" okey "$S_OKEY" encaplimit none || return 1
	ether_up
}

# build_ip6tnl: IPv4 and IPv6 in IPv6, routed: no MAC, bridge or filter.
build_ip6tnl() {
	[ -z "$S_BRIDGE" ] || {
		LAST_ERR="ip6tnl is routed, -b does not apply"
		return 1
	}
	S_FILTER=
	link_add ip6tnl kmod-ip6-tunnel mode any local "$S_LOCAL" \
		remote "$S_REMOTE" encaplimit none || return 1
	run_ip link set dev "$IF" mtu "$S_MTU" || return 1
	run_ip link set dev "$IF" up || return 1
	addresses_add
}

# link_add KIND KMOD ARGS...: `ip link add $IF type KIND ARGS`; when the
# kernel does not know KIND, LAST_ERR names the package that brings it.
link_add() {
	local kind="$1" kmod="$2" err
	shift 2
	can_build "$kind" || {
		LAST_ERR=$(cannot_build "$kind")
		return 1
	}
	err=$(ip link add "$IF" type "$kind" "$@" 2>&1 >/dev/null) && return 0
	err=$(clean "$err")
	# our name is free (teardown_local): a link with these keys is there
	case "$err" in *"File exists"*) [ "$kind" != ip6gretap ] || ID_TAKEN=key ;; esac
	case "$err" in
	*"nknown device type"*|*"not supported"*)
		LAST_ERR="the kernel cannot build $kind links ($err): install $kmod (opkg install $kmod)" ;;
	*)
		LAST_ERR="ip link add $IF type $kind $* failed${err:+: $err} ($kmod installed? is $S_LOCAL an address of this host?)" ;;
	esac
	return 1
}

# ether_up: the steps of a layer 2 link once it exists: MTU, MAC, beacon
# filter, bridge, up, addresses.
ether_up() {
	run_ip link set dev "$IF" mtu "$S_MTU" || return 1
	[ -z "$S_MAC" ] || run_ip link set dev "$IF" address "$S_MAC" || return 1
	filters_add || return 1
	bridge_join || return 1
	run_ip link set dev "$IF" up || return 1
	addresses_add
}

# addresses_add: not when bridged (the bridge's own config decides) nor
# under netifd (netifd_update tells it).  Layer 2: the leased IPv4 address
# on our end with a host route to its gateway; the prefix needs nothing
# here: the exit routes it to our link-local address.  Layer 3: our IPv4
# and IPv6 addresses on the link.  Default routes stay the operator's
# choice (-D, layer 3 only).
addresses_add() {
	[ -z "$S_BRIDGE" ] && [ -z "$NETIFD" ] || return 0
	if [ "$S_KIND" != ip6tnl ]; then
		[ -n "$S_IPV4" ] || return 0
		run_ip addr add "$S_IPV4/32" dev "$IF" &&
		run_ip route replace "$S_IPV4_GATEWAY/32" dev "$IF"
		return
	fi
	[ -z "$S_IPV4" ] || run_ip addr add "$S_IPV4/32" dev "$IF" || return 1
	[ -z "$S_IPV6" ] || run_ip -6 addr add "$S_IPV6/128" dev "$IF" || return 1
	[ -n "$DEFROUTE" ] || return 0
	# Two halves rather than default: more specific than the router's own
	# default routes, which stay for when the tunnel is gone.
	[ -z "$S_IPV4" ] || {
		run_ip route replace 0.0.0.0/1 dev "$IF" &&
		run_ip route replace 128.0.0.0/1 dev "$IF"
	} || return 1
	[ -z "$S_IPV6$S_PREFIX" ] || {
		run_ip -6 route replace ::/1 dev "$IF" &&
		run_ip -6 route replace 8000::/1 dev "$IF"
	}
}

# teardown_local [FILTER [nowait]]: remove our end (bridge port, the beacon
# filter FILTER (default: the one in S_FILTER), tunnel or link), whatever
# of it exists; found by the state or by the interface name.  Addresses
# and routes go with the link.  Unless nowait, wait until the interface
# is gone (an L2TP session goes on a kernel workqueue), so that it can be
# built again under its name.
teardown_local() {
	local t n=0
	[ "$NOTIFIED" != 1 ] || NOTIFIED=
	bridge_leave
	filters_del "${1-$S_FILTER}"
	case "$S_KIND" in
	l2tpv3) t=$S_TUNNEL_ID ;;
	ip6gretap|ip6tnl) t= ;;
	*) t=$(tunnel_of "$IF") ;;
	esac
	[ -z "$t" ] || ip l2tp del tunnel tunnel_id "$t" >/dev/null 2>&1
	case "$S_KIND" in
	l2tpv3) ;;
	ip6gretap|ip6tnl) has_link "$IF" && ip link del "$IF" >/dev/null 2>&1 ;;
	*) has_link "$IF" && case "$(link_kind "$IF")" in
		ip6gretap|ip6tnl) ip link del "$IF" >/dev/null 2>&1 ;;
		esac ;;
	esac
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
