#!/bin/sh
# netifd protocol handler (/lib/netifd/proto/microbroker.sh): an Ethernet
# pseudo-wire leased from a microbroker exit, kept up by microbroker-client.
#
#	config interface 'exitvpn'
#		option proto 'microbroker'
#		option server 'http://[fc00::1]:8053'	# or several: list server
#		option service 'exit'		# default: the exit's first service
#		option network 'lan'		# put the pseudo-wire into lan's bridge
#		#option bridge 'br-lan'		# or into a bridge device by name
#		#option token 'secret-token'
#		#option filter 'auto'		# 0xfc00 beacon filter: auto nft ebtables none
#		#option timeout '10'		# HTTP timeout, seconds
#
# The interface's device is mb-<interface> (cut to 15 characters).  netifd
# starts `microbroker-client ... run`, which leases, builds the device,
# reports it with proto_init_update/proto_send_update, renews, and on
# teardown (SIGTERM) removes the device and releases the lease.
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
	proto_config_add_array server
	proto_config_add_string service
	proto_config_add_string network
	proto_config_add_string bridge
	proto_config_add_string token
	proto_config_add_string filter
	proto_config_add_int timeout
}

# `ip` as found on PATH: a BusyBox that prefers its applets would answer
# with its own ip, which has no l2tp.
proto_microbroker_ip() {
	local d IFS=:
	for d in $PATH; do
		[ -f "$d/ip" ] && [ -x "$d/ip" ] && {
			echo "$d/ip"
			return 0
		}
	done
	return 1
}

proto_microbroker_fail() {
	local config="$1" code="$2"
	shift 2
	echo "microbroker: $config: $*" >&2
	proto_notify_error "$config" "$code"
	proto_block_restart "$config"
}

proto_microbroker_setup() {
	local config="$1"
	local server service network bridge token filter timeout url
	local dev ip

	json_get_values server server
	json_get_vars service network bridge token filter timeout

	ip=$(proto_microbroker_ip)
	if [ -z "$ip" ] || ! "$ip" l2tp help 2>&1 | grep -q 'l2tp add tunnel'; then
		proto_microbroker_fail "$config" NO_IP_L2TP \
			"\`ip l2tp\` is missing: install ip-full"
		return 1
	fi
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

	dev=$(printf '%.15s' "mb-$config")
	set -- "$MICROBROKER_CLIENT" -i "$dev" -N "$config"
	for url in $server; do
		set -- "$@" -s "$url"
	done
	[ -z "$service" ] || set -- "$@" -S "$service"
	[ -z "$network" ] || set -- "$@" -b "@$network"
	[ -z "$bridge" ] || set -- "$@" -b "$bridge"
	[ -z "$token" ] || set -- "$@" -k "$token"
	[ -z "$filter" ] || set -- "$@" -f "$filter"
	[ -z "$timeout" ] || set -- "$@" -T "$timeout"
	proto_run_command "$config" "$@" run
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
