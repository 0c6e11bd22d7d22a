"""OpenWrt's own userland, built from its public sources, as an oracle.

`../shared/tools/openwrt-build PREFIX` builds uclient-fetch, uhttpd, uci,
ubusd, netifd and jshn into PREFIX (default /opt/openwrt, or
$MICROBROKER_OPENWRT). Tests that need one of them take it from here and
skip, saying why, where the build is absent.
"""

import os

import pytest

PREFIX = os.environ.get("MICROBROKER_OPENWRT", "/opt/openwrt")

# tool -> its path under PREFIX
TOOLS = {
    "uclient-fetch": "bin/uclient-fetch",
    "uhttpd": "bin/uhttpd",
    "uci": "bin/uci",
    "jshn": "bin/jshn",
    "ubus": "bin/ubus",
    "ubusd": "sbin/ubusd",
    "netifd": "sbin/netifd",
    "jshn.sh": "share/libubox/jshn.sh",
    "netifd-proto.sh": "lib/netifd/netifd-proto.sh",
}


def path(tool):
    return os.path.join(PREFIX, TOOLS[tool])


def missing(*tools):
    """Why these tools cannot be used here, or ''."""
    gone = [t for t in tools if not os.path.exists(path(t))]
    if not gone:
        return ""
    return ("OpenWrt's real %s not built at %s: run ../shared/tools/openwrt-build %s "
            "(MIRRORS: see its header), or set MICROBROKER_OPENWRT"
            % (", ".join(gone), PREFIX, PREFIX))


def need(*tools):
    """A pytest mark that skips unless every tool is built."""
    why = missing(*tools)
    return pytest.mark.skipif(bool(why), reason=why)
