"""nf_tables over NETLINK_NETFILTER: set elements, listings, rule checks.

What nft does for `add element`, `delete element` and `list map`, without
its process: nfnetlink batches (BEGIN, messages, END in one datagram) and
dumps. Constants from include/uapi/linux/netfilter/nf_tables.h and
nfnetlink.h; behaviour as net/netfilter/nf_tables_api.c and nfnetlink.c.
Netlink headers are host order; nf_tables integer attributes big-endian.
Tables, chains and rules are still made by `nft -f` (filters.py).
"""

import errno
# C modules, not socket.py and struct.py: a CGI lease on the kernel data
# plane comes here, and socket.py alone loads enum, selectors and os.
import _socket
import _struct as struct

from . import netlink as nl

# include/uapi/linux/netfilter/nfnetlink.h
NFNETLINK_V0 = 0
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10         # NLMSG_MIN_TYPE
NFNL_MSG_BATCH_END = 0x11
NFNL_BATCH_GENID = 1

# enum nf_tables_msg_types
NFT_MSG_GETRULE = 7
NFT_MSG_NEWSETELEM = 12
NFT_MSG_GETSETELEM = 13
NFT_MSG_DELSETELEM = 14
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16

NFTA_RULE_TABLE = 1
NFTA_RULE_CHAIN = 2
NFTA_RULE_USERDATA = 7

NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_DATA_VALUE = 1
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2
NFTA_GEN_ID = 1

NFT_JUMP = -3
IFNAMSIZ = 16

# include/uapi/linux/netfilter.h
FAMILIES = {"inet": 1, "bridge": 7}

NFGENMSG = struct.Struct("=BBH")     # family, version, res_id (big-endian)
_BE32 = struct.Struct("!i")


def nfgenmsg(family=0, res_id=0):
    return NFGENMSG.pack(family, NFNETLINK_V0, _socket.htons(res_id))


def ifname_key(name):
    """An ifname set key: the name's bytes, NUL-padded to IFNAMSIZ, as the
    kernel compares all 16."""
    raw = name.encode()
    if not 0 < len(raw) < IFNAMSIZ:
        raise ValueError("bad interface name %r for a set key" % (name,))
    return raw + b"\0" * (IFNAMSIZ - len(raw))


def _element(key, chain=None):
    e = nl.attr_nest(NFTA_SET_ELEM_KEY, nl.attr(NFTA_DATA_VALUE, key))
    if chain is not None:
        verdict = nl.attr(NFTA_VERDICT_CODE, _BE32.pack(NFT_JUMP)) + \
            nl.attr_str(NFTA_VERDICT_CHAIN, chain)
        e += nl.attr_nest(NFTA_SET_ELEM_DATA, nl.attr_nest(NFTA_DATA_VERDICT, verdict))
    return nl.attr_nest(NFTA_LIST_ELEM, e)


def setelem_payload(family, table, set_name, elements):
    """NEWSETELEM/DELSETELEM body for elements [(key bytes, jump chain or
    None)]. Never empty: DELSETELEM without elements flushes the set."""
    if not elements:
        raise ValueError("no elements")
    return nfgenmsg(FAMILIES[family]) + nl.attr_str(NFTA_SET_ELEM_LIST_TABLE, table) + \
        nl.attr_str(NFTA_SET_ELEM_LIST_SET, set_name) + \
        nl.attr_nest(NFTA_SET_ELEM_LIST_ELEMENTS, *(_element(k, c) for k, c in elements))


def batch(messages, seq, genid=0):
    """One datagram: BEGIN, messages [(NFT_MSG_*, flags, payload)], END.
    Each message gets NLM_F_REQUEST|NLM_F_ACK and seq+1, seq+2, ...;
    a genid makes the kernel refuse the batch (ERESTART) if the ruleset
    changed since it was read."""
    begin = nfgenmsg(0, NFNL_SUBSYS_NFTABLES)
    if genid:
        begin += nl.attr(NFNL_BATCH_GENID, struct.pack("!I", genid))
    out = [nl.message(NFNL_MSG_BATCH_BEGIN, nl.NLM_F_REQUEST, seq, begin)]
    for i, (msg, flags, payload) in enumerate(messages, 1):
        out.append(nl.message(NFNL_SUBSYS_NFTABLES << 8 | msg,
                              nl.NLM_F_REQUEST | nl.NLM_F_ACK | flags, seq + i, payload))
    out.append(nl.message(NFNL_MSG_BATCH_END, nl.NLM_F_REQUEST, seq + len(messages) + 1,
                          nfgenmsg(0, NFNL_SUBSYS_NFTABLES)))
    return b"".join(out)


def parse_elements(body):
    """{key bytes: jump chain or None} of one NEWSETELEM message body."""
    attrs = nl.parse_attrs(body, NFGENMSG.size)
    out = {}
    for _t, elem in nl.parse_attr_list(attrs.get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")):
        e = nl.parse_attrs(elem)
        key = nl.parse_attrs(e.get(NFTA_SET_ELEM_KEY, b"")).get(NFTA_DATA_VALUE)
        if key is None:
            continue
        verdict = nl.parse_attrs(nl.parse_attrs(e.get(NFTA_SET_ELEM_DATA, b"")).get(
            NFTA_DATA_VERDICT, b""))
        out[key] = nl.get_str(verdict, NFTA_VERDICT_CHAIN)
    return out


class Nftables(nl.Closing):
    """A NETLINK_NETFILTER socket in the calling thread's network namespace."""

    def __init__(self):
        self.sock = nl.Socket(nl.NETLINK_NETFILTER)

    def _recv(self):
        data, _anc, flags, _a = self.sock.sock.recvmsg(nl.RECV_SIZE)
        if flags & _socket.MSG_TRUNC:
            raise nl.NetlinkError(errno.EMSGSIZE, "", "nf_tables reply truncated")
        return data

    def commit(self, messages, genid=0, what="nf_tables batch"):
        """Send one batch and wait for every message's answer; raise the
        first error (then the kernel applied none of it)."""
        s = self.sock
        seq = s._next_seq()
        if seq + len(messages) + 1 > 0xFFFFFFFF:
            s.seq = 0
            seq = s._next_seq()
        s.seq = (seq + len(messages) + 1) & 0xFFFFFFFF
        s.sock.send(batch(messages, seq, genid))
        waiting = set(range(seq + 1, seq + len(messages) + 1))
        first = None
        while waiting:
            data = self._recv()
            for mtype, flags, mseq, start, end in nl.split_messages(data):
                if mtype != nl.NLMSG_ERROR or not seq <= mseq <= seq + len(messages):
                    continue
                err, ext = nl.parse_error(flags, data[start:end])
                if mseq == seq:         # the batch as a whole: nothing follows
                    raise nl.NetlinkError(err, ext, what)
                waiting.discard(mseq)
                if err and first is None:
                    first = nl.NetlinkError(err, ext, what)
        if first is not None:
            raise first

    def genid(self):
        """The ruleset's generation: every committed change moves it."""
        for _t, body in self.sock.request(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN, 0,
                                          nfgenmsg(), "nf_tables generation"):
            v = nl.parse_attrs(body, NFGENMSG.size).get(NFTA_GEN_ID)
            if v and len(v) == 4:
                return struct.unpack("!I", v)[0]
        raise nl.NetlinkError(errno.EPROTO, "", "nf_tables generation: no id")

    def _dump(self, msg, family, attrs, what):
        """(body, generation's low 16 bits) of each part of a dump."""
        payload = nfgenmsg(FAMILIES[family]) + attrs
        for _t, body in self.sock.dump(NFNL_SUBSYS_NFTABLES << 8 | msg, payload, what):
            yield body, _socket.ntohs(NFGENMSG.unpack_from(body)[2])

    def elements(self, family, table, set_name, genid=None):
        """{key bytes: jump chain or None} of a set or map. With genid, raise
        ERESTART if the ruleset moved past it during the dump."""
        out = {}
        attrs = nl.attr_str(NFTA_SET_ELEM_LIST_TABLE, table) + \
            nl.attr_str(NFTA_SET_ELEM_LIST_SET, set_name)
        for body, gen in self._dump(NFT_MSG_GETSETELEM, family, attrs,
                                    "nf_tables %s %s %s" % (family, table, set_name)):
            if genid is not None and gen != genid & 0xFFFF:
                raise nl.NetlinkError(errno.ERESTART, "", "nf_tables ruleset changed")
            out.update(parse_elements(body))
        return out

    def add_elements(self, family, table, set_name, elements, genid=0):
        """Map keys to jump chains, {key: chain}, in one transaction. A key
        already mapped elsewhere is EEXIST."""
        self.commit([(NFT_MSG_NEWSETELEM, nl.NLM_F_CREATE,
                      setelem_payload(family, table, set_name, sorted(elements.items())))],
                    genid, "add element %s %s %s" % (family, table, set_name))

    def delete_elements(self, family, table, set_name, keys, genid=0):
        """Remove keys in one transaction; one absent key (ENOENT) fails all."""
        self.commit([(NFT_MSG_DELSETELEM, 0, setelem_payload(
            family, table, set_name, [(k, None) for k in sorted(keys)]))],
            genid, "delete element %s %s %s" % (family, table, set_name))

    def replace_elements(self, family, table, set_name, delete, add, genid=0):
        """Delete keys and add {key: chain} in one transaction (a key may be
        in both: that re-points it)."""
        msgs = []
        if delete:
            msgs.append((NFT_MSG_DELSETELEM, 0, setelem_payload(
                family, table, set_name, [(k, None) for k in sorted(delete)])))
        if add:
            msgs.append((NFT_MSG_NEWSETELEM, nl.NLM_F_CREATE,
                         setelem_payload(family, table, set_name, sorted(add.items()))))
        if msgs:
            self.commit(msgs, genid, "elements of %s %s %s" % (family, table, set_name))

    def rules(self, family, table):
        """[(chain, rule userdata bytes)] of every rule in table, in chain
        order; ENOENT (NetlinkError) if there is no such table."""
        out = []
        want = frozenset((NFTA_RULE_CHAIN, NFTA_RULE_USERDATA))
        for body, _gen in self._dump(NFT_MSG_GETRULE, family,
                                     nl.attr_str(NFTA_RULE_TABLE, table),
                                     "nf_tables rules of %s %s" % (family, table)):
            a = nl.parse_attrs(body, NFGENMSG.size, wanted=want)
            out.append((nl.get_str(a, NFTA_RULE_CHAIN, ""), a.get(NFTA_RULE_USERDATA, b"")))
        return out
