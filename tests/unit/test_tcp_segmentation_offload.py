"""Segmentation offload (TSO/GSO): with `TcpConfig.gso_max_size`, one
segment carries several MSS of payload for the device to cut.  What goes on
the wire once cut must be what the stack sends without offload, segment for
segment, and the frame must say how to cut it (mtcpshim.stack.wire.vnet)."""
import random
import struct

import pytest

from mtcpshim.stack import checksum, native
from mtcpshim.stack.host import TcpHost
from mtcpshim.stack.iface import Interface
from mtcpshim.stack.storage import RingBuffer
from mtcpshim.stack.tcp import TcpConfig
from mtcpshim.stack.wire.ethernet import EthernetHeader
from mtcpshim.stack.wire.ipv4 import PROTO_TCP, Ipv4Header
from mtcpshim.stack.wire.tcp import ACK, FIN, PSH, SYN, TcpSegment
from mtcpshim.stack.wire.vnet import F_NEEDS_CSUM, GSO_TCPV4, HEADER, SegmentedFrame

MSS = 1460
GSO_MAX = 65455


@pytest.fixture
def offloaded(make_tcp_trace):
    trace = make_tcp_trace(TcpConfig(timestamps=False, gso_max_size=GSO_MAX),
                           buffer_size=200000)
    trace.establish()
    return trace


def pieces(segments, mss=MSS):
    """The wire segments a device cuts `segments` into: (seq, length, flags),
    PSH and FIN on the last piece only, as Linux's tcp_gso_segment does."""
    cut = []
    for segment in segments:
        payload = len(segment.payload)
        for offset in range(0, max(payload, 1), mss):
            last = offset + mss >= payload
            flags = segment.flags if last else segment.flags & ~(PSH | FIN)
            cut.append((segment.seq + offset, min(mss, payload - offset), flags))
    return cut


def test_a_write_leaves_as_one_segment_of_whole_mss_pieces(offloaded):
    t = offloaded
    data = random.Random(1).randbytes(20000)
    t.write(data)
    # The initial window (10 MSS) in one segment, not ten.
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1, data[:10 * MSS], window=65535)]
    t.send(t.rx(ACK, t.R + 1, t.L + 1 + 10 * MSS))
    (more,) = t.recv()
    assert (more.seq, len(more.payload), more.flags) == (t.L + 1 + 10 * MSS, 20000 - 10 * MSS,
                                                          ACK | PSH)


def test_the_short_tail_rides_along_at_the_end_of_the_queue(offloaded):
    t = offloaded
    t.write(b"x" * (3 * MSS + 100))
    assert [(len(s.payload), s.flags) for s in t.recv()] == [(3 * MSS + 100, ACK | PSH)]


def test_nagle_holds_the_short_tail_while_a_small_segment_is_unacknowledged(offloaded):
    t = offloaded
    t.write(b"a" * 100)
    assert [len(s.payload) for s in t.recv()] == [100]
    t.write(b"b" * (2 * MSS + 50))
    # The whole pieces go; the 50-byte tail waits for the ACK (Minshall).
    assert [len(s.payload) for s in t.recv()] == [2 * MSS]
    t.send(t.rx(ACK, t.R + 1, t.L + 101 + 2 * MSS))
    assert [len(s.payload) for s in t.recv()] == [50]


def test_a_window_that_is_no_multiple_of_the_mss_leaves_the_rest_for_later(offloaded):
    t = offloaded
    t.send(t.rx(ACK, t.R + 1, t.L + 1, window=5000))
    t.write(b"w" * 9000)
    # 3 MSS fit; 620 bytes would be a silly segment (sender SWS avoidance).
    assert [len(s.payload) for s in t.recv()] == [3 * MSS]


def test_the_segment_never_exceeds_gso_max_size(make_tcp_trace):
    t = make_tcp_trace(TcpConfig(timestamps=False, gso_max_size=4 * MSS + 7),
                       buffer_size=200000)
    t.establish()
    t.write(b"z" * 20000)
    assert [len(s.payload) for s in t.recv()] == [4 * MSS, 4 * MSS, 2 * MSS]


def scripted_transfer(trace, rng):
    """Writes, ACKs (some lost), SACKed holes and timeouts, the same for
    any `trace`: returns every segment sent, in order."""
    sent = []
    trace.establish(sack_permitted=True)
    data = rng.randbytes(300000)
    written = 0
    for step in range(60):
        if written < len(data):
            chunk = data[written:written + rng.randrange(1, 40000)]
            written += trace.send_buf.write(chunk)
            trace.conn.send_ready(trace.now)
        out = trace.recv()
        sent += out
        trace.now += 0.01
        if not out or rng.random() < 0.2:
            trace.wait(1.5)                              # let timers fire
            sent += trace.recv()
            continue
        snd_una, snd_max = trace.conn.snd_una, trace.conn.snd_max
        ack = snd_una + (snd_max - snd_una) * rng.randrange(0, 5) // 4
        blocks = ()
        if rng.random() < 0.3 and snd_max - ack > 3 * MSS:
            left = ack + MSS * rng.randrange(1, (snd_max - ack) // MSS)
            blocks = ((left, min(left + 3 * MSS, snd_max)),)
        trace.send(trace.rx(ACK, trace.R + 1, ack, window=65535, sack_blocks=blocks))
        sent += trace.recv()
    return sent


def test_cut_into_pieces_the_offloaded_flow_is_the_flow_without_offload(make_tcp_trace):
    """Congestion control, SACK recovery, RTO and Nagle see the same MSS
    segments either way: one script, both configurations, same wire."""
    for seed in range(5):
        plain = make_tcp_trace(TcpConfig(timestamps=False), buffer_size=200000)
        offload = make_tcp_trace(TcpConfig(timestamps=False, gso_max_size=GSO_MAX),
                                 buffer_size=200000)
        without = scripted_transfer(plain, random.Random(seed))
        with_offload = scripted_transfer(offload, random.Random(seed))
        assert pieces(with_offload) == pieces(without)
        assert max(len(s.payload) for s in with_offload) > MSS


def test_the_host_marks_longer_than_mss_segments_for_cutting():
    host_ip, peer_ip = 0xC6120002, 0xC6120001
    host = TcpHost(host_ip, TcpConfig(timestamps=False, gso_max_size=GSO_MAX))
    host.listen(80, 4, lambda ip, port: (RingBuffer(100000), RingBuffer(100000), None))
    host.receive(peer_ip, host_ip, TcpSegment(40000, 80, 1000, 0, SYN, 65535, mss=MSS)
                 .emit(peer_ip, host_ip), 0.0)
    ((_, syn_ack, payload, gso),) = host.take_output()
    iss = TcpSegment.parse(syn_ack, host_ip, peer_ip, verify_checksum=False).seq
    assert gso == 0 and payload == b""
    host.receive(peer_ip, host_ip, TcpSegment(40000, 80, 1001, iss + 1, ACK, 65535)
                 .emit(peer_ip, host_ip), 0.1)
    conn = host.connections[(80, peer_ip, 40000)]
    conn.send_buf.write(b"q" * (5 * MSS))
    conn.send_ready(0.1)
    host.collect(conn, 0.1)
    ((_, header, payload, gso),) = host.take_output()
    assert gso == MSS and len(header) == 20 and bytes(payload) == b"q" * (5 * MSS)


# ---- the frame -----------------------------------------------------------------

OUR_MAC, PEER_MAC = bytes.fromhex("02000000aa01"), bytes.fromhex("02000000bb02")
OUR_IP, PEER_IP = 0xC6120002, 0xC6120001


def device_cuts(frame: SegmentedFrame) -> list:
    """What a NIC or the kernel's GSO does with the frame, per the vnet
    header: cut the payload in gso_size pieces, copy the headers, and
    complete each checksum from the partial one (adjusted for the piece's
    length, as Linux's tcp_gso_segment does)."""
    flags, gso_type, header_len, gso_size, csum_start, csum_offset = HEADER.unpack(
        frame.vnet_header())
    assert (flags, gso_type, csum_start, csum_offset) == (F_NEEDS_CSUM, GSO_TCPV4, 34, 16)
    ethernet, packet = EthernetHeader.parse(bytes(frame))
    ip, tcp = Ipv4Header.parse(packet)
    tcp = bytes(tcp)
    tcp_header_len = (tcp[12] >> 4) * 4
    assert header_len == 34 + tcp_header_len
    header, payload = bytearray(tcp[:tcp_header_len]), tcp[tcp_header_len:]
    (partial,) = struct.unpack_from("!H", header, 16)
    seq = struct.unpack_from("!I", header, 4)[0]
    frames = []
    for offset in range(0, len(payload), gso_size):
        piece = bytearray(header) + payload[offset:offset + gso_size]
        struct.pack_into("!I", piece, 4, (seq + offset) & 0xFFFFFFFF)
        if offset + gso_size < len(payload):
            piece[13] &= ~(PSH | FIN)
        shorter_by = len(tcp) - len(piece)       # one's complement: -x is 0xFFFF - x
        pseudo = checksum.ones_complement_sum(b"", partial + 0xFFFF - shorter_by)
        struct.pack_into("!H", piece, 16, 0)
        struct.pack_into("!H", piece, 16, checksum.internet_checksum(piece, pseudo))
        frames.append(EthernetHeader(ethernet.dst, ethernet.src, ethernet.ethertype).emit(
            Ipv4Header(ip.src, ip.dst, PROTO_TCP, ip.ident).emit(bytes(piece))))
    return frames


def offloaded_frame(accelerated: bool, payload: bytes, flags: int):
    """Our interface's frame of one segment carrying `payload`, and the
    peer's interface to receive its pieces."""
    if accelerated and not native.ACCELERATED:
        pytest.skip("mtcpshim.stack._netfast not built")
    ours = Interface(OUR_MAC, OUR_IP, 24, accelerated=accelerated)
    peer = Interface(PEER_MAC, PEER_IP, 24, accelerated=accelerated)
    ours._learn(PEER_IP, PEER_MAC, 0.0)
    segment = TcpSegment(80, 40000, 1000, 2000, flags, 512, payload, timestamp=(5, 6))
    return ours.frame_tcp(PEER_IP, segment.header(), memoryview(payload), 0.0, MSS), peer


@pytest.mark.parametrize("accelerated", [True, False], ids=["c", "python"])
def test_a_segmented_frame_cuts_into_valid_segments(accelerated):
    payload = random.Random(7).randbytes(3 * MSS + 11)
    frame, peer = offloaded_frame(accelerated, payload, ACK | PSH)
    assert type(frame) is SegmentedFrame and frame.gso_size == MSS
    assert frame.payload.obj is payload                  # gathered from where it is, not copied
    received = []
    for piece in device_cuts(frame):
        src, dst, tcp = peer.receive(piece, 0.0)
        received.append(TcpSegment.parse(tcp, src, dst))          # checksum verified
    assert [len(s.payload) for s in received] == [MSS, MSS, MSS, 11]
    assert b"".join(bytes(s.payload) for s in received) == payload
    assert [s.flags for s in received] == [ACK, ACK, ACK, ACK | PSH]
    assert all(s.timestamp == (5, 6) for s in received)


@pytest.mark.parametrize("accelerated", [True, False], ids=["c", "python"])
def test_cut_by_the_stack_the_frame_gives_the_devices_segments(accelerated):
    """What the fault injector does to corrupt one piece of the frame, as
    netem does with a GSO packet: the same segments as the device's cut,
    FIN only on the last, the IPv4 identification counting up."""
    frame, peer = offloaded_frame(accelerated, random.Random(8).randbytes(2 * MSS + 3), ACK | PSH | FIN)
    cut = frame.cut()
    assert [bytes(piece)[34:] for piece in cut] == [bytes(piece)[34:] for piece in device_cuts(frame)]
    received = [TcpSegment.parse(tcp, src, dst) for src, dst, tcp in (peer.receive(piece, 0.0) for piece in cut)]
    assert [s.flags for s in received] == [ACK, ACK, ACK | PSH | FIN]
    idents = [Ipv4Header.parse(EthernetHeader.parse(bytes(piece))[1])[0].ident for piece in cut]
    assert idents == [idents[0], idents[0] + 1, idents[0] + 2]


def test_c_and_python_build_the_same_segmented_frame():
    if not native.ACCELERATED:
        pytest.skip("mtcpshim.stack._netfast not built")
    frames = []
    for accelerated in (True, False):
        iface = Interface(OUR_MAC, OUR_IP, 24, accelerated=accelerated)
        iface._learn(PEER_IP, PEER_MAC, 0.0)
        segment = TcpSegment(80, 40000, 1, 2, ACK, 512, bytes(range(256)) * 20)
        frames.append(iface.frame_tcp(PEER_IP, segment.header(), segment.payload, 0.0, MSS))
    assert frames[0] == frames[1] and frames[0].vnet_header() == frames[1].vnet_header()


def test_a_segmented_frame_waiting_for_arp_keeps_its_own_copy_of_the_payload():
    """The payload is a view of the send ring, valid for one loop pass; a
    frame held for ARP outlives it, so it holds a copy."""
    iface = Interface(OUR_MAC, OUR_IP, 24)
    ring = bytearray(b"a" * (2 * MSS))
    segment = TcpSegment(80, 40000, 1, 2, ACK, 512)
    assert iface.frame_tcp(PEER_IP, segment.header(), memoryview(ring), 0.0, MSS) is None
    ring[:] = b"b" * (2 * MSS)                          # the application refills the ring
    iface._learn(PEER_IP, PEER_MAC, 0.1)
    [_arp_request, frame] = iface.take_frames()
    assert type(frame) is SegmentedFrame and bytes(frame.payload) == b"a" * (2 * MSS)
    assert bytes(frame)[:6] == PEER_MAC


def test_a_lost_run_is_resent_as_one_segment_of_whole_mss_pieces(make_tcp_trace):
    """As Linux resends a lost TSO skb whole: the run RACK marks lost leaves
    in as few segments as the recovery's budget allows, each counted per
    MSS piece."""
    t = make_tcp_trace(TcpConfig(timestamps=False, gso_max_size=GSO_MAX), buffer_size=200000)
    t.establish(sack_permitted=True)
    data = random.Random(2).randbytes(10 * MSS)
    t.write(data)
    (flight,) = t.recv()
    assert len(flight.payload) == 10 * MSS
    # The last four pieces arrived, the first six did not.
    sack = ((t.L + 1 + 6 * MSS, t.L + 1 + 10 * MSS),)
    t.send(t.rx(ACK, t.R + 1, t.L + 1, sack_blocks=sack))
    # PRR lets five go at once (what the SACK delivered, plus one), in one segment.
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1, data[:5 * MSS], window=65535)]
    assert t.conn.recovery_counts == {"fast_recoveries": 1, "retransmitted_segments": 5}
    t.send(t.rx(ACK, t.R + 1, t.L + 1 + 5 * MSS, sack_blocks=sack))
    assert t.recv() == [t.tx(ACK, t.L + 1 + 5 * MSS, t.R + 1, data[5 * MSS:6 * MSS], window=65535)]
    assert t.conn.recovery_counts["retransmitted_segments"] == 6
    t.send(t.rx(ACK, t.R + 1, t.L + 1 + 10 * MSS))
    assert t.conn.snd_una == (t.L + 1 + 10 * MSS) % 2**32
