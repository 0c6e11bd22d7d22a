"""Both front doors through OpenWrt's real uclient-fetch, the `wget` of a
router: chunked POST bodies with no Content-Length, exit 8 and no output
for a non-2xx answer. `serve` directly, and the CGI under real uhttpd
(which de-chunks the body and gives the CGI no CONTENT_LENGTH)."""

import json

import pytest

import owrt
from frontdoors import ServeDoor, UhttpdDoor, fetch, sh_answer

pytestmark = owrt.need("uclient-fetch")

CONFIG = """
config broker
	option dataplane 'none'
	option state_dir '%(state)s'
	option max_per_client '2'
	option max_body '512'
	option sweep_interval '3600'

config service 'v4'
	option family '4'
	option encap 'udp'
	option udp_port '20000'

config service 'small'
	option family '4'
	option capacity '1'
"""


@pytest.fixture(params=["serve", "uhttpd"])
def door(request, tmp_path):
    path = tmp_path / "microbroker"
    path.write_text(CONFIG % {"state": tmp_path / "state"})
    if request.param == "serve":
        d = ServeDoor(str(path))
    else:
        d = UhttpdDoor(tmp_path, str(path))
    yield d
    d.close()


def sh(door, path, post=None):
    rc, out = fetch(door.url(path, "format=sh"), post)
    assert rc == 0, out
    return sh_answer(out)


def test_lease_cycle_in_shell_format(door):
    a = sh(door, "/offer")
    assert a["STATUS"] == "200" and a["SERVICES"] == "v4 small"
    a = sh(door, "/lease", "service=v4&format=sh")
    assert (a["STATUS"], a["ERROR"], a["SERVICE"]) == ("200", "", "v4")
    assert a["LOCAL"] == "127.0.0.1" and a["UDP_DPORT"] == "20000"
    lid, secret = a["LEASE_ID"], a["SECRET"]
    cred = "lease_id=%s&secret=%s&format=sh" % (lid, secret)
    a = sh(door, "/renew", cred)
    assert (a["STATUS"], a["LEASE_ID"]) == ("200", lid)
    a = sh(door, "/status", cred)
    assert (a["STATUS"], a["STATE"]) == ("200", "up")
    a = sh(door, "/release", cred)
    assert (a["STATUS"], a["RELEASED"]) == ("200", "1")
    a = sh(door, "/renew", cred)
    assert (a["STATUS"], a["ERROR"]) == ("404", "not_found")


def test_json_lease_and_release(door):
    rc, out = fetch(door.url("/lease"), "service=small")
    assert rc == 0
    lease = json.loads(out)
    assert lease["service"] == "small"
    rc, out = fetch(door.url("/release"), "lease_id=%s&secret=%s"
                    % (lease["lease_id"], lease["secret"]))
    assert rc == 0 and json.loads(out)["released"] is True


@pytest.mark.parametrize("path,post,status,code", [
    ("/lease", "service=nosuch", "404", "unknown_service"),
    ("/lease", "kind=gre", "404", "unknown_kind"),
    ("/lease", "service=v4&tunnel_id=%C2%B2", "400", "bad_request"),
    ("/lease", "service=v4&tunnel_id=%D9%A7", "400", "bad_request"),
    ("/lease", "service=v4&x=" + "a" * 600, "413", "too_large"),
    ("/renew", "lease_id=%s&secret=%s" % ("0" * 16, "a" * 32), "404",
     "not_found"),
    ("/offer/x", "", "404", "not_found"),
    ("/lease", None, "405", "method_not_allowed"),
    ("/lease", "service=v4&format=xml", "400", "bad_request"),
])
def test_errors(door, path, post, status, code):
    # JSON: a non-2xx status, so uclient-fetch prints nothing and exits 8
    rc, out = fetch(door.url(path), post)
    assert (rc, out) == (8, b"")
    # the shell format, asked for in the query string: always 200
    a = sh(door, path, post)
    assert (a["STATUS"], a["ERROR"]) == (status, code)
    assert a["MESSAGE"]

