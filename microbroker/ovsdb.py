"""OVSDB (RFC 7047) JSON-RPC over ovsdb-server's unix socket: bridges and ports.

Framing as in OVS's lib/jsonrpc.c: one JSON object after another on the
stream, no length and no separator; the server's own requests (echo) are
answered, its notifications skipped. Tables and columns are those of
vswitchd/vswitch.ovsschema (Open_vSwitch, Bridge, Port, Interface).
"""

import codecs
import json
import socket
import time

DEFAULT_SOCKET = "/var/run/openvswitch/db.sock"
DB = "Open_vSwitch"
OFPP_LOCAL = 65534        # the bridge's own (internal) port
RECV_SIZE = 65536
MAX_MESSAGE = 64 << 20      # characters of one message before we give up
LEASE_KEY = "mb-lease"    # Port.external_ids: the lease the port is for


class OvsdbError(Exception):
    """Talking to ovsdb-server failed."""


class NotAvailable(OvsdbError):
    """No ovsdb-server on the socket (not installed, not running, no
    permission)."""


class ProtocolError(OvsdbError):
    """The connection closed or a reply made no sense."""


class TransactionError(OvsdbError):
    """A transact op, or its commit, failed; nothing was committed.
    `error` is the server's error name (e.g. 'constraint violation')."""

    def __init__(self, error, details="", what=""):
        self.error = error
        self.details = details
        text = error + (": " + details if details else "")
        super().__init__("%s: %s" % (what, text) if what else text)


class NoSuchBridge(OvsdbError):
    pass


class PortError(OvsdbError):
    """ovs-vswitchd could not use an interface (ofport -1, Interface.error),
    or did not take it up in time."""


class Port:
    """A Port row with its Interface's ofport (None until vswitchd assigns
    one, -1 on error)."""

    def __init__(self, name, uuid, protected=False, external_ids=None, ofport=None,
                 error=""):
        self.name = name
        self.uuid = uuid
        self.protected = protected
        self.external_ids = external_ids or {}
        self.ofport = ofport
        self.error = error

    def __repr__(self):
        return "Port(%r, ofport=%r)" % (self.name, self.ofport)


# ---- encodings (RFC 7047 section 5.1) ---------------------------------------

def omap(d):
    return ["map", sorted([str(k), str(v)] for k, v in d.items())]


def from_map(v):
    return dict(v[1]) if isinstance(v, list) and v[:1] == ["map"] else {}


def from_set(v):
    """A set column as a list; a single atom stands for a 1-element set."""
    if isinstance(v, list) and v[:1] == ["set"]:
        return v[1]
    return [v]


def optional(v):
    """An optional scalar column (min 0, max 1): the value or None."""
    s = from_set(v)
    return s[0] if s else None


def uuid_of(v):
    if isinstance(v, list) and len(v) == 2 and v[0] in ("uuid", "named-uuid"):
        return v[1]
    raise ProtocolError("not a uuid: %r" % (v,))


def where_name(name):
    return [["name", "==", name]]


class Ovsdb:
    """One connection to ovsdb-server. Use as a context manager."""

    def __init__(self, path=None, timeout=10.0, sock=None):
        self.path = path or DEFAULT_SOCKET
        self.timeout = timeout
        self._id = 0
        self._buf = ""
        self._dec = codecs.getincrementaldecoder("utf-8")()
        self._json = json.JSONDecoder()
        if sock is not None:        # already connected (tests: a socketpair)
            self.sock = sock
            sock.settimeout(timeout)
            return
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise NotAvailable("ovsdb-server at %s: %s" % (self.path, e.strerror or e)) \
                from None
        self.sock = s

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- JSON-RPC --
    def _send(self, msg):
        try:
            self.sock.sendall(json.dumps(msg, separators=(",", ":")).encode())
        except OSError as e:
            raise ProtocolError("ovsdb-server at %s: %s" % (self.path, e)) from None

    def _message(self):
        """The next complete JSON value from the stream."""
        while True:
            text = self._buf.lstrip()
            # Every message is an object: a prefix of one never parses, and
            # one can be whole only where the text ends with "}". Parsing
            # each partial read of a long reply (a select of 1,500 ports)
            # would cost its length times the number of reads.
            if text.rstrip().endswith("}"):
                try:
                    msg, end = self._json.raw_decode(text)
                except ValueError:
                    pass        # not all here yet, or garbage (the cap below)
                else:
                    self._buf = text[end:]
                    if not isinstance(msg, dict):
                        raise ProtocolError("ovsdb-server sent %r" % (msg,))
                    return msg
            self._buf = text + self._read_to_brace(MAX_MESSAGE - len(text))

    def _read_to_brace(self, room):
        """What the server sends next, up to a read that ends with "}"."""
        parts = []
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except socket.timeout:
                raise ProtocolError("no answer from ovsdb-server in %g s" % self.timeout) \
                    from None
            except OSError as e:
                raise ProtocolError("ovsdb-server at %s: %s" % (self.path, e)) from None
            if not data:
                raise ProtocolError("ovsdb-server closed the connection")
            room -= len(data)
            if room < 0:
                raise ProtocolError("unparsable reply from ovsdb-server (over %d MiB)"
                                    % (MAX_MESSAGE >> 20))
            parts.append(self._dec.decode(data))
            if parts[-1].rstrip().endswith("}"):
                return "".join(parts)

    def call(self, method, params):
        """Send a request and return its result; raise on an error reply."""
        self._id += 1
        rid = self._id
        self._send({"method": method, "params": params, "id": rid})
        while True:
            msg = self._message()
            if msg.get("method") == "echo" and msg.get("id") is not None:
                self._send({"id": msg["id"], "result": msg.get("params", []), "error": None})
                continue
            if msg.get("id") != rid or "method" in msg:
                continue        # a notification (update, locked...) we did not ask for
            err = msg.get("error")
            if err is not None:
                if isinstance(err, dict):
                    raise TransactionError(str(err.get("error")), str(err.get("details", "")),
                                           method)
                raise TransactionError(str(err), "", method)
            return msg.get("result")

    def transact(self, *ops, what=""):
        """Run ops in one transaction; the list of op results. A failed op
        or commit raises TransactionError (the top-level error is null even
        then: the failure is an element of the result)."""
        result = self.call("transact", [DB] + list(ops))
        if not isinstance(result, list):
            raise ProtocolError("transact answered %r" % (result,))
        for r in result:
            if isinstance(r, dict) and r.get("error"):
                raise TransactionError(str(r["error"]), str(r.get("details", "")), what)
        if len(result) < len(ops):
            raise ProtocolError("transact answered %d results for %d ops"
                                % (len(result), len(ops)))
        return result

    # -- Open_vSwitch tables --
    def bridge(self, name):
        """The Bridge row {name, _uuid, ports, fail_mode, datapath_type} or None."""
        rows = self.transact({"op": "select", "table": "Bridge", "where": where_name(name),
                              "columns": ["_uuid", "name", "ports", "fail_mode",
                                          "datapath_type"]})[0]["rows"]
        return rows[0] if rows else None

    def ensure_bridge(self, name, fail_mode="secure", datapath_type="", hwaddr=None,
                      external_ids=None):
        """The bridge with its own internal port; an existing one is set to
        fail_mode. True if this call created it."""
        if self.transact({"op": "update", "table": "Bridge", "where": where_name(name),
                          "row": {"fail_mode": fail_mode}},
                         what="bridge %s" % name)[0]["count"]:
            return False
        other = {"hwaddr": hwaddr} if hwaddr else {}
        ops = [
            {"op": "insert", "table": "Interface", "uuid-name": "iface",
             "row": {"name": name, "type": "internal"}},
            {"op": "insert", "table": "Port", "uuid-name": "port",
             "row": {"name": name, "interfaces": ["named-uuid", "iface"]}},
            {"op": "insert", "table": "Bridge", "uuid-name": "br",
             "row": {"name": name, "ports": ["named-uuid", "port"], "fail_mode": fail_mode,
                     "datapath_type": datapath_type, "other_config": omap(other),
                     "external_ids": omap(external_ids or {})}},
            {"op": "mutate", "table": "Open_vSwitch", "where": [],
             "mutations": [["bridges", "insert", ["set", [["named-uuid", "br"]]]],
                           ["next_cfg", "+=", 1]]},
        ]
        try:
            r = self.transact(*ops, what="bridge %s" % name)
        except TransactionError as e:
            if e.error != "constraint violation":
                raise
            return False        # made by another process meanwhile
        if not r[3]["count"]:
            # The rows, referenced by nothing, were collected at commit.
            raise OvsdbError("the database has no Open_vSwitch row (not initialised: "
                             "ovs-vsctl init, which ovs-ctl start runs)")
        return True

    def add_port(self, bridge, name, protected=False, external_ids=None):
        """A Port and Interface for the existing kernel device `name` on
        `bridge`, in one transaction; one of that name elsewhere is moved.
        Returns the Port's uuid."""
        for attempt in (0, 1):
            ops = [
                # Without it a missing bridge is a silent no-op: the new rows,
                # referenced by nothing, would be collected at commit.
                {"op": "wait", "table": "Bridge", "where": where_name(bridge),
                 "columns": ["name"], "until": "==", "rows": [{"name": bridge}], "timeout": 0},
                {"op": "insert", "table": "Interface", "uuid-name": "iface",
                 "row": {"name": name, "type": ""}},
                {"op": "insert", "table": "Port", "uuid-name": "port",
                 "row": {"name": name, "interfaces": ["named-uuid", "iface"],
                         "protected": bool(protected),
                         "external_ids": omap(external_ids or {})}},
                {"op": "mutate", "table": "Bridge", "where": where_name(bridge),
                 "mutations": [["ports", "insert", ["set", [["named-uuid", "port"]]]]]},
            ]
            try:
                return uuid_of(self.transact(*ops, what="port %s" % name)[2]["uuid"])
            except TransactionError as e:
                if e.error == "timed out":
                    raise NoSuchBridge("no bridge %s in ovsdb" % bridge) from None
                if e.error != "constraint violation" or attempt:
                    raise
            # A port of that name exists (a retry, a leftover): replace it.
            self.delete_port(name)

    def delete_port(self, name, bridge=None):
        """Remove port `name` from whichever bridge holds it (Port and
        Interface go with it: they are not root rows). False if none did."""
        rows = self.transact({"op": "select", "table": "Port", "where": where_name(name),
                              "columns": ["_uuid"]})[0]["rows"]
        if not rows:
            return False
        u = rows[0]["_uuid"]
        where = where_name(bridge) if bridge else [["ports", "includes", u]]
        return bool(self.transact({"op": "mutate", "table": "Bridge", "where": where,
                                   "mutations": [["ports", "delete", ["set", [u]]]]},
                                  what="port %s" % name)[0]["count"])

    def delete_ports(self, bridge, names):
        """Remove many ports of `bridge` in one transaction."""
        ports = self.ports(bridge)
        uuids = [["uuid", ports[n].uuid] for n in names if n in ports]
        if uuids:
            self.transact({"op": "mutate", "table": "Bridge", "where": where_name(bridge),
                           "mutations": [["ports", "delete", ["set", uuids]]]},
                          what="ports of %s" % bridge)
        return len(uuids)

    def ports(self, bridge):
        """{name: Port} of `bridge`, with ofport and error of each interface."""
        r = self.transact(
            {"op": "select", "table": "Bridge", "where": where_name(bridge),
             "columns": ["ports"]},
            {"op": "select", "table": "Port", "where": [],
             "columns": ["_uuid", "name", "interfaces", "protected", "external_ids"]},
            {"op": "select", "table": "Interface", "where": [],
             "columns": ["_uuid", "ofport", "error"]})
        if not r[0]["rows"]:
            raise NoSuchBridge("no bridge %s in ovsdb" % bridge)
        mine = {uuid_of(u) for u in from_set(r[0]["rows"][0]["ports"])}
        ifaces = {uuid_of(row["_uuid"]): row for row in r[2]["rows"]}
        out = {}
        for row in r[1]["rows"]:
            u = uuid_of(row["_uuid"])
            if u not in mine:
                continue
            ofport, error = None, ""
            for i in from_set(row["interfaces"]):
                iface = ifaces.get(uuid_of(i))
                if iface is not None:
                    ofport = optional(iface["ofport"])
                    error = optional(iface["error"]) or ""
            out[row["name"]] = Port(row["name"], u, bool(row["protected"]),
                                    from_map(row["external_ids"]), ofport, error)
        return out

    def ofport(self, name, timeout=10.0):
        """Interface `name`'s OpenFlow port number, once ovs-vswitchd has
        opened it: the server waits (a `wait` op) instead of us polling."""
        ops = [
            {"op": "wait", "table": "Interface", "where": where_name(name),
             "columns": ["ofport"], "until": "!=", "rows": [{"ofport": ["set", []]}],
             "timeout": int(timeout * 1000)},
            {"op": "select", "table": "Interface", "where": where_name(name),
             "columns": ["ofport", "error"]},
        ]
        # The server answers when the wait ends: read for longer than that.
        self.sock.settimeout(timeout + self.timeout)
        try:
            rows = self.transact(*ops, what="interface %s" % name)[1]["rows"]
        except TransactionError as e:
            if e.error == "timed out":
                raise PortError("ovs-vswitchd has not taken up %s after %g s (is it "
                                "running?)" % (name, timeout)) from None
            raise
        finally:
            self.sock.settimeout(self.timeout)
        if not rows:
            raise PortError("no interface %s in ovsdb" % name)
        n = optional(rows[0]["ofport"])
        if n is None or n < 0:
            raise PortError("ovs-vswitchd cannot use %s: %s"
                            % (name, optional(rows[0]["error"]) or "ofport %s" % n))
        return n

    def wait_applied(self, timeout=10.0):
        """Until ovs-vswitchd has applied the database as it is now (cur_cfg
        reaches next_cfg, which we bump)."""
        r = self.transact({"op": "mutate", "table": "Open_vSwitch", "where": [],
                           "mutations": [["next_cfg", "+=", 1]]},
                          {"op": "select", "table": "Open_vSwitch", "where": [],
                           "columns": ["next_cfg"]})
        want = r[1]["rows"][0]["next_cfg"]
        end = time.monotonic() + timeout
        while True:
            cur = self.transact({"op": "select", "table": "Open_vSwitch", "where": [],
                                 "columns": ["cur_cfg"]})[0]["rows"][0]["cur_cfg"]
            if cur >= want:
                return
            if time.monotonic() > end:
                raise PortError("ovs-vswitchd has not applied the database after %g s "
                                "(is it running?)" % timeout)
            time.sleep(0.01)
