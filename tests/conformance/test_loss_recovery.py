"""The sender uses the peer's SACK blocks (RFC 2018, RFC 6675): when one
segment of a flight is lost and the duplicate ACKs report what came after
it, the stack resends the hole, and nothing the peer already holds."""
from peer_server import BULK_PORT, bulk_pattern
from probe import ACK, seq_add
from mtcpshim.stack.seq import seq_diff

ISN = 30000
DUPTHRESH = 3


def test_sacked_data_is_not_resent_and_the_hole_is(open_probe):
    probe = open_probe(BULK_PORT)
    synack = probe.handshake(isn=ISN, mss=1000, wscale=7, sack_perm=True)
    first_byte = seq_add(synack.seq, 1)
    flight = [segment for _, segment in probe.collect(0.1) if segment.payload]
    assert len(flight) >= DUPTHRESH + 2
    # Segment 1 "was lost": ACK segment 0, then report each later one by SACK.
    hole = flight[1]
    hole_end = seq_add(hole.seq, len(hole.payload))
    probe.send(ACK, ack=hole.seq)
    for received in flight[2:2 + DUPTHRESH]:
        probe.send(ACK, ack=hole.seq, sack=[(hole_end, seq_add(received.seq, len(received.payload)))])
    sacked_end = seq_add(flight[1 + DUPTHRESH].seq, len(flight[1 + DUPTHRESH].payload))

    resent = probe.expect(where=lambda segment: segment.seq == hole.seq, timeout=1)
    assert bytes(resent.payload) == bytes(hole.payload)
    for _, segment in probe.collect(0.15):
        assert not (seq_diff(segment.seq, hole_end) >= 0 and seq_diff(segment.seq, sacked_end) < 0), \
            f"{segment} resends SACKed data"
    # With the hole filled, one ACK covers all the probe has (in order: the
    # "lost" segment did arrive) and the stream goes on, byte-exact.
    probe.send(ACK)
    offset = seq_diff(probe.rcv_nxt, first_byte)
    assert probe.read_stream(20000) == bulk_pattern(offset + 20000)[offset:]
