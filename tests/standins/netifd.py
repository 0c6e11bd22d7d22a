"""Stand-in for how netifd ends a proto handler's command (netifd
proto-ext.c: proto_ext_notify with PROTO_CMD_TEARDOWN arms
teardown_timeout at 5000 ms and the handler's proto_kill_command sends
SIGTERM; proto_ext_teardown_timeout_cb then netifd_kill_process()es the
command with SIGKILL)."""

import signal
import subprocess

TEARDOWN_TIMEOUT = 5.0  # proto-ext.c: uloop_timeout_set(&state->teardown_timeout, 5000)


def teardown(proc):
    """SIGTERM, SIGKILL 5 s later if still running. True if the command
    ended by itself, with exit status 0, inside the window."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(TEARDOWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
    return proc.returncode == 0
