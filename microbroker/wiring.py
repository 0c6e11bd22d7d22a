"""A Broker from its config: the data plane it names and the lease store.

Imports stay lazy: a CGI request loads this module every time, and one
with `dataplane 'none'` never loads the kernel modules nor, for an offer,
the lease store.
"""

import errno
import posix

from microbroker import posixfs
from microbroker.broker import Broker, BrokerError, _store_error


def make_dataplane(config):
    if config.dataplane == "none":
        from microbroker.nulldataplane import NullDataplane
        return NullDataplane(config)
    try:
        from microbroker import dataplane
        return dataplane.Dataplane(config)
    except Exception as e:  # a missing module or its set-up failing
        from microbroker.nulldataplane import BrokenDataplane
        reason = "kernel dataplane unavailable: %s: %s" % (
            type(e).__name__, e)
        return BrokenDataplane(reason)


class _Never(Exception):
    """Stands for a data plane error class whose module is not loaded:
    nothing raises it then."""


def dataplane_errors():
    """(IdInUse, KernelUnavailable) of microbroker.dataplane when it is
    loaded (a NullDataplane never loads it)."""
    import sys
    dp = sys.modules.get("microbroker.dataplane")
    if dp is None:
        return _Never, _Never
    return dp.IdInUse, dp.KernelUnavailable


def open_store(config):
    """The LeaseStore for this config, creating the state directory."""
    from microbroker.leases import LeaseStore
    for d in (config.state_dir, config.lease_path.rpartition("/")[0]):
        try:
            posix.mkdir(d or ".", 0o700)
        except FileExistsError:
            if not posixfs.is_dir(d or "."):
                raise BrokerError("store", "cannot create %s: %s"
                                  % (d, posix.strerror(errno.EEXIST)))
        except OSError:
            import os       # a parent missing: os.makedirs makes them
            try:
                os.makedirs(d or ".", 0o700, exist_ok=True)
            except OSError as e:
                raise BrokerError("store", "cannot create %s: %s"
                                  % (d, e.strerror))
    try:
        return LeaseStore(config.lease_path, tunnel_ids=config.tunnel_ids,
                          session_ids=config.session_ids,
                          max_leases=config.max_leases,
                          max_per_client=config.max_per_client,
                          ifname_prefix=config.ifname_prefix)
    except Exception as e:   # wrong backend, newer schema, ...
        raise _store_error(e) or e


def make_broker(config, store=None, dataplane=None, lazy=False):
    """lazy: open the lease store when a request first needs it (a CGI: an
    offer reads only the counts file); else now, so errors show at once."""
    if store is None and not lazy:
        store = open_store(config)
    if dataplane is None:
        dataplane = make_dataplane(config)
    return Broker(config, store, dataplane)
