"""The fault injector (stack/io/impair.py) on a fake backend and a hand-wound
clock: each test walks frames through one impairment and reads what came
out the other side, and when."""
import random

import pytest

from mtcpshim.stack import checksum, native
from mtcpshim.stack.iface import Interface
from mtcpshim.stack.io import impair
from mtcpshim.stack.io.base import GSO_MAX_SIZE
from mtcpshim.stack.io.impair import ImpairedIO, ImpairSpec, ImpairSpecError
from mtcpshim.stack.wire.ethernet import ETHERTYPE_IPV4, EthernetHeader
from mtcpshim.stack.wire.ipv4 import PROTO_TCP, Ipv4Header
from mtcpshim.stack.wire.tcp import ACK, TcpSegment
from mtcpshim.stack.wire.vnet import SegmentedFrame
from support.link import MemoryLink

STACK_MAC, PEER_MAC = bytes.fromhex("020000000002"), bytes.fromhex("020000000001")
STACK_IP, PEER_IP = 0xC6120002, 0xC6120001
MSS = 1448


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def frames(count, size=60):
    """Distinct frames: the index in the first bytes, padded."""
    return [i.to_bytes(4, "big").ljust(size, b"\xee") for i in range(count)]


def index_of(frame):
    return int.from_bytes(frame[:4], "big")


def impaired(spec_text):
    link, clock = MemoryLink(STACK_MAC), Clock()
    return ImpairedIO(link, ImpairSpec.parse(spec_text), clock=clock), link, clock


def receive_all(io, max_frames=64):
    received = []
    while batch := io.recv_batch(max_frames):
        received += batch
    return received


def tcp_frame(payload=b"hello"):
    segment = TcpSegment(49152, 80, 1000, 2000, ACK, 65535, payload)
    packet = Ipv4Header(PEER_IP, STACK_IP, PROTO_TCP).emit(segment.emit(PEER_IP, STACK_IP))
    return EthernetHeader(STACK_MAC, PEER_MAC, ETHERTYPE_IPV4).emit(packet)


# --- the spec ------------------------------------------------------------


def test_spec_with_every_key():
    spec = ImpairSpec.parse("loss=1%,dup=1%,reorder=25%,corrupt=0.1%,delay=20ms,jitter=10ms,seed=7,dir=rx")
    assert spec == ImpairSpec(loss=0.01, dup=0.01, reorder=0.25, corrupt=0.001,
                              delay=0.020, jitter=0.010, seed=7, direction="rx")


def test_spec_defaults_to_both_directions_and_seed_1():
    spec = ImpairSpec.parse("delay=1.5s")
    assert (spec.delay, spec.direction, spec.seed) == (1.5, "both", 1)
    assert ImpairSpec.parse("delay=250us").delay == pytest.approx(250e-6)


@pytest.mark.parametrize("text, message", [
    ("loss=5", "loss=5: want a percentage such as loss=1%"),
    ("loss=101%", "loss=101%: at most 100%"),
    ("delay=20", "delay=20: want a time with a unit such as delay=20ms (us, ms, s)"),
    ("jitter=10ms", "jitter must not exceed delay: a frame cannot leave before it arrived"),
    ("delay=5ms,jitter=6ms", "jitter must not exceed delay: a frame cannot leave before it arrived"),
    ("dir=up", "dir=up: want rx, tx or both"),
    ("seed=seven", "seed=seven: want an integer"),
    ("loss=1%,loss=2%", "loss is given twice"),
    ("loss=1%,", "bad impairment '': want KEY=VALUE"),
    ("drop=1%", "unknown impairment 'drop' (known: loss, dup, reorder, corrupt, delay, jitter, seed, dir)"),
])
def test_bad_spec_is_one_line_naming_the_problem(text, message):
    with pytest.raises(ImpairSpecError) as raised:
        ImpairSpec.parse(text)
    assert str(raised.value) == message


# --- pass-through ----------------------------------------------------------


def test_no_impairment_passes_frames_through_untouched():
    io, link, _ = impaired("seed=3")
    link.inbound = frames(5)
    assert io.recv_batch(64) == frames(5)
    assert io.send_batch(frames(3)) == 3
    assert link.outbound == frames(3)
    assert io.deadline() is None
    assert (io.mac, io.filenos()) == (STACK_MAC, link.filenos())
    io.close()
    assert link.closed


def test_direction_tx_leaves_received_frames_alone():
    io, link, _ = impaired("loss=100%,dir=tx")
    link.inbound = frames(4)
    assert io.recv_batch(64) == frames(4)
    io.send_batch(frames(4))
    assert link.outbound == []
    assert io.counters()["impair_tx_lost"] == 4


# --- loss, corruption, duplication ------------------------------------------


def test_loss_is_reproducible_from_the_seed():
    survivors = []
    for _ in range(2):
        io, link, _ = impaired("loss=30%,seed=11,dir=rx")
        link.inbound = frames(1000)
        survivors.append([index_of(f) for f in receive_all(io)])
        lost = io.counters()["impair_rx_lost"]
        assert lost + len(survivors[-1]) == 1000 and 0 < lost < 1000
    assert survivors[0] == survivors[1]
    assert survivors[0] == sorted(survivors[0])


def test_a_corrupted_frame_differs_by_one_bit_beyond_the_ethernet_header():
    io, link, _ = impaired("corrupt=100%,dir=rx")
    link.inbound = frames(200)
    for original, damaged in zip(frames(200), receive_all(io)):
        assert damaged[:14] == original[:14]
        flipped = [a ^ b for a, b in zip(original, damaged)]
        assert sum(bin(x).count("1") for x in flipped) == 1
    assert io.counters()["impair_rx_corrupted"] == 200


def test_the_stack_drops_a_corrupted_tcp_frame_by_checksum_and_counts_it():
    assert Interface(STACK_MAC, STACK_IP, 24).receive(tcp_frame(), 0.0) is not None  # intact: to TCP

    iface = Interface(STACK_MAC, STACK_IP, 24)
    io, link, _ = impaired("corrupt=100%,seed=5,dir=rx")
    link.inbound = [tcp_frame()] * 50
    verdicts = [iface.receive(frame, 0.0) for frame in receive_all(io)]

    assert verdicts == [None] * 50
    drops = dict(iface.counters)
    assert drops.pop("rx_frames") == 50
    # A flip in the IP header fails its checksum, or first a length check.
    assert set(drops) <= {"ipv4_bad_checksum", "tcp_bad_checksum", "ipv4_bad_total_len",
                          "ipv4_bad_header_len", "ipv4_bad_version", "ipv4_truncated", "not_for_us"}
    assert sum(drops.values()) == 50
    assert drops["ipv4_bad_checksum"] > 0 and drops["tcp_bad_checksum"] > 0


@pytest.mark.skipif(not native.ACCELERATED, reason="only the C ring walk vouches")
def test_frames_the_device_vouched_for_get_wire_checksums_before_the_faults():
    """A bit flipped in a frame whose checksum nobody sums would reach TCP as
    data: past the receive faults nothing is vouched for, and the frames
    carry the checksums a wire would."""
    wire = tcp_frame(b"x" * 500)
    partial = bytearray(wire)
    tcp_at = 14 + 20
    segment_len = len(wire) - tcp_at
    partial[tcp_at + 16:tcp_at + 18] = checksum.ones_complement_sum(
        b"", checksum.pseudo_header_sum(PEER_IP, STACK_IP, PROTO_TCP, segment_len)).to_bytes(2, "big")
    io, link, _ = impaired("dup=100%,seed=1,dir=rx")
    link.inbound = [bytes(partial)]
    link.rx_vouched = b"\x01"
    assert receive_all(io) == [wire, wire]
    assert io.rx_vouched is None


# --- segmentation offload frames on transmit --------------------------------


def offload_frames(count, ring):
    """`count` frames of three MSS each, their payloads views of `ring`,
    as the stack's send ring."""
    iface = Interface(STACK_MAC, STACK_IP, 24)
    iface._learn(PEER_IP, PEER_MAC, 0.0)
    made = []
    for index in range(count):
        segment = TcpSegment(80, 49152, 1000 + index * 3 * MSS, 2000, ACK, 512)
        view = memoryview(ring)[index * 3 * MSS:(index + 1) * 3 * MSS]
        made.append(iface.frame_tcp(PEER_IP, segment.header(), view, 0.0, MSS))
    return made


def offload_impaired(spec_text, device_segments=True):
    link, clock = MemoryLink(STACK_MAC, GSO_MAX_SIZE, device_segments), Clock()
    return ImpairedIO(link, ImpairSpec.parse(spec_text), clock=clock), link, clock


def test_where_the_device_takes_offload_frames_whole_the_stack_may_send_them():
    assert offload_impaired("reorder=25%")[0].gso_max_size == GSO_MAX_SIZE
    assert offload_impaired("reorder=25%,dir=rx", device_segments=False)[0].gso_max_size == GSO_MAX_SIZE
    # The device would cut them before the wire: the faults take segments.
    assert offload_impaired("reorder=25%", device_segments=False)[0].gso_max_size == 0


def test_a_held_offload_frame_leaves_whole_with_the_bytes_it_was_sent_with():
    io, link, clock = offload_impaired("reorder=100%,dir=tx")
    ring = bytearray(b"a" * 3 * MSS)
    (frame,) = offload_frames(1, ring)
    io.send_batch([frame])
    ring[:] = b"b" * len(ring)              # the application refills the acknowledged ring
    clock.now += impair.REORDER_MAX_HOLD
    io.recv_batch(64)
    (sent,) = link.outbound
    assert type(sent) is SegmentedFrame and bytes(sent.payload) == b"a" * 3 * MSS


def test_a_corrupted_offload_frame_is_cut_and_one_piece_fails_its_checksum():
    io, link, _ = offload_impaired("corrupt=100%,seed=3,dir=tx")
    ring = random.Random(3).randbytes(30 * MSS)
    made = offload_frames(10, ring)
    io.send_batch(made)
    assert len(link.outbound) == 30 and io.counters()["impair_tx_corrupted"] == 10
    peer = Interface(PEER_MAC, PEER_IP, 24)
    verdicts = [peer.receive(piece, 0.0) is not None for piece in link.outbound]
    for index, frame in enumerate(made):
        intact = [bytes(piece) for piece in frame.cut()]
        out = [bytes(piece) for piece in link.outbound[3 * index:3 * index + 3]]
        assert sum(a != b for a, b in zip(intact, out)) == 1
    assert verdicts.count(False) == 10


def test_a_duplicate_follows_its_original():
    io, link, _ = impaired("dup=100%,dir=rx")
    link.inbound = frames(3)
    assert [index_of(f) for f in receive_all(io)] == [0, 0, 1, 1, 2, 2]
    assert io.counters()["impair_rx_duplicated"] == 3


# --- reordering -------------------------------------------------------------


def test_reordered_frames_are_overtaken_but_none_is_lost():
    io, link, _ = impaired("reorder=25%,seed=7,dir=rx")
    link.inbound = frames(1000)
    order = [index_of(f) for f in receive_all(io)]
    held = io.counters()["impair_rx_reordered"]

    # The last frames may still be held back, waiting for followers.
    order += [index_of(f) for f in io._rx.release(float("inf"))]
    assert sorted(order) == list(range(1000))
    highest_so_far = [max(order[:i + 1]) for i in range(len(order))]
    late = [index for index, highest in zip(order, highest_so_far) if index < highest]
    assert 0 < len(late) <= held < 1000     # only held frames come late


def test_a_held_frame_without_followers_leaves_after_the_hold_limit():
    io, link, clock = impaired("reorder=100%,dir=rx")
    link.inbound = frames(1)
    assert io.recv_batch(64) == []
    assert io.deadline() == clock.now + impair.REORDER_MAX_HOLD

    clock.now += impair.REORDER_MAX_HOLD
    assert io.recv_batch(64) == frames(1)
    assert io.deadline() is None


# --- delay and jitter ------------------------------------------------------


def test_delay_holds_a_frame_until_its_release_time():
    io, link, clock = impaired("delay=20ms,dir=rx")
    start = clock.now
    link.inbound = frames(2)
    assert io.recv_batch(64) == []
    assert io.deadline() == pytest.approx(start + 0.020)

    clock.now = start + 0.019
    assert io.recv_batch(64) == []
    clock.now = start + 0.020
    assert io.recv_batch(64) == frames(2)
    assert io.deadline() is None


def test_jitter_varies_the_delay_but_keeps_the_order():
    io, link, clock = impaired("delay=20ms,jitter=10ms,seed=9,dir=rx")
    start = clock.now
    departures = {}
    for step in range(100):                 # a frame every millisecond
        clock.now = start + step * 0.001
        link.inbound = frames(100)[step:step + 1]
        for frame in io.recv_batch(64):
            departures[index_of(frame)] = clock.now - start
    for step in range(100, 200):
        clock.now = start + step * 0.001
        for frame in io.recv_batch(64):
            departures[index_of(frame)] = clock.now - start

    assert list(departures) == list(range(100))                     # in order
    delays = [departures[i] - i * 0.001 for i in range(100)]
    assert min(delays) >= 0.010 - 1e-9
    assert max(delays) - min(delays) > 0.005                         # it does vary


def test_delayed_transmissions_leave_when_the_loop_next_polls():
    io, link, clock = impaired("delay=5ms,dir=tx")
    start = clock.now
    assert io.send_batch(frames(3)) == 3
    assert link.outbound == []
    assert io.deadline() == pytest.approx(start + 0.005)

    clock.now = start + 0.005
    assert io.recv_batch(64) == []          # the loop's next iteration
    assert link.outbound == frames(3)


def test_a_batch_never_exceeds_max_frames():
    io, link, clock = impaired("delay=1ms,dir=rx")
    link.inbound = frames(100)
    assert io.recv_batch(64) + io.recv_batch(64) == []
    clock.now += 0.001
    first, second = io.recv_batch(64), io.recv_batch(64)
    assert (len(first), len(second)) == (64, 36)


def test_a_full_lane_drops_and_counts_like_a_full_link_buffer(monkeypatch):
    monkeypatch.setattr(impair, "LANE_LIMIT", 10)
    io, link, _ = impaired("delay=1s,dir=rx")
    link.inbound = frames(15)
    receive_all(io)
    assert io.counters() == {"rx_kernel_drops": 0, "impair_rx_overflow": 5}
