"""The receive side: out-of-order data is answered at once with a duplicate
ACK whose SACK block covers it (RFC 5681 4.2, RFC 2018 4), the ACK jumps
over both once the hole fills, overlapping retransmissions deliver every
byte exactly once, and nothing beyond the advertised window is acknowledged
(RFC 9293 3.10.7.4).  The echo server writes back what it read, so the echo
is the byte stream the application saw."""
import time

from peer_server import ECHO_PORT, SINK_PORT
from probe import ACK, FIN, PSH, seq_add
from mtcpshim.stack.seq import seq_diff

ISN = 5000
DATA = bytes(range(256)) * 4          # 1024 bytes, each offset recognisable
SEGMENT = 1400
BURST = 32


def connect(open_probe, port=ECHO_PORT):
    probe = open_probe(port)
    synack = probe.handshake(isn=ISN, mss=1460, wscale=7, sack_perm=True)
    return probe, synack


def test_out_of_order_segment_gets_duplicate_ack_with_sack_block(open_probe):
    probe, _ = connect(open_probe)
    start = probe.snd_nxt
    probe.send(ACK, seq=seq_add(start, 100), payload=DATA[100:300])
    dup_ack = probe.expect(ACK, timeout=1)
    assert dup_ack.ack == start
    assert dup_ack.sack_blocks == ((seq_add(start, 100), seq_add(start, 300)),)


def test_filling_the_hole_acks_both(open_probe):
    probe, _ = connect(open_probe)
    start = probe.snd_nxt
    probe.send(ACK, seq=seq_add(start, 100), payload=DATA[100:300])
    assert probe.expect(ACK, timeout=1).ack == start
    probe.send(PSH | ACK, seq=start, payload=DATA[:100])
    probe.snd_nxt = seq_add(start, 300)
    cumulative = probe.expect(where=lambda segment: segment.ack != start, timeout=1)
    assert cumulative.ack == seq_add(start, 300)
    assert cumulative.sack_blocks == ()
    # The ACK may ride on the echo's first bytes.
    echoed = bytes(cumulative.payload)
    assert echoed + probe.read_stream(300 - len(echoed)) == DATA[:300]


def test_second_hole_gets_two_sack_blocks_newest_first(open_probe):
    probe, _ = connect(open_probe)
    start = probe.snd_nxt
    probe.send(ACK, seq=seq_add(start, 100), payload=DATA[100:200])
    assert probe.expect(ACK, timeout=1).sack_blocks == ((seq_add(start, 100), seq_add(start, 200)),)
    probe.send(ACK, seq=seq_add(start, 300), payload=DATA[300:400])
    dup_ack = probe.expect(ACK, timeout=1)
    assert dup_ack.ack == start
    # RFC 2018 4: the first block reports the most recently received segment.
    assert dup_ack.sack_blocks == ((seq_add(start, 300), seq_add(start, 400)),
                                   (seq_add(start, 100), seq_add(start, 200)))


def test_overlapping_retransmissions_deliver_each_byte_once(open_probe, server):
    probe, _ = connect(open_probe)
    start = probe.snd_nxt
    # Pieces that overlap each other and what is already queued, out of order.
    for first, last in ((300, 600), (100, 400), (0, 150), (550, 1024), (200, 700)):
        probe.send(ACK, seq=seq_add(start, first), payload=DATA[first:last])
    probe.snd_nxt = seq_add(start, len(DATA))
    assert probe.read_stream(len(DATA)) == DATA
    probe.expect_none(0.3, where=lambda segment: segment.payload)
    assert server.bytes_read(probe.sport) == len(DATA)


def test_data_beyond_the_window_is_not_acknowledged(open_probe):
    probe, synack = connect(open_probe, SINK_PORT)    # the sink never reads: the window only closes
    start = probe.snd_nxt
    probe.send(PSH | ACK, payload=DATA[:100])
    first_ack = probe.expect(ACK, where=lambda segment: segment.ack == seq_add(start, 100))
    right_edge = seq_add(first_ack.ack, first_ack.window << synack.wscale)

    # Fill the window and keep going past it, in paced bursts from the
    # latest ACK (a burst may outrun the stack's receive ring).  No ACK may
    # pass the furthest edge advertised before it.  The sink reads nothing,
    # so the edge stays put but for the rounding of a scaled window: up to a
    # unit of the scale either way (RFC 7323 2.4).
    unit = 1 << synack.wscale
    send_up_to = seq_add(right_edge, 4 * SEGMENT)
    latest = first_ack
    deadline = time.monotonic() + 15
    while latest.window != 0 and time.monotonic() < deadline:
        seq = latest.ack
        for _ in range(BURST):
            if seq_diff(send_up_to, seq) <= 0:
                break
            probe.send(ACK, seq=seq, payload=bytes(SEGMENT))
            seq = seq_add(seq, SEGMENT)
        for _, segment in probe.collect(0.1):
            assert seq_diff(right_edge, segment.ack) >= 0, f"{segment} acknowledges past {right_edge}"
            edge = seq_add(segment.ack, segment.window * unit)
            assert -unit < seq_diff(edge, right_edge) < unit, f"{segment} moves the edge from {right_edge}"
            if seq_diff(edge, right_edge) > 0:
                right_edge = edge
            if seq_diff(segment.ack, latest.ack) >= 0:
                latest = segment
    assert latest.window == 0 and -unit < seq_diff(latest.ack, right_edge) <= 0
    right_edge = latest.ack

    # Still closed: a segment beyond the edge is answered, not accepted.
    probe.send(ACK, seq=right_edge, payload=bytes(SEGMENT))
    answer = probe.expect(ACK, timeout=1)
    assert (answer.ack, answer.window, answer.sack_blocks) == (right_edge, 0, ())


def test_data_across_sequence_wraparound_arrives_intact(open_probe, server):
    probe = open_probe(ECHO_PORT)
    probe.handshake(isn=0xFFFFFE00, mss=1460, wscale=7, sack_perm=True)
    start = probe.snd_nxt
    # Out of order across the wrap, then the hole before it.
    probe.send(ACK, seq=seq_add(start, 400), payload=DATA[400:])
    dup_ack = probe.expect(ACK, timeout=1)
    assert dup_ack.sack_blocks == ((seq_add(start, 400), seq_add(start, len(DATA))),)
    probe.send(PSH | ACK, seq=start, payload=DATA[:400])
    probe.snd_nxt = seq_add(start, len(DATA))
    assert probe.read_stream(len(DATA)) == DATA


def test_old_duplicate_is_acknowledged_and_not_delivered_again(open_probe, server):
    probe, _ = connect(open_probe)
    start = probe.snd_nxt
    probe.send(PSH | ACK, payload=DATA[:200])
    assert probe.read_stream(200) == DATA[:200]
    probe.send(PSH | ACK, seq=start, payload=DATA[:200])
    duplicate_ack = probe.expect(ACK, timeout=1)
    assert duplicate_ack.ack == seq_add(start, 200) and not duplicate_ack.payload
    probe.expect_none(0.3, where=lambda segment: segment.payload)
    assert server.bytes_read(probe.sport) == 200


def test_paws_drops_a_segment_with_an_old_timestamp(open_probe, server):
    probe = open_probe(ECHO_PORT)
    synack = probe.handshake(isn=ISN, mss=1460, sack_perm=True, ts=(1000, 0))
    their_ts = synack.timestamp[0]
    probe.send(PSH | ACK, payload=DATA[:100], ts=(1002, their_ts))
    assert probe.read_stream(100) == DATA[:100]
    # The next bytes, but with an older TSval: an old duplicate (RFC 7323 5.3).
    delivered = probe.snd_nxt
    probe.send(PSH | ACK, seq=delivered, payload=DATA[100:200], ts=(900, their_ts))
    answer = probe.expect(ACK, timeout=1)
    assert answer.ack == delivered and answer.timestamp[1] == 1002
    probe.expect_none(0.3, where=lambda segment: segment.payload)
    assert server.bytes_read(probe.sport) == 100


def test_passive_close(open_probe, server):
    probe, _ = connect(open_probe)
    probe.send(FIN | ACK)
    fin_ack = probe.expect(where=lambda segment: segment.ack == probe.snd_nxt)
    server.wait_for_event(probe.sport, "eof")
    # The echo server closes on EOF: the stack's FIN follows (maybe with the ACK).
    fin = fin_ack if fin_ack.flags & FIN else probe.expect(FIN | ACK)
    assert fin.ack == probe.snd_nxt
    probe.send(ACK)
    probe.expect_none(0.3)
