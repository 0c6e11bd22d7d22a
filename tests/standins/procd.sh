# Stand-in for OpenWrt's /lib/functions/procd.sh: every call is written to
# $STANDIN_LOG as one line, the function and its arguments separated by
# tabs.  Parameter types outside procd's list are an error, like a typo the
# real procd would silently ignore.

_standin_log() {
	local line="$1"
	shift
	for a in "$@"; do
		line="$line	$a"
	done
	echo "$line" >>"$STANDIN_LOG"
}

_standin_param_type() {
	case "$1" in
	env|data|limits|command|netdev|file|respawn|watch|watchdog|error|\
	nice|term_timeout|reload_signal|pidfile|user|group|seccomp|\
	capabilities|facility|extroot|overlaydir|tmpoverlaysize|vrf|\
	stdout|stderr|no_new_privs) return 0 ;;
	esac
	echo "procd.sh stand-in: unknown parameter type '$1'" >&2
	_standin_log ERROR "unknown parameter type $1"
	return 1
}

procd_open_service() { _standin_log procd_open_service "$@"; }
procd_close_service() {
	procd_open_trigger
	service_triggers
	procd_close_trigger
	_standin_log procd_close_service "$@"
}
procd_open_instance() { _standin_log procd_open_instance "$@"; }
procd_close_instance() { _standin_log procd_close_instance "$@"; }
procd_set_param() {
	_standin_param_type "$1" || return 1
	_standin_log procd_set_param "$@"
}
procd_append_param() {
	_standin_param_type "$1" || return 1
	_standin_log procd_append_param "$@"
}
procd_open_trigger() { _standin_log procd_open_trigger "$@"; }
procd_close_trigger() { _standin_log procd_close_trigger "$@"; }
procd_add_reload_trigger() { _standin_log procd_add_reload_trigger "$@"; }
procd_add_config_trigger() { _standin_log procd_add_config_trigger "$@"; }
procd_add_interface_trigger() { _standin_log procd_add_interface_trigger "$@"; }
procd_add_reload_interface_trigger() { _standin_log procd_add_reload_interface_trigger "$@"; }
procd_add_raw_trigger() { _standin_log procd_add_raw_trigger "$@"; }
procd_open_validate() { _standin_log procd_open_validate "$@"; }
procd_close_validate() { _standin_log procd_close_validate "$@"; }
procd_add_validation() { _standin_log procd_add_validation "$@"; }
procd_add_instance() { _standin_log procd_add_instance "$@"; }
procd_kill() { _standin_log procd_kill "$@"; }
procd_send_signal() { _standin_log procd_send_signal "$@"; }
procd_running() { _standin_log procd_running "$@"; return 1; }
procd_lock() { :; }
