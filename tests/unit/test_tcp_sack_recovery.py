"""Loss recovery driven by the peer's SACK blocks: the scoreboard and pipe
(RFC 6675), losses marked by RACK (RFC 8985), sent under PRR (RFC 6937).
Segments are named by their index in the stream (segment k starts at byte
k * MSS); the local ISS sits just below 2**32 so every trace crosses the
sequence-number wrap.  The peer's ACKs come an RTT after what they
acknowledge: RACK reasons in time."""
import pytest

from mtcpshim.stack.tcp import TcpConfig
from mtcpshim.stack.wire.tcp import ACK

MSS = 1460
RTT = 0.01
WRAP_ISS = 2**32 - 3 * MSS


@pytest.fixture
def sack_trace(make_tcp_trace):
    t = make_tcp_trace(local_iss=WRAP_ISS)
    t.establish(sack_permitted=True)
    assert t.conn.sack_enabled
    return t


def seq_of(t, index):
    return (t.L + 1 + index * MSS) % 2**32


def ack(t, index, *sacked):
    """The peer's ACK up to segment `index`, SACKing [start, end) segment ranges."""
    return t.rx(ACK, t.R + 1, seq_of(t, index),
                sack_blocks=tuple((seq_of(t, start), seq_of(t, end)) for start, end in sacked))


def indices(t, segments):
    return [((segment.seq - t.L - 1) % 2**32) // MSS for segment in segments]


def flight(t, segments):
    """The application writes `segments` segments; returns the indices of
    those that went at once, an RTT later, when the peer's ACKs arrive."""
    t.write(bytes(segments * MSS))
    sent = indices(t, t.recv())
    t.now += RTT
    return sent


def test_three_sacked_segments_start_recovery_and_lost_holes_are_resent(sack_trace):
    t = sack_trace
    assert flight(t, 30) == list(range(10))              # the initial window
    # Segments 1 and 4 are lost.  Segment 0 arrives: slow start sends two more.
    t.send(ack(t, 1))
    assert indices(t, t.recv()) == [10, 11]
    # SACKs for 2 and 3: each shrinks the pipe by a segment, so a new one
    # goes (limited transmit); segment 1 may yet be only reordered.
    t.send(ack(t, 1, (2, 3)))
    assert indices(t, t.recv()) == [12]
    t.send(ack(t, 1, (2, 4)))
    assert indices(t, t.recv()) == [13]
    # The third SACKed segment: with no reordering seen, RACK's window is
    # zero (RFC 8985 6.2 step 4), so 1 and 4, sent an RTT ago before 5, are
    # lost.  CUBIC takes ssthresh to 0.7 of 11 segments; the pipe (13 sent,
    # 3 SACKed, 2 lost: 8) is above it, and PRR lets one segment go.
    t.send(ack(t, 1, (5, 6), (2, 4)))
    assert indices(t, t.recv()) == [1]
    assert t.conn._in_recovery
    assert t.conn.ssthresh == int(11 * MSS * 0.7)
    # PRR: 7.7/13 of a segment per segment delivered.
    t.send(ack(t, 1, (5, 7), (2, 4)))
    t.send(ack(t, 1, (5, 8), (2, 4)))
    assert t.recv() == []
    t.send(ack(t, 1, (5, 9), (2, 4)))
    assert indices(t, t.recv()) == [4]
    # The resent segment 1 arrives: a partial ACK.  With the lost data all
    # resent, new data fills what the pipe leaves of cwnd.
    t.send(ack(t, 4, (5, 10)))
    assert indices(t, t.recv()) == [14, 15]
    assert t.conn._in_recovery
    t.send(ack(t, 4, (5, 11)))
    assert indices(t, t.recv()) == [16]
    # Everything up to the recovery point (segment 14) is acknowledged.
    t.send(ack(t, 14))
    assert not t.conn._in_recovery
    assert t.conn.cwnd == t.conn.ssthresh
    assert t.conn._board.sacked_ranges() == []


def test_every_hole_sent_before_a_sacked_segment_is_lost_at_once(sack_trace):
    t = sack_trace
    flight(t, 10)
    t.send(ack(t, 1))                                    # 1, 3 and 5 are lost
    t.send(ack(t, 1, (2, 3)), ack(t, 1, (2, 3), (4, 5)))
    assert t.recv() == []
    t.send(ack(t, 1, (6, 7), (4, 5), (2, 3)))
    # All three holes were sent before segment 6 and an RTT ago: lost.
    # The pipe (3 segments) is below ssthresh, and PRR's slow-start bound
    # lets one segment more go than the ACK delivered.
    assert indices(t, t.recv()) == [1, 3]
    t.send(ack(t, 1, (6, 8), (4, 5), (2, 3)))
    assert indices(t, t.recv()) == [5]
    t.send(ack(t, 1, (6, 9), (4, 5), (2, 3)), ack(t, 1, (6, 10), (4, 5), (2, 3)))
    assert t.recv() == []                                # every hole is resent once
    t.send(ack(t, 10))
    assert not t.conn._in_recovery
    assert len(t.send_buf) == 0


def test_sacked_data_is_never_resent_by_recovery(sack_trace):
    t = sack_trace
    assert flight(t, 20) == list(range(10))
    # Only segment 0 is lost; the peer SACKs the rest one by one.
    sent = []
    for top in range(2, 11):
        t.send(ack(t, 0, (1, top)))
        sent += indices(t, t.recv())
    assert [index for index in sent if index < 10] == [0]
    assert sent == sorted(set(sent), key=sent.index)     # nothing sent twice


def test_sack_blocks_for_unsent_or_acknowledged_data_are_ignored(sack_trace):
    t = sack_trace
    t.write(bytes(4 * MSS))
    t.recv()
    # Beyond snd_max (data never sent), and a D-SACK below the ACK.
    t.send(ack(t, 1, (5, 6)), ack(t, 1, (0, 1)))
    assert t.conn._board.sacked_ranges() == []
    t.send(ack(t, 1, (2, 3)))
    assert t.conn._board.sacked_ranges() == [(seq_of(t, 2), seq_of(t, 3))]


def test_cumulative_ack_prunes_the_scoreboard(sack_trace):
    t = sack_trace
    t.write(bytes(8 * MSS))
    t.recv()
    t.send(ack(t, 0, (2, 4), (5, 6)))
    t.send(ack(t, 3, (5, 6)))
    assert t.conn._board.sacked_ranges() == [(seq_of(t, 3), seq_of(t, 4)),
                                             (seq_of(t, 5), seq_of(t, 6))]
    t.send(ack(t, 6))
    assert t.conn._board.sacked_ranges() == []


def test_timeout_resends_the_head_and_then_what_was_not_sacked(sack_trace):
    t = sack_trace
    flight(t, 6)
    t.send(ack(t, 1))
    t.wait_for_timer()
    assert indices(t, t.recv()) == [5]                    # the tail loss probe first
    t.send(ack(t, 1, (3, 4)))                            # 1, 2 and 4 lost: the RACK timer...
    t.wait_for_timer()
    t.recv()
    t.wait_for_timer()                                   # ... and its retransmissions too
    # One segment: the head, whatever SACKs said (RFC 2018 section 8).
    assert indices(t, t.recv()) == [1]
    assert t.conn.cwnd == MSS
    # The head arrives; slow start resends the rest deemed lost, not the
    # SACKed segment 3 (RFC 8985 section 6.3, as Linux).
    t.now += t.conn.rtt.rto
    t.send(ack(t, 2, (3, 4), (5, 6)))
    assert indices(t, t.recv()) == [2, 4]


def test_peer_without_sack_gets_newreno(make_tcp_trace):
    t = make_tcp_trace(config=TcpConfig(timestamps=False, sack=True))
    t.establish()                                        # the SYN offered no SACK
    assert not t.conn.sack_enabled
    t.write(bytes(10 * MSS))
    t.recv()
    duplicate = t.rx(ACK, t.R + 1, t.L + 1, sack_blocks=((t.L + 1 + MSS, t.L + 1 + 2 * MSS),))
    t.send(duplicate, duplicate, duplicate)
    assert t.conn._board.sacked_ranges() == []
    assert t.conn._in_recovery
    assert t.conn.cwnd == t.conn.ssthresh + 3 * MSS      # NewReno inflation


def test_lost_acks_of_a_tail_are_recovered_by_a_probe_not_a_timeout(sack_trace):
    """RFC 8985 section 7: the flight arrived but its ACKs were lost.  After
    2 * SRTT the last segment goes again; its ACK covers the whole flight,
    with no timeout and no window reduction."""
    t = sack_trace
    cwnd = t.conn.cwnd
    t.write(bytes(4 * MSS))
    assert indices(t, t.recv()) == [0, 1, 2, 3]
    waited = t.wait_for_timer()
    assert indices(t, t.recv()) == [3]
    assert waited == pytest.approx(max(2 * t.conn.rtt.srtt, 0.010)) and waited < t.conn.rtt.rto
    t.send(ack(t, 4))
    assert t.conn.snd_una == seq_of(t, 4) and t.conn.cwnd >= cwnd
    assert t.conn.deadline() is None or t.conn.deadline() - t.now > 0.1  # nothing outstanding


def test_tail_probe_sends_new_data_when_the_window_allows(sack_trace):
    t = sack_trace
    assert flight(t, 12) == list(range(10))              # the initial window
    t.wait_for_timer()
    assert indices(t, t.recv()) == [10]                  # a probe with new data beats a resend
    t.send(ack(t, 0, (10, 11)))                          # the SACK shows the head was lost
    t.send(ack(t, 0, (9, 11)))
    t.send(ack(t, 0, (8, 11)))
    assert 0 in indices(t, t.recv())                     # fast recovery, no timeout


def test_a_lost_retransmission_is_resent_once_later_data_is_sacked(sack_trace):
    """The retransmission of segment 1 is lost too.  As soon as the peer
    SACKs a segment sent after it (14), an RTT after it was sent, segment 1
    goes again (RACK, RFC 8985 section 6.2), without waiting for the
    retransmission timeout."""
    t = sack_trace
    assert flight(t, 40) == list(range(10))
    t.send(ack(t, 1))
    assert indices(t, t.recv()) == [10, 11]
    t.send(ack(t, 1, (2, 3)))
    t.send(ack(t, 1, (2, 4)))
    assert indices(t, t.recv()) == [12, 13]
    t.send(ack(t, 1, (2, 5)))
    assert indices(t, t.recv()) == [1]                   # fast retransmit, then 14, 15, ...
    t.now += RTT
    sent_after = []
    for end in range(6, 15):                             # everything but segment 1 arrives
        t.send(ack(t, 1, (2, end)))
        sent_after += indices(t, t.recv())
    assert 1 not in sent_after and sent_after[:2] == [14, 15]
    t.send(ack(t, 1, (2, 15)))                           # 14 was sent after 1's retransmission
    assert indices(t, t.recv())[0] == 1
