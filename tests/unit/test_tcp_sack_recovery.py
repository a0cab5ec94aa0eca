"""Loss recovery driven by the peer's SACK blocks (RFC 6675): scoreboard,
IsLost, pipe and the NextSeg rules.  Segments are named by their index in
the stream (segment k starts at byte k * MSS); the local ISS sits just
below 2**32 so every trace crosses the sequence-number wrap."""
import pytest

from stack.tcp import TcpConfig
from stack.wire.tcp import ACK

MSS = 1460
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


def test_three_sacked_segments_start_recovery_and_lost_holes_are_resent(sack_trace):
    t = sack_trace
    t.write(bytes(30 * MSS))
    assert indices(t, t.recv()) == list(range(10))        # initial window
    # Segments 1 and 4 are lost.  Segment 0 arrives: slow start sends two more.
    t.send(ack(t, 1))
    assert indices(t, t.recv()) == [10, 11]
    # SACKs for 2 and 3: duplicate ACKs, limited transmit sends 12 and 13.
    t.send(ack(t, 1, (2, 3)))
    assert indices(t, t.recv()) == [12]
    t.send(ack(t, 1, (2, 4)))
    assert indices(t, t.recv()) == [13]
    # The third: segment 1 has three SACKed segments above it, it is lost.
    # CUBIC takes the window to 0.7 of 11 segments; the pipe (13 sent, 3
    # SACKed, 1 lost, 1 resent: 10 segments) is above it, so nothing more.
    t.send(ack(t, 1, (5, 6), (2, 4)))
    assert indices(t, t.recv()) == [1]
    assert t.conn._in_recovery
    assert t.conn.cwnd == t.conn.ssthresh == int(11 * MSS * 0.7)
    # Each SACK shrinks the pipe by a segment, but cwnd is 7.7 segments.
    t.send(ack(t, 1, (5, 7), (2, 4)))
    t.send(ack(t, 1, (5, 8), (2, 4)))
    assert t.recv() == []
    # Now more than 2 * MSS is SACKed above segment 4: lost, and the pipe
    # (6 segments) leaves room for it.  The head is not sent again.
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
    assert t.conn._sacked == []


def test_without_new_data_rule_three_resends_a_hole_not_yet_lost(sack_trace):
    t = sack_trace
    t.write(bytes(10 * MSS))
    t.recv()
    t.send(ack(t, 1))                                    # 1, 3 and 5 are lost
    t.send(ack(t, 1, (2, 3)), ack(t, 1, (2, 3), (4, 5)))
    assert t.recv() == []
    t.send(ack(t, 1, (6, 7), (4, 5), (2, 3)))
    # Segment 1 is lost (three SACKed ranges above it); segment 3 is not
    # yet, but with nothing new to send NextSeg rule 3 resends it.
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
    t.write(bytes(20 * MSS))
    assert indices(t, t.recv()) == list(range(10))
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
    assert t.conn._sacked == []
    assert t.conn._dupacks == 0
    t.send(ack(t, 1, (2, 3)))
    assert t.conn._sacked == [(seq_of(t, 2), seq_of(t, 3))]
    # The same block again is no news: not a duplicate ACK (RFC 6675).
    t.send(ack(t, 1, (2, 3)))
    assert t.conn._dupacks == 1


def test_cumulative_ack_prunes_the_scoreboard(sack_trace):
    t = sack_trace
    t.write(bytes(8 * MSS))
    t.recv()
    t.send(ack(t, 0, (2, 4), (5, 6)))
    t.send(ack(t, 3, (5, 6)))
    assert t.conn._sacked == [(seq_of(t, 3), seq_of(t, 4)), (seq_of(t, 5), seq_of(t, 6))]
    t.send(ack(t, 6))
    assert t.conn._sacked == []


def test_timeout_forgets_the_scoreboard_and_goes_back_n(sack_trace):
    t = sack_trace
    t.write(bytes(6 * MSS))
    t.recv()
    t.send(ack(t, 0, (1, 2)))
    t.wait_for_timer()
    assert indices(t, t.recv()) == [5]                    # the tail loss probe first
    t.wait_for_timer()
    # The receiver may have reneged on what it SACKed: start over from the
    # first unacknowledged byte, one segment (RFC 2018 section 8).
    assert indices(t, t.recv()) == [0]
    assert t.conn._sacked == []
    t.send(ack(t, 1))
    assert indices(t, t.recv()) == [1, 2]


def test_peer_without_sack_gets_newreno(make_tcp_trace):
    t = make_tcp_trace(config=TcpConfig(timestamps=False, sack=True))
    t.establish()                                        # the SYN offered no SACK
    assert not t.conn.sack_enabled
    t.write(bytes(10 * MSS))
    t.recv()
    duplicate = t.rx(ACK, t.R + 1, t.L + 1, sack_blocks=((t.L + 1 + MSS, t.L + 1 + 2 * MSS),))
    t.send(duplicate, duplicate, duplicate)
    assert t.conn._sacked == []
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
    assert waited == pytest.approx(max(2 * t.conn.srtt, 0.010)) and waited < t.conn.rto
    t.send(ack(t, 4))
    assert t.conn.snd_una == seq_of(t, 4) and t.conn.cwnd >= cwnd
    assert t.conn.deadline() is None or t.conn.deadline() - t.now > 0.1  # nothing outstanding


def test_tail_probe_sends_new_data_when_the_window_allows(sack_trace):
    t = sack_trace
    t.write(bytes(12 * MSS))
    assert indices(t, t.recv()) == list(range(10))      # the initial window: 10 segments
    t.wait_for_timer()
    assert indices(t, t.recv()) == [10]                  # a probe with new data beats a resend
    t.send(ack(t, 0, (10, 11)))                          # the SACK shows the head was lost
    t.send(ack(t, 0, (9, 11)))
    t.send(ack(t, 0, (8, 11)))
    assert 0 in indices(t, t.recv())                     # fast recovery, no timeout


def test_a_lost_retransmission_is_resent_once_later_data_is_sacked(sack_trace):
    """The retransmission of segment 1 is lost too.  When the peer SACKs
    DupThresh segments sent after it (14, 15, 16) while 1 is still missing,
    segment 1 goes again, without waiting for the retransmission timeout."""
    t = sack_trace
    t.write(bytes(40 * MSS))
    assert indices(t, t.recv()) == list(range(10))
    t.send(ack(t, 1))
    assert indices(t, t.recv()) == [10, 11]
    t.send(ack(t, 1, (2, 3)))
    t.send(ack(t, 1, (2, 4)))
    assert indices(t, t.recv()) == [12, 13]
    t.send(ack(t, 1, (2, 5)))
    assert indices(t, t.recv()) == [1]                   # fast retransmit; snd_max is segment 14
    sent_after = []
    for end in range(6, 17):                             # everything but segment 1 arrives
        t.send(ack(t, 1, (2, end)))
        sent_after += indices(t, t.recv())
    assert 1 not in sent_after and sent_after[:2] == [14, 15]
    t.send(ack(t, 1, (2, 17)))                           # 14, 15 and 16 SACKed: 1 was lost again
    assert indices(t, t.recv())[0] == 1
