# Stand-in for netifd's /lib/netifd/netifd-proto.sh (and the jshn calls a
# handler reads its options with): every call is written to $STANDIN_LOG as
# one line, the function and its arguments separated by tabs.  Options come
# from CONFIG_<option> variables; arrays are blank-separated.

_standin_log() {
	local line="$1"
	shift
	for a in "$@"; do
		line="$line	$a"
	done
	echo "$line" >>"$STANDIN_LOG"
}

proto_config_add_int() { _standin_log proto_config_add_int "$@"; }
proto_config_add_string() { _standin_log proto_config_add_string "$@"; }
proto_config_add_boolean() { _standin_log proto_config_add_boolean "$@"; }
proto_config_add_array() { _standin_log proto_config_add_array "$@"; }
proto_config_add_defaults() { _standin_log proto_config_add_defaults "$@"; }

proto_init_update() { _standin_log proto_init_update "$@"; }
proto_set_keep() { _standin_log proto_set_keep "$@"; }
proto_add_ipv4_address() { _standin_log proto_add_ipv4_address "$@"; }
proto_add_ipv6_address() { _standin_log proto_add_ipv6_address "$@"; }
proto_add_ipv4_route() { _standin_log proto_add_ipv4_route "$@"; }
proto_add_ipv6_route() { _standin_log proto_add_ipv6_route "$@"; }
proto_add_ipv6_prefix() { _standin_log proto_add_ipv6_prefix "$@"; }
proto_add_dns_server() { _standin_log proto_add_dns_server "$@"; }
proto_add_data() { _standin_log proto_add_data "$@"; }
proto_close_data() { _standin_log proto_close_data "$@"; }
proto_add_tunnel() { _standin_log proto_add_tunnel "$@"; }
proto_close_tunnel() { _standin_log proto_close_tunnel "$@"; }
proto_send_update() { _standin_log proto_send_update "$@"; }
proto_run_command() { _standin_log proto_run_command "$@"; }
proto_kill_command() { _standin_log proto_kill_command "$@"; }
proto_notify_error() { _standin_log proto_notify_error "$@"; }
proto_block_restart() { _standin_log proto_block_restart "$@"; }
proto_set_available() { _standin_log proto_set_available "$@"; }
proto_add_host_dependency() { _standin_log proto_add_host_dependency "$@"; }
proto_setup_failed() { _standin_log proto_setup_failed "$@"; }
proto_export() { _standin_log proto_export "$@"; }

json_get_var() {
	eval "$1=\${CONFIG_$2:-}"
}

json_get_vars() {
	local _v
	for _v in "$@"; do
		json_get_var "$_v" "$_v"
	done
}

json_get_values() {
	json_get_var "$1" "$2"
}
