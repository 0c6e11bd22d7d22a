#!/bin/sh
# netifd protocol handler (/lib/netifd/proto/microbroker.sh): a tunnel
# leased from a microbroker exit, kept up by microbroker-client: an
# Ethernet pseudo-wire (kind l2tpv3 or ip6gretap) or a routed link (ip6tnl).
#
#	config interface 'exitvpn'
#		option proto 'microbroker'
#		option server 'http://[fc00::1]:8053'	# or several: list server
#		option service 'exit'		# default: the exit's first service
#		#option kind 'ip6gretap'	# l2tpv3 ip6gretap ip6tnl: the exit's
#						# first service of that kind
#		option network 'lan'		# put the pseudo-wire into lan's bridge
#		#option bridge 'br-lan'		# or into a bridge device by name
#		#option token 'secret-token'
#		#option filter 'auto'		# 0xfc00 beacon filter: auto nft ebtables none
#		#option timeout '10'		# HTTP timeout, seconds
#
# The interface's device is mb-<interface> (cut to 15 characters).  netifd
# starts `microbroker-client ... run`, which leases, builds the device,
# reports it with proto_init_update/proto_send_update, renews, and on
# teardown (SIGTERM) removes the device and releases the lease.  A routed
# lease (no network or bridge, or kind ip6tnl) hands its addresses and
# prefix to netifd, which sets the default routes unless
# `option defaultroute '0'`.  ip6tnl takes no network or bridge.
#
# netifd reads its handlers when it starts: after installing this file,
# run `/etc/init.d/network restart`.

[ -n "$INCLUDE_ONLY" ] || {
	. /lib/functions.sh
	. ../netifd-proto.sh
	init_proto "$@"
}

MICROBROKER_CLIENT=${MICROBROKER_CLIENT:-/usr/sbin/microbroker-client}

proto_microbroker_init_config() {
	no_device=1
	available=1
	renew_handler=1
	proto_config_add_array server
	proto_config_add_string service
	proto_config_add_string kind
	proto_config_add_string network
	proto_config_add_string bridge
	proto_config_add_string token
	proto_config_add_string filter
	proto_config_add_int timeout
}

# The client's own probes of `ip` (kernel.sh: can_build, cannot_build).
MICROBROKER_LIB=${MICROBROKER_LIB:-/usr/lib/microbroker-client}

proto_microbroker_fail() {
	local config="$1" code="$2"
	shift 2
	echo "microbroker: $config: $*" >&2
	proto_notify_error "$config" "$code"
	proto_block_restart "$config"
}

proto_microbroker_setup() {
	local config="$1"
	local server service kind network bridge token filter timeout url
	local dev k

	json_get_values server server
	json_get_vars service kind network bridge token filter timeout

	case "$kind" in
	''|l2tpv3|ip6gretap|ip6tnl) ;;
	*)
		proto_microbroker_fail "$config" INVALID_KIND \
			"option kind: l2tpv3, ip6gretap or ip6tnl"
		return 1 ;;
	esac
	if [ ! -f "$MICROBROKER_LIB/kernel.sh" ]; then
		proto_microbroker_fail "$config" NO_CLIENT \
			"$MICROBROKER_LIB/kernel.sh is missing"
		return 1
	fi
	. "$MICROBROKER_LIB/kernel.sh"
	case "$kind" in
	ip6gretap|ip6tnl)
		if ! can_build "$kind"; then
			proto_microbroker_fail "$config" NO_IP_TUNNEL \
				"$(cannot_build "$kind")"
			return 1
		fi ;;
	*)
		# l2tpv3, or any kind the exit offers: at least something
		if ! can_build l2tpv3 && { [ -n "$kind" ] ||
				! can_build ip6gretap; }; then
			proto_microbroker_fail "$config" NO_IP_L2TP \
				"$(cannot_build l2tpv3)"
			return 1
		fi ;;
	esac
	if [ ! -x "$MICROBROKER_CLIENT" ]; then
		proto_microbroker_fail "$config" NO_CLIENT \
			"$MICROBROKER_CLIENT is missing"
		return 1
	fi
	if [ -z "$server" ]; then
		proto_microbroker_fail "$config" MISSING_SERVER \
			"no server: option server 'http://[fc00::1]:8053'"
		return 1
	fi
	if [ -n "$network" ] && [ -n "$bridge" ]; then
		proto_microbroker_fail "$config" BRIDGE_AND_NETWORK \
			"give option network or option bridge, not both"
		return 1
	fi
	if [ "$kind" = ip6tnl ] && [ -n "$network$bridge" ]; then
		proto_microbroker_fail "$config" ROUTED_KIND \
			"kind ip6tnl is routed: no option network or bridge"
		return 1
	fi

	dev=$(printf '%.15s' "mb-$config")
	set -- "$MICROBROKER_CLIENT" -i "$dev" -N "$config"
	for url in $server; do
		set -- "$@" -s "$url"
	done
	[ -z "$service" ] || set -- "$@" -S "$service"
	[ -z "$kind" ] || set -- "$@" -K "$kind"
	[ -z "$network" ] || set -- "$@" -b "@$network"
	[ -z "$bridge" ] || set -- "$@" -b "$bridge"
	# the token in the client's environment: argv shows in `ps`
	[ -z "$token" ] || proto_export "MICROBROKER_TOKEN=$token"
	[ -z "$filter" ] || set -- "$@" -f "$filter"
	[ -z "$timeout" ] || set -- "$@" -T "$timeout"
	proto_run_command "$config" "$@" run
}

# `ifup` of an interface that is up, or `ubus call network.interface.X
# renew`: the client renews (or leases) at once, as dhcp.sh's udhcpc does.
proto_microbroker_renew() {
	local sigusr1
	sigusr1=$(kill -l SIGUSR1 2>/dev/null || kill -l USR1)
	[ -z "$sigusr1" ] || proto_kill_command "$1" "$sigusr1"
}

proto_microbroker_teardown() {
	local config="$1"

	# SIGTERM: the client removes its device and releases the lease
	# (netifd allows 5 s before SIGKILL; a kept lease is resumed or
	# expires on the exit).
	proto_kill_command "$config"
}

[ -n "$INCLUDE_ONLY" ] || {
	add_protocol microbroker
}
