"""Blind in-window attacks (RFC 5961): a RST or SYN that is in the window
but not exact, and an ACK for data never sent, get a challenge ACK and the
connection carries on; only the exact RST resets it.  Each test sends one
suspicious segment: challenge ACKs are rate limited per connection."""
from peer_server import ECHO_PORT
from probe import ACK, PSH, RST, SYN, seq_add

ISN = 9000


def established(open_probe, server):
    probe = open_probe(ECHO_PORT)
    probe.handshake(isn=ISN, mss=1460, wscale=7, sack_perm=True)
    server.wait_for_event(probe.sport, "accepted")
    return probe


def assert_still_echoes(probe, server):
    probe.send(PSH | ACK, payload=b"still here")
    assert probe.read_stream(10) == b"still here"
    assert "reset" not in server.events(probe.sport)


def test_in_window_rst_not_exact_gets_challenge_ack(open_probe, server):
    probe = established(open_probe, server)
    probe.send(RST, seq=seq_add(probe.snd_nxt, 1000), ack=0)
    challenge = probe.expect(ACK, timeout=1)
    assert (challenge.seq, challenge.ack) == (probe.rcv_nxt, probe.snd_nxt)
    assert_still_echoes(probe, server)


def test_rst_outside_the_window_is_ignored(open_probe, server):
    probe = established(open_probe, server)
    probe.send(RST, seq=seq_add(probe.snd_nxt, 0x40000000), ack=0)
    probe.expect_none(0.5)
    assert_still_echoes(probe, server)


def test_exact_rst_resets_the_connection(open_probe, server):
    probe = established(open_probe, server)
    probe.send(RST, ack=0)
    probe.expect_none(0.3)
    server.wait_for_event(probe.sport, "reset")
    # The connection is gone: data now draws a RST (RFC 9293 3.10.7.1).
    probe.send(PSH | ACK, payload=b"anyone?")
    assert probe.expect(RST, timeout=1).seq == probe.rcv_nxt


def test_syn_on_established_connection_gets_challenge_ack(open_probe, server):
    probe = established(open_probe, server)
    probe.send(SYN, seq=seq_add(probe.snd_nxt, 500), ack=0, mss=1460)
    challenge = probe.expect(ACK, timeout=1)
    assert (challenge.seq, challenge.ack) == (probe.rcv_nxt, probe.snd_nxt)
    assert_still_echoes(probe, server)


def test_ack_for_data_never_sent_is_challenged_and_dropped(open_probe, server):
    probe = established(open_probe, server)
    start = probe.snd_nxt
    probe.send(PSH | ACK, ack=seq_add(probe.rcv_nxt, 100000), payload=b"dropped")
    challenge = probe.expect(ACK, timeout=1)
    # The whole segment was dropped: its data is not acknowledged or delivered ...
    assert (challenge.seq, challenge.ack) == (probe.rcv_nxt, start)
    probe.expect_none(0.3, where=lambda segment: segment.payload)
    assert server.bytes_read(probe.sport) == 0
    # ... and the connection carries on from where it was.
    probe.snd_nxt = start
    assert_still_echoes(probe, server)
