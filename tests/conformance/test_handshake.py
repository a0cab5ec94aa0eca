"""Passive open: the SYN-ACK echoes exactly the options the SYN offered
(RFC 9293 3.7.1 MSS, RFC 7323 window scale and timestamps, RFC 2018
SACK-permitted), and always carries an MSS; a closed port refuses with a
RST; what the peer announced (MSS, window) bounds what the stack sends."""
import pytest

from peer_server import BULK_PORT, ECHO_PORT
from probe import ACK, RST, SYN, seq_add
from mtcpshim.stack.seq import seq_diff

ISN = 1000
CLOSED_PORT = 7999


def test_all_options_offered_all_answered(open_probe):
    probe = open_probe(ECHO_PORT)
    probe.send(SYN, seq=ISN, ack=0, mss=1460, wscale=7, sack_perm=True, ts=(100, 0))
    synack = probe.expect(SYN | ACK)
    assert synack.ack == ISN + 1
    assert synack.mss is not None and 536 <= synack.mss <= 1460
    assert synack.wscale is not None and 0 <= synack.wscale <= 14
    assert synack.sack_permitted
    assert synack.timestamp is not None and synack.timestamp[1] == 100   # TSecr echoes our TSval
    assert synack.window > 0


def test_no_options_offered_mss_only(open_probe):
    probe = open_probe(ECHO_PORT)
    probe.send(SYN, seq=ISN, ack=0)
    synack = probe.expect(SYN | ACK)
    assert synack.ack == ISN + 1
    assert synack.mss is not None
    assert (synack.wscale, synack.sack_permitted, synack.timestamp, synack.sack_blocks) == (None, False, None, ())


@pytest.mark.parametrize("offered", [
    dict(wscale=7), dict(sack_perm=True), dict(ts=(100, 0)), dict(mss=1000),
], ids=["wscale", "sack_perm", "timestamps", "mss"])
def test_one_option_offered_only_that_one_answered(open_probe, offered):
    probe = open_probe(ECHO_PORT)
    probe.send(SYN, seq=ISN, ack=0, **offered)
    synack = probe.expect(SYN | ACK)
    assert synack.mss is not None
    assert (synack.wscale is not None) == ("wscale" in offered)
    assert synack.sack_permitted == ("sack_perm" in offered)
    assert (synack.timestamp is not None) == ("ts" in offered)


def test_syn_retransmission_gets_the_same_synack(open_probe):
    probe = open_probe(ECHO_PORT)
    probe.send(SYN, seq=ISN, ack=0, mss=1460)
    first = probe.expect(SYN | ACK)
    probe.send(SYN, seq=ISN, ack=0, mss=1460)
    again = probe.expect(SYN | ACK)
    assert (again.seq, again.ack) == (first.seq, first.ack)


def test_handshake_completes_and_data_flows(open_probe, server):
    probe = open_probe(ECHO_PORT)
    probe.handshake(isn=ISN, mss=1460, wscale=7, sack_perm=True)
    server.wait_for_event(probe.sport, "accepted")
    probe.send(ACK, payload=b"hello")
    assert probe.read_stream(5) == b"hello"


def test_syn_to_a_closed_port_is_refused(open_probe):
    probe = open_probe(CLOSED_PORT)
    probe.send(SYN, seq=ISN, ack=0, mss=1460)
    refusal = probe.expect(RST | ACK)
    assert (refusal.seq, refusal.ack) == (0, ISN + 1)


def test_peer_mss_bounds_the_segments_sent(open_probe):
    probe = open_probe(BULK_PORT)
    probe.handshake(isn=ISN, mss=536, wscale=7, sack_perm=True)
    flight = [segment for _, segment in probe.collect(0.3) if segment.payload]
    assert flight and max(len(segment.payload) for segment in flight) == 536


def test_peer_window_bounds_the_data_in_flight(open_probe):
    probe = open_probe(BULK_PORT)
    synack = probe.handshake(isn=ISN, window=3000, mss=1000)     # no window scaling: 3000 bytes is all
    flight = [segment for _, segment in probe.collect(0.3) if segment.payload]
    # The window fills exactly (retransmissions after an RTO may repeat it).
    first_byte = seq_add(synack.seq, 1)
    assert max(seq_diff(seq_add(segment.seq, len(segment.payload)), first_byte) for segment in flight) == 3000
