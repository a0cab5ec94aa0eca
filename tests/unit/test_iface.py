"""The Interface as a protocol trace: frames in, frames out, time passed in.

Every test runs twice: with the C fast paths and with the pure-Python ones.
"""
import ipaddress
import struct

import pytest

from mtcpshim.stack import checksum, native
from mtcpshim.stack.iface import ARP_QUEUE_LIMIT, Interface
from mtcpshim.stack.wire.arp import OP_REPLY, OP_REQUEST, ArpPacket
from mtcpshim.stack.wire.ethernet import BROADCAST, ETHERTYPE_ARP, ETHERTYPE_IPV4, EthernetHeader
from mtcpshim.stack.wire.icmp import TYPE_ECHO_REPLY, TYPE_ECHO_REQUEST, IcmpEcho
from mtcpshim.stack.wire.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, Ipv4Header


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


OUR_MAC = bytes.fromhex("02000000aa01")
PEER_MAC = bytes.fromhex("02000000bb02")
GATEWAY_MAC = bytes.fromhex("02000000cc03")
OUR_IP = ip("198.18.0.2")
PEER_IP = ip("198.18.0.1")
GATEWAY_IP = ip("198.18.0.254")
FAR_IP = ip("198.19.5.5")


ARENA_BYTES = 4096


@pytest.fixture(params=[(True, 0), (True, ARENA_BYTES), (False, 0)], ids=["c", "c-arena", "python"])
def iface(request):
    accelerated, arena = request.param
    if accelerated and not native.ACCELERATED:
        pytest.skip("mtcpshim.stack._netfast not built")
    return Interface(OUR_MAC, OUR_IP, 24, gateway=GATEWAY_IP, arp_timeout=60.0,
                     accelerated=accelerated, frame_arena=arena)


# ---- frames the peer sends --------------------------------------------------

def arp_frame(operation, sender_mac, sender_ip, target_mac, target_ip, eth_dst=None):
    packet = ArpPacket(operation, sender_mac, sender_ip, target_mac, target_ip)
    dst = eth_dst or (BROADCAST if operation == OP_REQUEST else target_mac)
    return EthernetHeader(dst, sender_mac, ETHERTYPE_ARP).emit(packet.emit()) + bytes(18)


def ip_frame(protocol, payload, src=PEER_IP, dst=OUR_IP, eth_dst=OUR_MAC, **fields):
    packet = Ipv4Header(src, dst, protocol, **fields).emit(payload)
    return EthernetHeader(eth_dst, PEER_MAC, ETHERTYPE_IPV4).emit(packet)


def tcp_segment(src=PEER_IP, dst=OUR_IP, payload=b"", valid=True):
    """A minimal TCP header (ports 40000 -> 80, ACK) with a real checksum."""
    segment = bytearray(struct.pack("!HHIIBBHHH", 40000, 80, 1, 2, 5 << 4, 0x10, 65535, 0, 0))
    segment += payload
    tcp_sum = checksum.internet_checksum(
        segment, checksum.pseudo_header_sum(src, dst, PROTO_TCP, len(segment)))
    segment[16:18] = (tcp_sum ^ (0 if valid else 1)).to_bytes(2, "big")
    return bytes(segment)


def peer_says_hello(iface, now=0.0):
    """The peer resolves us, so we learn its MAC (and answer)."""
    iface.receive(arp_frame(OP_REQUEST, PEER_MAC, PEER_IP, bytes(6), OUR_IP), now)
    return iface.take_frames()


def parse_ip_frame(frame):
    ethernet, payload = EthernetHeader.parse(frame)
    header, payload = Ipv4Header.parse(payload)
    return ethernet, header, bytes(payload)


# ---- ARP --------------------------------------------------------------------

def test_arp_request_for_us_is_answered_and_its_sender_learned(iface):
    [reply] = peer_says_hello(iface)
    ethernet, payload = EthernetHeader.parse(reply)
    assert ethernet == EthernetHeader(PEER_MAC, OUR_MAC, ETHERTYPE_ARP)
    assert ArpPacket.parse(payload) == ArpPacket(OP_REPLY, OUR_MAC, OUR_IP, PEER_MAC, PEER_IP)

    iface.send_ip(PEER_IP, PROTO_UDP, b"hi", now=1.0)       # no ARP needed now
    [frame] = iface.take_frames()
    assert frame[:6] == PEER_MAC
    assert iface.counters["arp_request_rx"] == 1
    assert iface.counters["arp_reply_tx"] == 1
    assert iface.deadline() is None


def test_a_worker_that_does_not_answer_arp_still_learns_from_it():
    """One of several stack workers on an interface: every ARP frame reaches
    each, and only one may answer."""
    quiet = Interface(OUR_MAC, OUR_IP, 24, answers_arp=False)
    quiet.announce()
    assert peer_says_hello(quiet) == []
    quiet.send_ip(PEER_IP, PROTO_UDP, b"hi", now=1.0)      # learned: no ARP needed
    [frame] = quiet.take_frames()
    assert frame[:6] == PEER_MAC
    assert quiet.counters["arp_reply_tx"] == 0


def test_arp_request_for_someone_else_is_ignored(iface):
    iface.receive(arp_frame(OP_REQUEST, PEER_MAC, PEER_IP, bytes(6), ip("198.18.0.77")), 0.0)
    assert iface.take_frames() == []
    iface.send_ip(PEER_IP, PROTO_UDP, b"hi", now=0.0)       # sender was not learned
    [request] = iface.take_frames()
    assert request[12:14] == b"\x08\x06"


def test_unknown_neighbour_is_resolved_and_queued_frames_follow(iface):
    iface.send_ip(PEER_IP, PROTO_UDP, b"one", now=10.0)
    iface.send_ip(PEER_IP, PROTO_UDP, b"two", now=10.1)
    [request] = iface.take_frames()                         # one request for both
    ethernet, payload = EthernetHeader.parse(request)
    assert ethernet == EthernetHeader(BROADCAST, OUR_MAC, ETHERTYPE_ARP)
    assert ArpPacket.parse(payload) == ArpPacket(OP_REQUEST, OUR_MAC, OUR_IP, bytes(6), PEER_IP)
    assert iface.deadline() == 11.0

    iface.receive(arp_frame(OP_REPLY, PEER_MAC, PEER_IP, OUR_MAC, OUR_IP), 10.2)
    frames = iface.take_frames()
    assert [parse_ip_frame(frame)[2] for frame in frames] == [b"one", b"two"]
    assert all(frame[:6] == PEER_MAC for frame in frames)
    assert iface.deadline() is None
    assert iface.counters["arp_reply_rx"] == 1


def test_unanswered_arp_is_retried_each_second_then_its_frames_dropped(iface):
    iface.send_ip(PEER_IP, PROTO_UDP, b"lost", now=0.0)
    assert len(iface.take_frames()) == 1                    # request 1 at t=0
    iface.on_timer(0.5)
    assert iface.take_frames() == []
    for now in (1.0, 2.0):                                  # requests 2 and 3
        assert iface.deadline() == now
        iface.on_timer(now)
        [request] = iface.take_frames()
        assert ArpPacket.parse(EthernetHeader.parse(request)[1]).target_ip == PEER_IP
    iface.on_timer(3.0)                                     # give up
    assert iface.take_frames() == []
    assert iface.deadline() is None
    assert iface.counters["arp_request_tx"] == 3
    assert iface.counters["arp_unresolved"] == 1


def test_frames_waiting_for_arp_are_bounded(iface):
    for n in range(ARP_QUEUE_LIMIT + 2):
        iface.send_ip(PEER_IP, PROTO_UDP, b"%d" % n, now=0.0)
    iface.take_frames()
    iface.receive(arp_frame(OP_REPLY, PEER_MAC, PEER_IP, OUR_MAC, OUR_IP), 0.1)
    frames = iface.take_frames()
    assert len(frames) == ARP_QUEUE_LIMIT
    assert parse_ip_frame(frames[0])[2] == b"2"             # the oldest were dropped
    assert iface.counters["arp_queue_overflow"] == 2


def test_busy_neighbour_is_refreshed_before_expiry_then_expires(iface):
    peer_says_hello(iface, now=0.0)                          # learned, expires at 60
    iface.send_ip(PEER_IP, PROTO_UDP, b"early", now=30.0)
    assert len(iface.take_frames()) == 1

    iface.send_ip(PEER_IP, PROTO_UDP, b"late", now=58.0)    # 3 s before expiry
    refresh, frame = iface.take_frames()
    ethernet, payload = EthernetHeader.parse(refresh)
    assert ethernet.dst == PEER_MAC                          # unicast probe
    assert ArpPacket.parse(payload).target_ip == PEER_IP
    assert frame[:6] == PEER_MAC

    iface.send_ip(PEER_IP, PROTO_UDP, b"after", now=61.0)   # no answer: expired
    [request] = iface.take_frames()
    assert request[:6] == BROADCAST


def test_refresh_answer_extends_the_entry(iface):
    peer_says_hello(iface, now=0.0)
    iface.send_ip(PEER_IP, PROTO_UDP, b"late", now=58.0)
    iface.take_frames()
    iface.receive(arp_frame(OP_REPLY, PEER_MAC, PEER_IP, OUR_MAC, OUR_IP), 58.001)
    iface.send_ip(PEER_IP, PROTO_UDP, b"later", now=100.0)
    [frame] = iface.take_frames()
    assert frame[:6] == PEER_MAC


def test_off_link_traffic_goes_through_the_gateway(iface):
    iface.send_ip(FAR_IP, PROTO_UDP, b"far", now=0.0)
    [request] = iface.take_frames()
    assert ArpPacket.parse(EthernetHeader.parse(request)[1]).target_ip == GATEWAY_IP
    iface.receive(arp_frame(OP_REPLY, GATEWAY_MAC, GATEWAY_IP, OUR_MAC, OUR_IP), 0.1)
    [frame] = iface.take_frames()
    ethernet, header, _ = parse_ip_frame(frame)
    assert (ethernet.dst, header.dst) == (GATEWAY_MAC, FAR_IP)


def test_without_gateway_off_link_is_unreachable():
    iface = Interface(OUR_MAC, OUR_IP, 24)
    iface.send_ip(FAR_IP, PROTO_UDP, b"far", now=0.0)
    assert iface.frame_tcp(FAR_IP, tcp_segment(dst=FAR_IP), b"", now=0.0) is None
    assert iface.take_frames() == []
    assert iface.counters["no_route"] == 2


# ---- ICMP -------------------------------------------------------------------

def test_ping_is_answered(iface):
    peer_says_hello(iface)
    echo = IcmpEcho(TYPE_ECHO_REQUEST, ident=77, seq=3, data=b"0123456789abcdef")
    assert iface.receive(ip_frame(PROTO_ICMP, echo.emit()), 1.0) is None
    [reply] = iface.take_frames()
    ethernet, header, payload = parse_ip_frame(reply)
    assert ethernet == EthernetHeader(PEER_MAC, OUR_MAC, ETHERTYPE_IPV4)
    assert (header.src, header.dst, header.protocol, header.ttl) == (OUR_IP, PEER_IP, 1, 64)
    assert header.dont_fragment
    assert IcmpEcho.parse(payload) == IcmpEcho(TYPE_ECHO_REPLY, 77, 3, b"0123456789abcdef")
    assert iface.counters["icmp_echo"] == 1


# ---- TCP --------------------------------------------------------------------

def test_tcp_to_us_is_handed_up_checksum_verified(iface):
    segment = tcp_segment(payload=b"GET / HTTP/1.1\r\n\r\n")
    result = iface.receive(ip_frame(PROTO_TCP, segment) + bytes(4), 0.0)  # padded
    assert result is not None
    src_ip, dst_ip, tcp_bytes = result
    assert (src_ip, dst_ip, bytes(tcp_bytes)) == (PEER_IP, OUR_IP, segment)
    assert iface.counters["rx_frames"] == 1


def offload_segment(payload=b"data"):
    """As a local sender's TCP leaves it to checksum offload
    (CHECKSUM_PARTIAL): the field holds the folded pseudo-header sum."""
    segment = bytearray(tcp_segment(payload=payload))
    partial = checksum.ones_complement_sum(b"", checksum.pseudo_header_sum(
        PEER_IP, OUR_IP, PROTO_TCP, len(segment)))
    segment[16:18] = partial.to_bytes(2, "big")
    return bytes(segment)


def test_tcp_checksum_the_device_vouches_for_is_not_summed(iface):
    """As the kernel (skb_csum_unnecessary): a local sender's offload frame,
    or one the NIC verified, is taken as it is; unvouched, the same bytes
    are a bad checksum."""
    frame = ip_frame(PROTO_TCP, offload_segment())
    assert iface.receive(frame, 0.0) is None
    assert iface.counters["tcp_bad_checksum"] == 1
    _, _, tcp_bytes = iface.receive(frame, 0.0, checksum_vouched=True)
    assert bytes(tcp_bytes) == offload_segment()
    # The IPv4 header is still checked: no device offloads that here.
    damaged = bytearray(frame)
    damaged[14 + 8] ^= 1                          # TTL
    assert iface.receive(bytes(damaged), 0.0, checksum_vouched=True) is None
    assert iface.counters["ipv4_bad_checksum"] == 1


@pytest.mark.skipif(not native.ACCELERATED, reason="mtcpshim.stack._netfast not built")
def test_completing_an_offload_checksum_gives_the_wire_checksum():
    frame = bytearray(ip_frame(PROTO_TCP, offload_segment(b"x" * 301)))
    assert native.complete_checksum(frame)
    assert bytes(frame) == ip_frame(PROTO_TCP, tcp_segment(payload=b"x" * 301))


def test_frame_tcp_to_a_known_neighbour_is_returned_ready_to_send(iface):
    peer_says_hello(iface)
    header = bytearray(tcp_segment(dst=PEER_IP, src=OUR_IP))
    header[16:18] = b"\xde\xad"                             # ignored: recomputed
    frame = iface.frame_tcp(PEER_IP, bytes(header), memoryview(b"x" * 1000), now=1.0)
    ethernet, header, payload = parse_ip_frame(frame)
    assert ethernet == EthernetHeader(PEER_MAC, OUR_MAC, ETHERTYPE_IPV4)
    assert (header.src, header.dst, header.protocol) == (OUR_IP, PEER_IP, PROTO_TCP)
    assert checksum.internet_checksum(payload, checksum.pseudo_header_sum(
        OUR_IP, PEER_IP, PROTO_TCP, len(payload))) == 0
    assert payload[20:] == b"x" * 1000
    assert iface.take_frames() == []
    assert iface.counters["tx_frames"] == 2                 # the ARP reply and this frame


def test_frame_tcp_to_an_unknown_neighbour_waits_for_arp(iface):
    segment = tcp_segment(src=OUR_IP, dst=PEER_IP)
    assert iface.frame_tcp(PEER_IP, segment, b"", now=0.0) is None
    [request] = iface.take_frames()
    assert request[12:14] == b"\x08\x06"
    iface.receive(arp_frame(OP_REPLY, PEER_MAC, PEER_IP, OUR_MAC, OUR_IP), 0.1)
    [frame] = iface.take_frames()
    ethernet, header, payload = parse_ip_frame(frame)
    assert ethernet.dst == PEER_MAC
    assert payload == segment


def test_ip_idents_increment(iface):
    peer_says_hello(iface)
    frames = [iface.frame_tcp(PEER_IP, tcp_segment(OUR_IP, PEER_IP), b"", now=1.0) for _ in range(3)]
    idents = [parse_ip_frame(frame)[1].ident for frame in frames]
    assert idents == [idents[0], idents[0] + 1, idents[0] + 2]


def test_frames_from_the_arena_last_until_it_is_reused_and_held_ones_longer():
    if not native.ACCELERATED:
        pytest.skip("mtcpshim.stack._netfast not built")
    arena = Interface(OUR_MAC, OUR_IP, 24, gateway=GATEWAY_IP, frame_arena=ARENA_BYTES)
    plain = Interface(OUR_MAC, OUR_IP, 24, gateway=GATEWAY_IP)
    for iface in (arena, plain):
        peer_says_hello(iface)
    segment = tcp_segment(OUR_IP, PEER_IP)
    # Four frames of 1054 bytes: the fourth does not fit in 4096 and gets its own buffer.
    batch = [iface.frame_tcp(PEER_IP, segment, bytes([n]) * 1000, now=1.0) for iface in (arena, plain)
             for n in range(4)]
    built, expected = batch[:4], [bytes(frame) for frame in batch[4:]]
    assert [bytes(frame) for frame in built] == expected
    assert [type(frame) for frame in built] == [memoryview] * 3 + [bytearray]
    # A frame for a next hop not yet resolved waits with its own copy.
    assert arena.frame_tcp(FAR_IP, segment, b"held", now=1.0) is None
    arena.reuse_frames()
    again = arena.frame_tcp(PEER_IP, segment, b"\xff" * 1000, now=1.0)
    assert bytes(built[0]) != expected[0]                      # built over: the batch was sent
    assert parse_ip_frame(again)[2][20:] == b"\xff" * 1000
    arena.receive(arp_frame(OP_REPLY, GATEWAY_MAC, GATEWAY_IP, OUR_MAC, OUR_IP), 1.1)
    held = [frame for frame in arena.take_frames() if frame[12:14] == b"\x08\x00"]
    assert [parse_ip_frame(frame)[2][20:] for frame in held] == [b"held"]


# ---- drops ------------------------------------------------------------------

OTHER_MAC = bytes.fromhex("02000000dd04")

DROPS = [
    ("eth_truncated", bytes(10)),
    ("eth_not_for_us", ip_frame(PROTO_TCP, tcp_segment(), eth_dst=OTHER_MAC)),
    ("eth_unsupported_type", EthernetHeader(OUR_MAC, PEER_MAC, 0x86DD).emit(bytes(40))),
    ("arp_truncated", EthernetHeader(BROADCAST, PEER_MAC, ETHERTYPE_ARP).emit(bytes(20))),
    ("ipv4_bad_checksum", ip_frame(PROTO_TCP, tcp_segment())[:22] + b"\x00"
     + ip_frame(PROTO_TCP, tcp_segment())[23:]),
    ("ipv4_bad_total_len", ip_frame(PROTO_TCP, tcp_segment())[:-1]),
    ("ipv4_fragment", ip_frame(PROTO_TCP, tcp_segment(), more_fragments=True)),
    ("not_for_us", ip_frame(PROTO_TCP, tcp_segment(dst=ip("198.18.0.9")), dst=ip("198.18.0.9"))),
    ("tcp_not_unicast", ip_frame(PROTO_TCP, tcp_segment(), eth_dst=BROADCAST)),
    ("tcp_bad_checksum", ip_frame(PROTO_TCP, tcp_segment(valid=False))),
    ("ipv4_unsupported_protocol", ip_frame(PROTO_UDP, bytes(8))),
    ("icmp_bad_checksum", ip_frame(PROTO_ICMP, bytes(8) + b"x")),
    ("icmp_unexpected_echo_reply", ip_frame(PROTO_ICMP, IcmpEcho(TYPE_ECHO_REPLY, 1, 1).emit())),
]


@pytest.mark.parametrize("reason, frame", DROPS, ids=[reason for reason, _ in DROPS])
def test_dropped_frames_are_counted_by_reason(iface, reason, frame):
    assert iface.receive(frame, 0.0) is None
    assert iface.take_frames() == []
    assert iface.counters[reason] == 1
    assert iface.counters["rx_frames"] == 1


def test_c_and_python_paths_agree_frame_by_frame():
    if not native.ACCELERATED:
        pytest.skip("mtcpshim.stack._netfast not built")
    fast = Interface(OUR_MAC, OUR_IP, 24, accelerated=True)
    slow = Interface(OUR_MAC, OUR_IP, 24, accelerated=False)
    frames = [frame for _, frame in DROPS] + [
        ip_frame(PROTO_TCP, tcp_segment(payload=b"a" * n)) for n in (0, 1, 2, 1460)]
    for frame in frames:
        fast_result, slow_result = fast.receive(frame, 0.0), slow.receive(frame, 0.0)
        assert (fast_result and (fast_result[0], fast_result[1], bytes(fast_result[2]))) == (
            slow_result and (slow_result[0], slow_result[1], bytes(slow_result[2])))
    assert fast.counters == slow.counters


def test_announce_queues_a_gratuitous_arp_request_for_our_own_address():
    iface = Interface(bytes.fromhex("020000000002"), 0xC6120002, 24)
    iface.announce()
    (frame,) = iface.take_frames()
    ethernet, payload = EthernetHeader.parse(frame)
    arp = ArpPacket.parse(payload)
    assert (ethernet.dst, ethernet.ethertype) == (BROADCAST, ETHERTYPE_ARP)
    assert (arp.operation, arp.sender_ip, arp.target_ip, arp.sender_mac) == (
        OP_REQUEST, 0xC6120002, 0xC6120002, bytes.fromhex("020000000002"))


def test_neighbour_cache_stays_bounded_under_an_arp_flood():
    from mtcpshim.stack.iface import NEIGHBOUR_LIMIT

    iface = Interface(bytes.fromhex("020000000002"), 0xC6120002, 16)
    for n in range(NEIGHBOUR_LIMIT + 10):
        sender_ip = 0xC6120100 + n
        request = ArpPacket(OP_REQUEST, bytes([2, 0, 0, 0, n >> 8, n & 0xFF]), sender_ip,
                            bytes(6), 0xC6120002)
        iface.receive(EthernetHeader(BROADCAST, request.sender_mac, ETHERTYPE_ARP).emit(request.emit()), 1.0)
    assert len(iface._neighbours) == NEIGHBOUR_LIMIT
    assert iface.counters["arp_neighbour_evicted"] == 10
