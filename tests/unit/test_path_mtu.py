"""Path MTU discovery from ICMP "fragmentation needed" (RFC 1191), layer by
layer: the wire parse, the interface handing the message up, the host's
RFC 5927 checks and Linux's clamping, and the connection lowering its MSS
and resending its flight (traces of segments, as in test_tcp_*.py)."""
import random
import struct

import pytest

from mtcpshim.stack import checksum, native
from mtcpshim.stack.host import MIN_PATH_MTU, TcpHost
from mtcpshim.stack.iface import Interface
from mtcpshim.stack.storage import RingBuffer
from mtcpshim.stack.tcp import TcpConfig, TcpState
from mtcpshim.stack.wire.errors import WireError
from mtcpshim.stack.wire.ethernet import ETHERTYPE_IPV4, EthernetHeader
from mtcpshim.stack.wire.icmp import FragmentationNeeded
from mtcpshim.stack.wire.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, Ipv4Header
from mtcpshim.stack.wire.tcp import ACK, FIN, PSH, SYN, TcpSegment

OUR_MAC = bytes.fromhex("02000000aa01")
ROUTER_MAC = bytes.fromhex("02000000cc03")
OUR_IP = 0xC6124D02         # 198.18.77.2, the stack
ROUTER_IP = 0xC6124D01      # 198.18.77.1, the router that could not forward
PEER_IP = 0xC6124E02        # 198.18.78.2, beyond the router
OUR_PORT = 80
PEER_PORT = 40000
MSS = 1460


def quoted_datagram(seq, src=OUR_IP, dst=PEER_IP, src_port=OUR_PORT, dst_port=PEER_PORT,
                    protocol=PROTO_TCP, keep=548, **ip_fields) -> bytes:
    """The start of a full-sized segment of ours, as a router quotes it
    (Linux keeps the ICMP message within 576 bytes)."""
    segment = TcpSegment(src_port, dst_port, seq, 1, ACK, 1000, bytes(1448)).emit(src, dst)
    return Ipv4Header(src, dst, protocol, **ip_fields).emit(segment)[:keep]


def fragmentation_needed(mtu, quoted, icmp_type=3, code=4) -> bytes:
    message = bytearray(struct.pack("!BBHHH", icmp_type, code, 0, 0, mtu)) + quoted
    message[2:4] = checksum.internet_checksum(message).to_bytes(2, "big")
    return bytes(message)


def with_version_ihl(quoted, version_ihl) -> bytes:
    return bytes([version_ihl]) + quoted[1:]


# ---- wire ---------------------------------------------------------------------

def test_parse_reads_the_mtu_and_the_quoted_segment():
    message = fragmentation_needed(1280, quoted_datagram(0xFFFFFFF0))
    assert FragmentationNeeded.parse(message) == FragmentationNeeded(
        mtu=1280, src_ip=OUR_IP, dst_ip=PEER_IP, src_port=OUR_PORT, dst_port=PEER_PORT,
        seq=0xFFFFFFF0)


def test_parse_finds_the_tcp_header_behind_ipv4_options():
    quoted = quoted_datagram(7, options=bytes([1, 1, 1, 0]))   # NOP NOP NOP EOL: IHL 6
    assert FragmentationNeeded.parse(fragmentation_needed(1400, quoted)).seq == 7


def test_parse_needs_only_the_eight_bytes_rfc_792_promises():
    parsed = FragmentationNeeded.parse(fragmentation_needed(0, quoted_datagram(9, keep=28)))
    assert (parsed.mtu, parsed.seq) == (0, 9)


@pytest.mark.parametrize("reason, message", [
    ("icmp_truncated", fragmentation_needed(1280, b"")[:6]),
    ("icmp_bad_checksum", fragmentation_needed(1280, quoted_datagram(1))[:-1] + b"?"),
    ("icmp_unsupported_type", fragmentation_needed(1280, quoted_datagram(1), icmp_type=11)),
    ("icmp_bad_code", fragmentation_needed(1280, quoted_datagram(1), code=3)),
    ("icmp_quote_truncated", fragmentation_needed(1280, quoted_datagram(1, keep=19))),
    ("icmp_quote_truncated", fragmentation_needed(1280, quoted_datagram(1, keep=27))),
    ("icmp_quote_bad_ipv4", fragmentation_needed(1280, with_version_ihl(quoted_datagram(1), 0x65))),
    ("icmp_quote_bad_ipv4", fragmentation_needed(1280, with_version_ihl(quoted_datagram(1), 0x44))),
    ("icmp_quote_not_tcp", fragmentation_needed(1280, quoted_datagram(1, protocol=PROTO_UDP))),
    ("icmp_quote_fragment", fragmentation_needed(1280, quoted_datagram(1, fragment_offset=185))),
])
def test_malformed_fragmentation_needed_is_refused_with_a_reason(reason, message):
    with pytest.raises(WireError) as raised:
        FragmentationNeeded.parse(message)
    assert raised.value.reason == reason


# ---- interface ----------------------------------------------------------------

@pytest.fixture(params=[True, False], ids=["c", "python"])
def iface(request):
    if request.param and not native.ACCELERATED:
        pytest.skip("mtcpshim.stack._netfast not built")
    return Interface(OUR_MAC, OUR_IP, 24, gateway=ROUTER_IP, accelerated=request.param)


def icmp_frame(message, dst=OUR_IP) -> bytes:
    packet = Ipv4Header(ROUTER_IP, dst, PROTO_ICMP).emit(message)
    return EthernetHeader(OUR_MAC, ROUTER_MAC, ETHERTYPE_IPV4).emit(packet)


def test_fragmentation_needed_for_our_segment_waits_for_the_caller(iface):
    frame = icmp_frame(fragmentation_needed(1280, quoted_datagram(1234)))
    assert iface.receive(frame, 0.0) is None
    assert iface.take_icmp_errors() == [FragmentationNeeded(1280, OUR_IP, PEER_IP, OUR_PORT,
                                                            PEER_PORT, 1234)]
    assert iface.take_icmp_errors() == []
    assert iface.take_frames() == []                   # nothing to answer
    assert iface.counters["icmp_frag_needed"] == 1


def test_tcp_still_comes_up_the_fast_path_beside_icmp_errors(iface):
    segment = TcpSegment(PEER_PORT, OUR_PORT, 1, 2, ACK, 1000).emit(PEER_IP, OUR_IP)
    frame = EthernetHeader(OUR_MAC, ROUTER_MAC, ETHERTYPE_IPV4).emit(
        Ipv4Header(PEER_IP, OUR_IP, PROTO_TCP).emit(segment))
    iface.receive(icmp_frame(fragmentation_needed(1280, quoted_datagram(1))), 0.0)
    src_ip, dst_ip, tcp_bytes = iface.receive(frame, 0.0)
    assert (src_ip, dst_ip, bytes(tcp_bytes)) == (PEER_IP, OUR_IP, segment)
    assert len(iface.take_icmp_errors()) == 1


DROPS = [
    ("icmp_error_not_ours", fragmentation_needed(1280, quoted_datagram(1, src=0xC6124D09))),
    ("icmp_bad_checksum", fragmentation_needed(1280, quoted_datagram(1))[:-1] + b"?"),
    ("icmp_quote_truncated", fragmentation_needed(1280, quoted_datagram(1, keep=24))),
    ("icmp_quote_not_tcp", fragmentation_needed(1280, quoted_datagram(1, protocol=PROTO_UDP))),
    ("icmp_quote_fragment", fragmentation_needed(1280, quoted_datagram(1, fragment_offset=1))),
    # Other unreachables are not handed up: the echo parser refuses them as before.
    ("icmp_unsupported_type", fragmentation_needed(1280, quoted_datagram(1), code=3)),
]


@pytest.mark.parametrize("reason, message", DROPS, ids=[reason for reason, _ in DROPS])
def test_icmp_errors_not_handed_up_are_counted_by_reason(iface, reason, message):
    assert iface.receive(icmp_frame(message), 0.0) is None
    assert iface.take_icmp_errors() == []
    assert iface.counters[reason] == 1
    assert "icmp_frag_needed" not in iface.counters


# ---- host: RFC 5927 checks and Linux's clamping ---------------------------------

class Host:
    """One host with one connection accepted from PEER_IP:PEER_PORT, its
    initial window of MSS-sized segments in flight."""

    def __init__(self, timestamps=False):
        self.host = TcpHost(OUR_IP, TcpConfig(timestamps=timestamps), random.Random(1))
        self.host.listen(OUR_PORT, 8, lambda ip, port: (RingBuffer(1 << 20), RingBuffer(1 << 16), "app"))
        self.now = 0.0
        options = {"timestamp": (100, 0)} if timestamps else {}
        self.deliver(TcpSegment(PEER_PORT, OUR_PORT, 5000, 0, SYN, 65535, mss=MSS, **options))
        (syn_ack,) = self.sent()
        self.now = 0.01
        if timestamps:
            options = {"timestamp": (101, syn_ack.timestamp[0])}
        self.deliver(TcpSegment(PEER_PORT, OUR_PORT, 5001, syn_ack.seq + 1, ACK, 65535, **options))
        self.conn = self.host.connections[(OUR_PORT, PEER_IP, PEER_PORT)]
        assert self.conn.state == TcpState.ESTABLISHED
        self.conn.send_buf.write(bytes(20 * MSS))
        self.conn.send_ready(self.now)
        self.host.collect(self.conn, self.now)
        self.flight = self.sent()
        self.mss = self.conn.send_mss

    def deliver(self, segment):
        self.host.receive(PEER_IP, OUR_IP, segment.emit(PEER_IP, OUR_IP), self.now)

    def sent(self) -> list:
        return [TcpSegment.parse(header + bytes(payload), OUR_IP, PEER_IP, verify_checksum=False)
                for _, header, payload, _ in self.host.take_output()]

    def icmp(self, mtu, seq, local_port=OUR_PORT, remote_ip=PEER_IP, remote_port=PEER_PORT):
        self.host.receive_icmp_error(
            FragmentationNeeded(mtu, OUR_IP, remote_ip, local_port, remote_port, seq), self.now)

    def counters(self) -> dict:
        return {name: value for name, value in self.host.counters.items()
                if "frag" in name or "pmtu" in name}


@pytest.mark.parametrize("where", ["snd_una", "middle", "snd_max"])
def test_a_sequence_number_in_flight_lowers_the_mss_and_the_flight_is_resent(where):
    h = Host()
    conn = h.conn
    seq = {"snd_una": conn.snd_una, "middle": h.flight[4].seq, "snd_max": conn.snd_max}[where]
    h.icmp(1280, seq)
    assert conn.send_mss == 1240
    resent = h.sent()
    assert resent[0].seq == conn.snd_una
    assert {len(segment.payload) for segment in resent} == {1240}
    assert h.counters() == {"tcp_pmtu_lowered": 1}


@pytest.mark.parametrize("offset", [-1, -(1 << 31), 1, 1 << 20, 1 << 31])
def test_a_sequence_number_outside_the_flight_is_ignored_and_counted(offset):
    h = Host()
    conn = h.conn
    h.icmp(1280, (conn.snd_una + offset if offset < 0 else conn.snd_max + offset) % 2**32)
    assert conn.send_mss == MSS
    assert h.sent() == []
    assert h.counters() == {"icmp_frag_needed_out_of_window": 1}


@pytest.mark.parametrize("four_tuple", [
    dict(local_port=81), dict(remote_ip=PEER_IP + 1), dict(remote_port=PEER_PORT + 1)])
def test_no_connection_for_the_quoted_four_tuple_is_ignored_and_counted(four_tuple):
    h = Host()
    h.icmp(1280, h.conn.snd_una, **four_tuple)
    assert h.conn.send_mss == MSS
    assert h.sent() == []
    assert h.counters() == {"icmp_frag_needed_no_connection": 1}


@pytest.mark.parametrize("mtu", [0, 68, 551])
def test_a_reported_mtu_below_linux_min_pmtu_is_raised_to_it(mtu):
    h = Host()
    h.icmp(mtu, h.conn.snd_una)
    assert h.conn.send_mss == MIN_PATH_MTU - 40 == 512
    assert {len(segment.payload) for segment in h.sent()} == {512}


def test_timestamps_come_off_the_mss_too():
    h = Host(timestamps=True)
    assert h.mss == MSS - 12
    h.icmp(1280, h.conn.snd_una)
    assert h.conn.send_mss == 1280 - 40 - 12
    resent = h.sent()
    assert all(len(segment.emit(OUR_IP, PEER_IP)) + 20 == 1280 for segment in resent)


def test_an_mtu_not_below_the_current_path_mtu_is_ignored_and_counted():
    h = Host()
    for mtu in (1500, 9000):
        h.icmp(mtu, h.conn.snd_una)
    assert h.conn.send_mss == MSS
    h.icmp(1280, h.conn.snd_una)
    h.sent()
    for mtu in (1280, 1400):   # the rest of a flight's reports, and a stale larger one
        h.icmp(mtu, h.conn.snd_una)
    assert h.conn.send_mss == 1240
    assert h.sent() == []
    assert h.counters() == {"tcp_pmtu_lowered": 1, "icmp_frag_needed_not_lower": 4}


def test_a_lower_mtu_still_lowers_the_mss_again():
    h = Host()
    h.icmp(1400, h.conn.snd_una)
    h.sent()
    h.icmp(1280, h.conn.snd_una)
    assert h.conn.send_mss == 1240
    assert h.counters() == {"tcp_pmtu_lowered": 2}


# ---- connection: segment traces --------------------------------------------------

def test_the_flight_is_resent_at_once_in_segments_of_the_new_size(tcp_established):
    t = tcp_established
    data = bytes(range(256)) * 57                      # 14592 bytes: the initial window
    t.write(data)
    assert [len(segment.payload) for segment in t.recv()] == [MSS] * 9 + [len(data) - 9 * MSS]
    cwnd, ssthresh = t.conn.cwnd, t.conn.ssthresh
    t.now += 0.05
    assert t.conn.on_path_mtu(1280, t.now)
    new_mss = 1240
    expected = [t.tx(ACK, t.L + 1 + start, t.R + 1, data[start:start + new_mss])
                for start in range(0, len(data), new_mss)]
    expected[-1].flags |= PSH
    assert t.recv() == expected
    # No congestion response: the drops said nothing about a queue.
    assert (t.conn.cwnd, t.conn.ssthresh) == (cwnd, ssthresh)
    # The retransmission timer counts from the resend.
    assert t.conn.deadline() == pytest.approx(t.now + t.conn.rtt.rto)
    t.send(t.rx(ACK, t.R + 1, t.L + 1 + len(data)))
    assert t.conn.snd_una == t.conn.snd_max


def mtu_drops_under_a_flight(t, flight: int, mtu: int) -> None:
    """`flight` bytes sent, then the path's MTU drops to `mtu`: the flight goes again."""
    t.write(bytes(flight))
    t.recv()
    t.conn.on_path_mtu(mtu, t.now)
    t.recv()


def test_new_data_after_the_resend_goes_in_segments_of_the_new_size(tcp_established):
    t = tcp_established
    mtu_drops_under_a_flight(t, 2 * MSS, 1000)
    t.send(t.rx(ACK, t.R + 1, t.L + 1 + 2 * MSS))
    t.write(bytes(3000))
    assert [len(segment.payload) for segment in t.recv()] == [960, 960, 960, 120]


def test_nothing_in_flight_lowers_the_mss_and_sends_nothing(tcp_established):
    t = tcp_established
    assert t.conn.on_path_mtu(1280, t.now)
    assert t.recv() == []
    assert t.conn.deadline() is None
    t.write(bytes(2000))
    assert [len(segment.payload) for segment in t.recv()] == [1240, 760]


def test_an_mtu_that_segments_already_fit_changes_nothing(tcp_established):
    t = tcp_established
    t.write(bytes(3 * MSS))
    t.recv()
    deadline = t.conn.deadline()
    assert not t.conn.on_path_mtu(1500, t.now + 0.01)
    assert t.conn.send_mss == MSS
    assert t.recv() == []
    assert t.conn.deadline() == deadline


def test_before_the_peer_syn_the_mss_is_not_yet_ours_to_lower(tcp_trace):
    t = tcp_trace
    t.connect()
    t.recv()
    assert not t.conn.on_path_mtu(552, t.now)
    t.send(t.rx(SYN | ACK, t.R, t.L + 1, mss=MSS))
    assert t.conn.send_mss == MSS


def test_duplicate_acks_for_the_resent_data_do_not_start_fast_retransmit(tcp_established):
    t = tcp_established
    mtu_drops_under_a_flight(t, 10 * MSS, 1280)
    # The first two old segments had got through after all: the peer
    # answers the resent copies of them with duplicate ACKs.
    for _ in range(4):
        t.send(t.rx(ACK, t.R + 1, t.L + 1 + 2 * MSS))
    assert t.recv() == []
    assert not t.conn._in_recovery


def test_newreno_recovery_ends_at_ssthresh_and_the_flight_goes_again(make_tcp_trace):
    t = make_tcp_trace(config=TcpConfig(timestamps=False, congestion="reno"))
    t.establish()
    t.write(bytes(10 * MSS))
    t.recv()
    for _ in range(4):
        t.send(t.rx(ACK, t.R + 1, t.L + 1 + MSS))   # segment 1 lost: fast retransmit
    t.recv()
    assert t.conn._in_recovery and t.conn.cwnd > t.conn.ssthresh
    t.conn.on_path_mtu(1280, t.now)
    assert not t.conn._in_recovery
    assert t.conn.cwnd == t.conn.ssthresh
    assert_resent_from(t, t.L + 1 + MSS)


def assert_resent_from(t, snd_una):
    """A window's worth of 1240-byte segments from snd_una on."""
    resent = t.recv()
    assert [segment.seq for segment in resent] == [snd_una + k * 1240 for k in range(len(resent))]
    assert {len(segment.payload) for segment in resent} == {1240}
    assert t.conn.cwnd - 1240 < len(resent) * 1240 <= t.conn.cwnd


def test_sack_recovery_forgets_the_scoreboard_and_resends_from_snd_una(make_tcp_trace):
    t = make_tcp_trace()
    t.establish(sack_permitted=True)
    t.write(bytes(10 * MSS))
    t.recv()
    base = t.L + 1
    t.send(t.rx(ACK, t.R + 1, base + MSS))
    # Segment 1 lost, 2 to 5 SACKed: the head is lost, recovery begins.
    t.send(t.rx(ACK, t.R + 1, base + MSS, sack_blocks=((base + 2 * MSS, base + 6 * MSS),)))
    t.recv()
    assert t.conn._in_recovery
    t.conn.on_path_mtu(1280, t.now)
    assert t.conn._board.sacked_ranges() == [] and not t.conn._in_recovery
    assert t.conn.cwnd == t.conn.ssthresh
    assert_resent_from(t, base + MSS)


def test_a_fin_in_flight_goes_again_after_the_data(tcp_established):
    t = tcp_established
    t.write(bytes(2 * MSS))
    t.recv()
    t.conn.close(t.now)
    assert [segment.flags & FIN for segment in t.recv()] == [FIN]
    t.conn.on_path_mtu(1280, t.now)
    resent = t.recv()
    assert [len(segment.payload) for segment in resent] == [1240, 1240, 440]
    assert resent[-1].flags & FIN
