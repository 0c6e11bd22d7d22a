# Stand-in for OpenWrt's /lib/functions.sh: the UCI helpers init scripts
# use (config_load, config_get, config_get_bool, config_foreach,
# config_list_foreach, append).  config_load NAME reads $UCI_CONFIG_DIR/NAME,
# which has to be UCI in the plain form `uci export` prints (config, option
# and list lines, values in single quotes): that form is shell, the way
# the real uci_load evaluates `uci export`.

append() {
	local var="$1" value="$2" sep="${3:- }"
	eval "$var=\${$var:+\${$var}\${value:+\$sep}}\$value"
}

package() {
	:
}

config() {
	local cfgtype="$1" name="$2"
	CONFIG_NUM_SECTIONS=$((CONFIG_NUM_SECTIONS + 1))
	[ -n "$name" ] || name="cfg$CONFIG_NUM_SECTIONS"
	append CONFIG_SECTIONS "$name"
	CONFIG_SECTION=$name
	eval "CONFIG_${name}_TYPE=\$cfgtype"
}

option() {
	eval "CONFIG_${CONFIG_SECTION}_$1=\$2"
}

list() {
	local len
	eval "len=\${CONFIG_${CONFIG_SECTION}_$1_LENGTH:-0}"
	len=$((len + 1))
	eval "CONFIG_${CONFIG_SECTION}_$1_ITEM$len=\$2"
	eval "CONFIG_${CONFIG_SECTION}_$1_LENGTH=$len"
	append "CONFIG_${CONFIG_SECTION}_$1" "$2" " "
}

config_load() {
	CONFIG_SECTIONS=
	CONFIG_NUM_SECTIONS=0
	CONFIG_SECTION=
	echo "config_load	$1" >>"$STANDIN_LOG"
	[ -f "$UCI_CONFIG_DIR/$1" ] && . "$UCI_CONFIG_DIR/$1"
	return 0
}

config_get() {
	case "$#" in
	4) eval "$1=\${CONFIG_$2_$3:-\$4}" ;;
	3) eval "$1=\${CONFIG_$2_$3:-}" ;;
	2) eval "echo \"\${CONFIG_$1_$2:-}\"" ;;
	esac
}

config_get_bool() {
	local _tmp
	config_get _tmp "$2" "$3" "$4"
	case "$_tmp" in
	1|on|true|yes|enabled) _tmp=1 ;;
	0|off|false|no|disabled) _tmp=0 ;;
	*) _tmp="$4" ;;
	esac
	eval "$1=\$_tmp"
}

config_foreach() {
	local ___function="$1" ___type="$2" section cfgtype
	shift 2
	for section in $CONFIG_SECTIONS; do
		config_get cfgtype "$section" TYPE
		[ -z "$___type" ] || [ "$cfgtype" = "$___type" ] || continue
		"$___function" "$section" "$@"
	done
}

config_list_foreach() {
	local section="$1" option="$2" function="$3" len i val
	shift 3
	config_get len "$section" "${option}_LENGTH"
	[ -n "$len" ] || return 0
	i=1
	while [ "$i" -le "$len" ]; do
		config_get val "$section" "${option}_ITEM$i"
		"$function" "$val" "$@"
		i=$((i + 1))
	done
}
