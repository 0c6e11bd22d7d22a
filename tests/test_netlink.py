"""Netlink framing against byte-exact vectors worked out from the uapi headers."""

import errno
import os
import socket
import struct

import pytest

from microbroker import l2tp, netlink as nl, rtnl

A6 = "fc00::1"
B6 = "fc00::2"


def h(s):
    return bytes.fromhex("".join(s.split()))


def test_tunnel_create_matches_ipl2tp_bytes():
    body = nl.genl_header(l2tp.L2TP_CMD_TUNNEL_CREATE, 1) + \
        l2tp.tunnel_attrs(100, 200, A6, B6, encap="ip")
    msg = nl.message(0x1d, nl.NLM_F_REQUEST | nl.NLM_F_ACK, 1, body)
    want = h("""5c000000 1d00 0500 01000000 00000000 01010000
        08000900 64000000 08000a00 c8000000 05000700 03000000 06000200 01000000
        14001f00 fc000000000000000000000000000001
        14002000 fc000000000000000000000000000002""")
    assert len(msg) == 92
    assert msg == want


def test_session_create_matches_ipl2tp_bytes():
    body = nl.genl_header(l2tp.L2TP_CMD_SESSION_CREATE, 1) + \
        l2tp.session_attrs(100, 1000, 2000, ifname="l2tpeth0")
    msg = nl.message(0x1d, nl.NLM_F_REQUEST | nl.NLM_F_ACK, 2, body)
    # As the reference sample, plus PEER_CONN_ID 0 that ipl2tp.c also sends.
    want = h("""5c000000 1d00 0500 02000000 00000000 05010000
        08000900 64000000 08000a00 00000000 08000b00 e8030000 08000c00 d0070000
        06000100 05000000 05000500 01000000 05000600 04000000
        0d000800 6c327470 65746830 00000000""")
    assert msg == want


def test_udp_ipv4_tunnel_attrs():
    a = nl.parse_attrs(l2tp.tunnel_attrs(5, 6, "192.0.2.1", "192.0.2.2", encap="udp",
                                         udp_sport=1701, udp_dport=1702))
    assert a[l2tp.L2TP_ATTR_ENCAP_TYPE] == b"\0\0"
    assert a[l2tp.L2TP_ATTR_IP_SADDR] == bytes([192, 0, 2, 1])  # network order
    assert a[l2tp.L2TP_ATTR_UDP_SPORT] == struct.pack("=H", 1701)  # host order
    assert l2tp.L2TP_ATTR_UDP_CSUM not in a  # presence alone would switch it on


def test_udp_ipv6_turns_zero_checksums_on_as_flags():
    a = nl.parse_attrs(l2tp.tunnel_attrs(5, 6, A6, B6, encap="udp", udp_sport=1, udp_dport=2))
    assert a[l2tp.L2TP_ATTR_UDP_ZERO_CSUM6_TX] == b""
    assert a[l2tp.L2TP_ATTR_UDP_ZERO_CSUM6_RX] == b""


@pytest.mark.parametrize("args", [
    (0, 1, A6, B6), (1, 0, A6, B6), (1 << 32, 1, A6, B6), (1, 2, A6, "192.0.2.1"),
    (1, 2, "nonsense", B6)])
def test_tunnel_attrs_reject_what_the_kernel_would(args):
    with pytest.raises(ValueError):
        l2tp.tunnel_attrs(*args)


@pytest.mark.parametrize("text", ["fc00::1", "::", "::ffff:192.0.2.1", "2001:db8::1:0:0:1",
                                  "192.0.2.1", "0.0.0.0"])
def test_addresses_packed_as_ipaddress_packs_them(text):
    import ipaddress
    a = ipaddress.ip_address(text)
    assert nl.addr_packed(text) == (a.version, a.packed)


@pytest.mark.parametrize("text", ["", "nonsense", "fc00::1::2", "192.0.2", "192.0.2.256",
                                  "fe80::1%eth0", " fc00::1", "fc00::1/64", None, b"fc00::1"])
def test_addresses_that_are_not_are_refused(text):
    with pytest.raises(ValueError):
        nl.addr_packed(text)


def test_the_kernel_layer_loads_no_ipaddress():
    """A CGI lease of an L2TPv3 or GRE service imports the kernel layer:
    ipaddress (with functools and its tables) would be a fifth of its start."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, %r); "
                          "import microbroker.dataplane; print('ipaddress' in sys.modules)"
                          % os.path.dirname(os.path.dirname(os.path.abspath(__file__)))],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("name", ["", "a" * 16, "a/b", "a b", "x:y", "..", "a\nb"])
def test_interface_names_are_checked(name):
    with pytest.raises(ValueError):
        rtnl.check_ifname(name)
    with pytest.raises(ValueError):
        l2tp.session_attrs(1, 1, 1, ifname=name)


def test_cookie_length_checked():
    with pytest.raises(ValueError):
        l2tp.session_attrs(1, 1, 1, cookie=b"abc")
    a = nl.parse_attrs(l2tp.session_attrs(1, 1, 1, cookie=b"abcd", peer_cookie=b"12345678"))
    assert a[l2tp.L2TP_ATTR_COOKIE] == b"abcd"
    assert a[l2tp.L2TP_ATTR_PEER_COOKIE] == b"12345678"


def test_attribute_padding_and_nesting():
    assert nl.attr_u8(7, 3) == h("05000700 03000000")
    assert nl.attr_str(3, "ab") == h("07000300 61620000")
    assert nl.attr_flag(33) == h("04002100")
    nest = nl.attr_nest(12, nl.attr_u8(33, 1))
    assert nest == h("0c000c80 05002100 01000000")
    # Parsing masks NLA_F_NESTED; the kernel sends some nests without it.
    (payload,) = nl.parse_attrs(nest).values()
    assert nl.parse_attrs(nest) == {12: payload}
    assert nl.get_u8(nl.parse_attrs(payload), 33) == 1


def test_stats_nest_parsed_without_nested_flag():
    stats = b"".join(nl.attr_u64(t, v) for t, v in ((1, 10), (2, 1000), (4, 7), (5, 700),
                                                     (9, 0), (8, 2)))
    attrs = nl.attr_u32(l2tp.L2TP_ATTR_CONN_ID, 3) + nl.attr(l2tp.L2TP_ATTR_STATS, stats) + \
        nl.attr(l2tp.L2TP_ATTR_IP6_SADDR, bytes(16)) + nl.attr(l2tp.L2TP_ATTR_IP6_DADDR,
                                                               bytes(15) + b"\1")
    t = l2tp._tunnel(nl.parse_attrs(attrs))
    assert t.stats == l2tp.Stats(10, 1000, 0, 7, 700, 2)
    assert (t.tunnel_id, t.local, t.remote) == (3, "::", "::1")


def test_error_with_extended_ack_capped_and_uncapped():
    inner = nl.NLMSGHDR.pack(40, 0x1d, 5, 9, 0)
    tlv = nl.attr_str(nl.NLMSGERR_ATTR_MSG, "Unknown device type")
    capped = struct.pack("=i", -errno.EOPNOTSUPP) + inner + tlv
    assert nl.parse_error(nl.NLM_F_CAPPED | nl.NLM_F_ACK_TLVS, capped) == \
        (errno.EOPNOTSUPP, "Unknown device type")
    uncapped = struct.pack("=i", -errno.EINVAL) + inner + bytes(24) + tlv
    assert nl.parse_error(nl.NLM_F_ACK_TLVS, uncapped) == (errno.EINVAL, "Unknown device type")
    assert nl.parse_error(0, struct.pack("=i", 0) + inner) == (0, "")


class FakeKernel:
    """The far end of a datagram socketpair, answering with prepared datagrams."""

    def __init__(self):
        self.sock = nl.Socket.__new__(nl.Socket)
        self.sock.sock, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.seq = 0

    def reply(self, *msgs):
        self.kernel.send(b"".join(msgs))

    def sent(self):
        return self.kernel.recv(65536)


def ack(seq, err=0):
    return nl.message(nl.NLMSG_ERROR, nl.NLM_F_CAPPED, seq,
                      struct.pack("=i", err) + nl.NLMSGHDR.pack(16, 0, 0, seq, 0))


def test_request_skips_stale_messages_and_raises_errors():
    k = FakeKernel()
    # A stale answer to an older request, then our error.
    k.reply(ack(0), ack(1, -errno.EEXIST))
    with pytest.raises(nl.NetlinkError) as ei:
        k.sock.request(0x1d, 0, b"", "tunnel 1")
    assert ei.value.errno == errno.EEXIST and "tunnel 1" in str(ei.value)
    sent = k.sent()
    assert nl.NLMSGHDR.unpack_from(sent) == (16, 0x1d, nl.NLM_F_REQUEST | nl.NLM_F_ACK, 1, 0)


def test_request_returns_replies_before_the_ack():
    k = FakeKernel()
    body = nl.genl_header(4, 1) + nl.attr_u32(9, 42)
    k.reply(nl.message(0x1d, nl.NLM_F_ACK, 1, body), ack(1))
    (reply,) = k.sock.request(0x1d, 0, b"")
    assert reply == (0x1d, body)


def test_dump_spans_datagrams_until_done():
    k = FakeKernel()
    parts = [nl.message(0x1d, nl.NLM_F_MULTI, 1, nl.genl_header(4, 1) + nl.attr_u32(9, i))
             for i in range(5)]
    k.reply(*parts[:2])
    k.reply(*parts[2:])
    k.reply(nl.message(nl.NLMSG_DONE, nl.NLM_F_MULTI, 1, struct.pack("=i", 0)))
    got = [nl.get_u32(nl.parse_attrs(b, 4), 9) for _t, b in k.sock.dump(0x1d, b"")]
    assert got == [0, 1, 2, 3, 4]
    flags = nl.NLMSGHDR.unpack_from(k.sent())[2]
    assert flags & nl.NLM_F_DUMP == nl.NLM_F_DUMP


def test_dump_error_before_start():
    k = FakeKernel()
    k.reply(ack(1, -errno.EPERM))
    with pytest.raises(nl.NetlinkError) as ei:
        list(k.sock.dump(0x1d, b""))
    assert ei.value.errno == errno.EPERM


def test_real_controller_resolves_nlctrl_and_reports_missing_family():
    # The host kernel has generic netlink but (on these machines) no l2tp.
    with nl.Socket(nl.NETLINK_GENERIC) as s:
        assert nl.resolve_family(s, "nlctrl") == nl.GENL_ID_CTRL
        with pytest.raises(nl.FamilyNotFound):
            nl.resolve_family(s, "no-such-family")


def test_missing_l2tp_says_which_modules_to_load():
    ok, why = l2tp.available()
    if ok:
        pytest.skip("this kernel has l2tp: the missing-module path cannot be shown here")
    assert "modprobe l2tp_netlink l2tp_eth l2tp_ip6" in why


def test_real_rtnl_reads_loopback():
    with rtnl.Rtnl() as rt:
        lo = rt.link("lo")
        assert lo.index == socket.if_nametoindex("lo") and lo.flags & rtnl.IFF_UP
        assert "lo" in [l.name for l in rt.links()]
        with pytest.raises(rtnl.NoSuchLink, match="nosuchif0"):
            rt.link("nosuchif0")


def test_wanted_skips_other_attributes_and_stats_can_be_left_out():
    data = nl.attr_u32(1, 7) + nl.attr_str(3, "mb1") + nl.attr(30, bytes(40)) + nl.attr_u16(4, 9)
    assert nl.parse_attrs(data, wanted={3, 4}) == {3: b"mb1\0", 4: b"\x09\0"}
    attrs = nl.parse_attrs(nl.attr_u32(l2tp.L2TP_ATTR_CONN_ID, 3) +
                           nl.attr(l2tp.L2TP_ATTR_STATS, nl.attr_u64(1, 5)),
                           wanted=l2tp._NO_STATS)
    t = l2tp._tunnel(attrs)
    assert t.tunnel_id == 3 and t.stats == l2tp.ZERO_STATS


def _dump_of(cmd, messages):
    """A fake genl socket answering one dump with these attribute blobs."""
    class Sock:
        def send(self, data):
            seq = nl.NLMSGHDR.unpack_from(data)[3]
            parts = [nl.message(0x20, nl.NLM_F_MULTI, seq, nl.genl_header(cmd, 1) + m)
                     for m in messages]
            self.out = [b"".join(parts), nl.message(nl.NLMSG_DONE, nl.NLM_F_MULTI, seq,
                                                     struct.pack("=i", 0))]
            return len(data)

        def recv(self, n):
            return self.out.pop(0)
    s = nl.GenlSocket.__new__(nl.GenlSocket)
    s.family_id, s.version, s.seq, s.sock = 0x20, 1, 1, Sock()
    l2 = l2tp.L2TP.__new__(l2tp.L2TP)
    l2.sock = s
    return l2


def _stats_nest():
    return nl.attr(l2tp.L2TP_ATTR_STATS, b"".join(nl.attr_u64(i, 99) for i in range(1, 11)))


def test_reconcile_reads_of_tunnels_and_sessions_agree_with_the_full_dumps():
    # Attribute order as l2tp_nl_tunnel_send / l2tp_nl_session_send write them.
    a6, b6 = (socket.inet_pton(socket.AF_INET6, "fc00::%d" % i) for i in (1, 2))
    tunnels = [nl.attr_u32(l2tp.L2TP_ATTR_CONN_ID, 7) + nl.attr_u32(l2tp.L2TP_ATTR_PEER_CONN_ID, 8) +
               nl.attr_u8(l2tp.L2TP_ATTR_PROTO_VERSION, 3) +
               nl.attr_u16(l2tp.L2TP_ATTR_ENCAP_TYPE, l2tp.L2TP_ENCAPTYPE_IP) + _stats_nest() +
               nl.attr(l2tp.L2TP_ATTR_IP6_SADDR, a6) + nl.attr(l2tp.L2TP_ATTR_IP6_DADDR, b6),
               nl.attr_u32(l2tp.L2TP_ATTR_CONN_ID, 9) + nl.attr_u32(l2tp.L2TP_ATTR_PEER_CONN_ID, 1) +
               nl.attr_u16(l2tp.L2TP_ATTR_ENCAP_TYPE, l2tp.L2TP_ENCAPTYPE_UDP) + _stats_nest() +
               nl.attr(l2tp.L2TP_ATTR_IP_SADDR, socket.inet_aton("10.0.0.1")) +
               nl.attr(l2tp.L2TP_ATTR_IP_DADDR, socket.inet_aton("10.0.0.2"))]
    full = _dump_of(l2tp.L2TP_CMD_TUNNEL_GET, tunnels).tunnels(stats=False)
    assert _dump_of(l2tp.L2TP_CMD_TUNNEL_GET, tunnels).tunnel_remotes() == \
        {t.tunnel_id: t.remote for t in full} == {7: "fc00::2", 9: "10.0.0.2"}
    sessions = [nl.attr_u32(l2tp.L2TP_ATTR_CONN_ID, t) + nl.attr_u32(l2tp.L2TP_ATTR_SESSION_ID, s) +
                nl.attr_u32(l2tp.L2TP_ATTR_PEER_CONN_ID, 1) +
                nl.attr_u32(l2tp.L2TP_ATTR_PEER_SESSION_ID, 2) +
                nl.attr_u16(l2tp.L2TP_ATTR_PW_TYPE, l2tp.L2TP_PWTYPE_ETH) +
                nl.attr_str(l2tp.L2TP_ATTR_IFNAME, "mb%d" % t) + _stats_nest()
                for t, s in ((7, 70), (7, 71), (9, 90))]
    full = _dump_of(l2tp.L2TP_CMD_SESSION_GET, sessions).sessions(stats=False)
    assert _dump_of(l2tp.L2TP_CMD_SESSION_GET, sessions).session_ids() == \
        {(s.tunnel_id, s.session_id) for s in full} == {(7, 70), (7, 71), (9, 90)}


def test_wanted_keeps_the_first_of_a_type():
    data = nl.attr_u32(3, 1) + nl.attr_u32(4, 2) + nl.attr_u32(3, 5) + b"\xff\x00\x05"
    assert nl.parse_attrs(data, wanted={3, 4}) == {3: struct.pack("=I", 1),
                                                   4: struct.pack("=I", 2)}
    assert nl.parse_attrs(data)[3] == struct.pack("=I", 5)


# ---- nf_tables (reference: /work/shared/reference/nftables-netlink.md, section 10,
# a batch nft 1.0.6 and the 6.1 kernel agreed on) ----------------------------

from microbroker import nftables as nft  # noqa: E402

NEWSETELEM_BATCH = h("""
    14000000 1000 0100 10970e00 00000000 0000000a
    6c000000 0c0a 0504 11970e00 00000000 07000000
    1000 0100 6d696372 6f62726f 6b657200
    0b00 0200 69667072 6f660000
    3c00 0380 3800 0180 1800 0180
    1400 0100 6c327470 2d613100 00000000 00000000
    1c00 0280 1800 0280 0800 0100 fffffffd
    0b00 0200 70726f66 5f610000
    14000000 1100 0100 12970e00 00000000 0000000a""")


def test_nft_add_element_batch_matches_nft_bytes():
    body = nft.setelem_payload("bridge", "microbroker", "ifprof",
                               [(nft.ifname_key("l2tp-a1"), "prof_a")])
    msg = nft.batch([(nft.NFT_MSG_NEWSETELEM, nl.NLM_F_CREATE, body)], 0x0e9710)
    assert len(msg) == 148
    assert msg == NEWSETELEM_BATCH


def test_nft_delete_element_is_the_same_without_data():
    body = nft.setelem_payload("bridge", "microbroker", "ifprof",
                               [(nft.ifname_key("l2tp-a1"), None)])
    msg = nft.batch([(nft.NFT_MSG_DELSETELEM, 0, body)], 0x0e9710)
    want = bytearray(NEWSETELEM_BATCH)
    del want[0x64:0x80]                              # SET_ELEM_DATA, 28 bytes
    want[0x14:0x1a] = h("50000000 0e0a")             # len 108 - 28, DELSETELEM
    want[0x1a:0x1c] = h("0500")                      # REQUEST|ACK
    want[0x44:0x46], want[0x48:0x4a] = h("2000"), h("1c00")   # nests shrink by 28
    assert msg == bytes(want)


def test_nft_batch_carries_the_generation_it_was_computed_from():
    msg = nft.batch([], 7, genid=0x01020304)
    n, mtype, _f, seq, _p = nl.NLMSGHDR.unpack_from(msg)
    assert (n, mtype, seq) == (28, nft.NFNL_MSG_BATCH_BEGIN, 7)
    assert msg[16:28] == h("0000000a 0800 0100 01020304")


def test_nft_elements_never_flush_by_accident():
    # DELSETELEM without LIST_ELEMENTS empties the whole map.
    with pytest.raises(ValueError):
        nft.setelem_payload("bridge", "microbroker", "restrict", [])
    for bad in ("", "a" * 16):
        with pytest.raises(ValueError):
            nft.ifname_key(bad)


def test_nft_dump_reply_parsed_without_nested_flags():
    # The kernel's reply: same attributes, nests without NLA_F_NESTED.
    reply = bytearray(NEWSETELEM_BATCH[0x14:0x80])
    for off in (0x30, 0x34, 0x38, 0x50, 0x54):
        reply[off + 3] &= 0x7f
    body = bytes(reply[20:])
    assert nft.parse_elements(nft.nfgenmsg(7) + body) == {nft.ifname_key("l2tp-a1"): "prof_a"}


class _FakeNfSock:
    """Replays kernel answers to one batch: NLMSG_ERROR per message
    (nfnetlink.c nfnetlink_rcv_batch, nfnl_err_deliver)."""

    def __init__(self, answers):
        self.seq, self.sent, self.answers = 100, [], answers
        self.sock = self

    def _next_seq(self):
        self.seq += 1
        return self.seq

    def send(self, data):
        self.sent.append(data)

    def recvmsg(self, n):
        seq = self.seq - 3                  # BEGIN's (two messages, END after them)
        out = b""
        for off, err in self.answers.pop(0):
            out += nl.message(nl.NLMSG_ERROR, nl.NLM_F_CAPPED, seq + off,
                              struct.pack("=i", -err) + nl.NLMSGHDR.pack(16, 0, 0, seq + off, 0))
        return out, [], 0, None


def _nft_with(answers):
    n = nft.Nftables.__new__(nft.Nftables)
    n.sock = _FakeNfSock(answers)
    return n


def test_nft_commit_waits_for_every_message_and_raises_the_first_error():
    n = _nft_with([[(1, 0)], [(9, 0), (2, errno.ENOENT)]])   # a stale seq in between
    with pytest.raises(nl.NetlinkError) as e:
        n.commit([(nft.NFT_MSG_DELSETELEM, 0, b""), (nft.NFT_MSG_NEWSETELEM, 0, b"")])
    assert e.value.errno == errno.ENOENT and not n.sock.answers
    # A batch refused as a whole (stale generation) answers on BEGIN's seq only.
    n = _nft_with([[(0, errno.ERESTART)]])
    with pytest.raises(nl.NetlinkError) as e:
        n.commit([(nft.NFT_MSG_DELSETELEM, 0, b""), (nft.NFT_MSG_NEWSETELEM, 0, b"")], genid=5)
    assert e.value.errno == errno.ERESTART
    n = _nft_with([[(2, 0), (1, 0)]])
    n.commit([(nft.NFT_MSG_DELSETELEM, 0, b""), (nft.NFT_MSG_NEWSETELEM, 0, b"")])


def test_a_refusal_names_its_object_and_reason_once():
    e = nl.NetlinkError(errno.EXFULL, "", "mb1024 port of br-x")
    assert str(rtnl._error(e, "mb1024 port of br-x")) == \
        "[Errno 54] mb1024 port of br-x: Exchange full"
    e = nl.NetlinkError(errno.EINVAL, "bad attr", "l2tp tunnel 5")
    assert str(l2tp._error(e, "l2tp tunnel 5")) == \
        "[Errno 22] l2tp tunnel 5: Invalid argument (bad attr)"


def _captured(call):
    """The (type, flags, payload) an Rtnl method would send, no socket."""
    sent = []
    rt = object.__new__(rtnl.Rtnl)
    rt._do = lambda mtype, flags, payload, what: sent.append((mtype, flags, payload)) or []
    call(rt)
    return sent


def test_bridge_snooping_is_sent_in_the_bridges_info_data_and_read_back():
    # IFLA_LINKINFO { IFLA_INFO_KIND "bridge", IFLA_INFO_DATA (nested) {
    # IFLA_BR_MCAST_SNOOPING (23): u8 0 } }, as `ip link add NAME type bridge
    # mcast_snooping 0` asks (iproute2 leaves NLA_F_NESTED off; the kernel
    # reads both)
    data = struct.pack("=HHB3x", 5, 23, 0)
    info = struct.pack("=HH", 11, 1) + b"bridge\0\0" + \
        struct.pack("=HH", 4 + len(data), 2 | 0x8000) + data
    for call in (lambda rt: rt.add_bridge("br-x", mcast_snooping=False),
                 lambda rt: rt.set_mcast_snooping("br-x", False)):
        [(mtype, _flags, payload)] = _captured(call)
        assert mtype == rtnl.RTM_NEWLINK
        attrs = nl.parse_attrs(payload, rtnl.IFINFOMSG.size)
        assert attrs[rtnl.IFLA_LINKINFO] == info
        # a link message carrying it (as a dump of the bridge does) reads as off
        assert rtnl._link(payload).mcast_snooping is False
    [(_t, _f, plain)] = _captured(lambda rt: rt.add_bridge("br-x"))
    assert rtnl.IFLA_INFO_DATA not in nl.parse_attrs(
        nl.parse_attrs(plain, rtnl.IFINFOMSG.size)[rtnl.IFLA_LINKINFO])
    assert rtnl._link(plain).mcast_snooping is None
