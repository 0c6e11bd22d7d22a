"""Data planes that build nothing: `dataplane 'none'` (tests, dry runs), and
the stand-in for a kernel data plane that cannot even be loaded."""

class NullDataplane:
    """`dataplane 'none'`: grants leases and builds nothing. For tests and
    dry runs; the offer says so (kernel false with this reason)."""

    dry_run = True

    def __init__(self, config=None):
        pass

    def status(self, kind=None):
        return False, "dataplane none: leases are granted but no " \
                      "tunnels are built (dry run)"

    def up(self, lease, service):
        pass

    def down(self, lease):
        pass

    def counters(self, lease):
        return {}

    foreign_ids = frozenset()

    def reconcile(self, live, services):
        return {}


class BrokenDataplane(NullDataplane):
    """Stands in when the kernel data plane cannot even be loaded, so the
    broker still answers offers and says why leases are unavailable."""

    dry_run = False

    def __init__(self, reason):
        self.reason = reason

    def status(self, kind=None):
        return False, self.reason

    def up(self, lease, service):
        from microbroker.broker import UNAVAILABLE_RETRY, BrokerError
        raise BrokerError("unavailable", self.reason, UNAVAILABLE_RETRY)

    def reconcile(self, live, services):
        from microbroker.broker import UNAVAILABLE_RETRY, BrokerError
        raise BrokerError("unavailable", self.reason, UNAVAILABLE_RETRY)
