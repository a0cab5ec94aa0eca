"""Loss recovery as Linux does it, as segment traces: RACK (RFC 8985) finds
losses by time, retransmissions lost included; its reordering window
tolerates late segments and widens on D-SACKs; PRR (RFC 6937) paces what
goes during recovery; spurious recoveries and timeouts are undone (D-SACK,
timestamps).  Segment k starts at byte k * MSS; the peer's ACKs come an
RTT after what they acknowledge."""
import pytest

from mtcpshim.stack.tcp import TcpConfig
from mtcpshim.stack.wire.tcp import ACK

MSS = 1460
RTT = 0.010
WRAP_ISS = 2**32 - 3 * MSS


def seq_of(t, index):
    return (t.L + 1 + index * MSS) % 2**32


def ack(t, index, *sacked, ts=None):
    """The peer's ACK up to segment `index`, with SACK blocks of [start,
    end) segment ranges (the first may be a D-SACK) and, if given, the
    timestamp it echoes."""
    options = {}
    if ts is not None:
        options["timestamp"] = (77, ts)
    return t.rx(ACK, t.R + 1, seq_of(t, index), **options,
                sack_blocks=tuple((seq_of(t, start), seq_of(t, end)) for start, end in sacked))


def indices(t, segments):
    return [((segment.seq - t.L - 1) % 2**32) // MSS for segment in segments]


def our_ts(now):
    return int(now * 1000) & 0xFFFFFFFF


@pytest.fixture
def sack_trace(make_tcp_trace):
    t = make_tcp_trace(local_iss=WRAP_ISS)
    t.establish(sack_permitted=True)
    return t


@pytest.fixture
def ts_trace(make_tcp_trace):
    # MSS 1472 to both: with the timestamp option, segments of MSS bytes.
    t = make_tcp_trace(config=TcpConfig(mss=MSS + 12), local_iss=WRAP_ISS)
    t.establish(sack_permitted=True, timestamp=(76, 0), mss=MSS + 12)
    assert t.conn.ts_enabled
    return t


def start_recovery_for_segment_1(t):
    """Ten segments out; an RTT later 0 is acknowledged and 2, 3, 4 SACKed:
    1 was sent before them an RTT ago and is lost (RACK's window is zero
    before any reordering was seen, with DupThresh segments SACKed)."""
    t.write(bytes(40 * MSS))
    assert indices(t, t.recv()) == list(range(10))
    t.now += RTT
    t.send(ack(t, 1), ack(t, 1, (2, 3)), ack(t, 1, (2, 4)), ack(t, 1, (2, 5)))
    # Slow start sent 10 and 11, limited transmit 12 and 13, then the
    # retransmission.
    assert indices(t, t.recv()) == [10, 11, 12, 13, 1]
    assert t.conn._in_recovery


def test_a_lost_retransmission_is_repaired_without_a_timeout(sack_trace):
    t = sack_trace
    start_recovery_for_segment_1(t)
    ssthresh = t.conn.ssthresh
    # An RTT later all but segment 1 arrived: 10 to 13 went before its
    # retransmission and say nothing of it; PRR sends new data.
    t.now += RTT
    t.send(ack(t, 1, (2, 14)))
    after = indices(t, t.recv())
    assert after and 1 not in after
    # Another RTT: the first segment sent after the retransmission is
    # SACKed, and segment 1 still missing: the retransmission was lost.
    t.now += RTT
    t.send(ack(t, 1, (2, after[0] + 1)))
    assert indices(t, t.recv())[0] == 1
    # The second retransmission arrives: one recovery, one reduction, no timeout.
    t.now += RTT
    t.send(ack(t, after[-1] + 1))
    assert not t.conn._in_recovery and t.conn._retries == 0
    assert t.conn.ssthresh == ssthresh == t.conn.cwnd
    assert t.conn.recovery_counts == {"fast_recoveries": 1, "retransmitted_segments": 2}


def test_a_second_hole_found_inside_recovery_is_repaired_in_the_same_episode(sack_trace):
    t = sack_trace
    start_recovery_for_segment_1(t)
    ssthresh = t.conn.ssthresh
    # Segment 6 was lost too: the first SACK above it marks it lost, and
    # it goes as soon as PRR allows, in the same recovery.
    t.send(ack(t, 1, (7, 8), (2, 6)))
    sent = indices(t, t.recv())
    for end in range(9, 12):
        t.send(ack(t, 1, (7, end), (2, 6)))
        sent += indices(t, t.recv())
    assert 6 in sent and 1 not in sent
    t.now += RTT
    t.send(ack(t, 6, (7, 12)))
    t.send(ack(t, 14))
    assert not t.conn._in_recovery
    assert t.conn.ssthresh == ssthresh and t.conn._retries == 0


def test_reordering_within_the_window_is_not_retransmitted(sack_trace):
    t = sack_trace
    t.write(bytes(4 * MSS))
    t.recv()
    t.now += RTT
    t.send(ack(t, 1))                                    # min RTT: 10 ms
    # Segment 2 is overtaken by 3.  One SACKed segment: segment 2 may be
    # late by a quarter of the min RTT before it counts as lost.
    t.send(ack(t, 1, (3, 4)))
    assert t.recv() == []
    assert t.conn.deadline() == pytest.approx(t.now + RTT / 4)
    # It arrives within that: nothing was resent, and now reordering is
    # known on this path.
    t.now += RTT / 8
    t.send(ack(t, 4))
    assert t.recv() == [] and not t.conn._in_recovery
    assert t.conn._board.reordering_seen
    # From now on even DupThresh SACKed segments wait for the window.
    t.write(bytes(6 * MSS))
    assert indices(t, t.recv()) == [4, 5, 6, 7, 8, 9]
    t.now += RTT
    t.send(ack(t, 4, (5, 6)), ack(t, 4, (5, 7)), ack(t, 4, (5, 8)))
    assert t.recv() == [] and not t.conn._in_recovery
    # Past the window, segment 4 is lost after all.
    t.wait(RTT / 4)
    assert indices(t, t.recv())[0] == 4
    assert t.conn._in_recovery


def reordered_episode(t, first, late_by):
    """Segments first..first+3 go out; `first` is overtaken by the others
    and arrives `late_by` after them.  Returns what was resent."""
    t.write(bytes(4 * MSS))
    assert indices(t, t.recv()) == [first, first + 1, first + 2, first + 3]
    t.now += RTT
    resent = []
    t.send(ack(t, first, (first + 1, first + 2)))
    resent += indices(t, t.recv())
    t.wait(late_by)
    resent += indices(t, t.recv())
    t.send(ack(t, first + 4))
    resent += indices(t, t.recv())
    return resent


def test_a_dsack_widens_the_reordering_window(sack_trace):
    t = sack_trace
    t.write(bytes(MSS))
    t.recv()
    t.now += RTT
    t.send(ack(t, 1))                                    # min RTT: 10 ms, window 2.5 ms
    # Segment 1 is 4 ms late: past the window, it is resent, and the
    # peer reports the copy as a duplicate (D-SACK below the ACK).
    assert reordered_episode(t, 1, 0.004) == [1]
    t.send(ack(t, 5, (1, 2)))
    assert t.conn._board.reo_wnd_mult == 2
    # The window is now half the min RTT: the same lateness goes unpunished.
    assert reordered_episode(t, 5, 0.004) == []


def test_prr_spreads_the_reduction_over_the_recovery(make_tcp_trace):
    t = make_tcp_trace(local_iss=WRAP_ISS, send_buffer_size=100 * MSS)
    t.establish(sack_permitted=True)
    t.write(bytes(80 * MSS))
    assert indices(t, t.recv()) == list(range(10))
    t.now += RTT
    t.send(ack(t, 10))                                   # slow start: 20 in flight
    assert indices(t, t.recv()) == list(range(10, 30))
    t.now += RTT
    # Segment 10 is lost; the others arrive one by one.
    sent_per_ack = []
    for end in range(12, 30):
        t.send(ack(t, 10, (11, end)))
        sent_per_ack.append(len(t.recv()))
    assert t.conn.ssthresh == 14 * MSS                   # CUBIC: 0.7 of 20 segments
    # Two SACKs: a new segment each (the pipe shrank).  The third: RACK
    # marks 10 lost, recovery starts with 22 in flight, and the
    # retransmission goes at once.  Then, while the pipe exceeds ssthresh,
    # PRR sends 14/22 of what was delivered (RFC 6937): 6 segments, the
    # retransmission included, for the first 10 delivered, never two at
    # once; not the silence, then the burst, of cwnd = ssthresh at once.
    # Once the pipe is down to ssthresh, one for one (the slow-start
    # reduction bound).
    assert sent_per_ack == [1, 1] + [1] + [0, 0, 1, 1, 0, 1, 1, 0, 0] + [1] * 6
    # The recovery ends with cwnd at ssthresh.
    t.now += RTT
    t.send(ack(t, 32))
    assert not t.conn._in_recovery and t.conn.cwnd == t.conn.ssthresh


def spurious_fast_retransmit(t, echo=None):
    """Segment 1 is only late, by more than RACK tolerates: it is resent.
    `echo(index)` gives the timestamp the peer echoes for an original."""
    t.write(bytes(10 * MSS))
    sent_at = t.now
    t.recv()
    t.now += RTT
    ts = our_ts(sent_at) if echo else None
    t.send(ack(t, 1, ts=ts))
    cwnd, ssthresh = t.conn.cwnd, t.conn.ssthresh         # before the episode
    t.send(ack(t, 1, (2, 3), ts=ts), ack(t, 1, (2, 4), ts=ts), ack(t, 1, (2, 5), ts=ts))
    assert indices(t, t.recv()) == [1]
    assert t.conn._in_recovery and t.conn.cwnd < cwnd
    return cwnd, ssthresh, sent_at


def test_a_spurious_recovery_is_undone_when_timestamps_show_the_original_arrived(ts_trace):
    t = ts_trace
    cwnd, ssthresh, sent_at = spurious_fast_retransmit(t, echo=True)
    # The original segment 1 fills the hole: the ACK echoes its timestamp,
    # older than the retransmission's (Eifel, RFC 3522).
    t.now += RTT / 2
    t.send(ack(t, 10, ts=our_ts(sent_at)))
    assert not t.conn._in_recovery
    assert (t.conn.cwnd, t.conn.ssthresh) == (cwnd, ssthresh)


def test_a_recovery_repaired_by_its_retransmission_is_not_undone(ts_trace):
    t = ts_trace
    cwnd, _, _ = spurious_fast_retransmit(t, echo=True)
    resent_at = t.now
    t.now += RTT
    t.send(ack(t, 10, ts=our_ts(resent_at)))
    assert not t.conn._in_recovery
    assert t.conn.cwnd == t.conn.ssthresh == int(cwnd * 0.7)


def test_a_spurious_recovery_is_undone_when_its_retransmission_is_dsacked(sack_trace):
    t = sack_trace
    cwnd, ssthresh, _ = spurious_fast_retransmit(t)
    t.now += RTT / 2
    t.send(ack(t, 10))                                   # the original arrived
    assert not t.conn._in_recovery and t.conn.cwnd < cwnd
    t.now += RTT / 2
    t.send(ack(t, 10, (1, 2)))                           # then the copy: D-SACK
    assert (t.conn.cwnd, t.conn.ssthresh) == (cwnd, ssthresh)
    assert t.conn.recovery_counts == {"fast_recoveries": 1, "retransmitted_segments": 1,
                                      "dsacks_received": 1, "spurious_undone": 1}


def test_a_spurious_timeout_is_undone_by_timestamps(ts_trace):
    t = ts_trace
    t.write(bytes(4 * MSS))
    sent_at = t.now
    t.recv()
    cwnd, ssthresh = t.conn.cwnd, t.conn.ssthresh
    t.wait_for_timer()                                   # the tail loss probe
    t.recv()
    t.wait_for_timer()                                   # then the timeout
    assert indices(t, t.recv()) == [0]
    assert t.conn.cwnd == MSS and t.conn._in_loss
    # The ACKs were only late: they echo the originals' timestamp.
    t.now += 0.001
    t.send(ack(t, 4, ts=our_ts(sent_at)))
    assert not t.conn._in_loss
    assert (t.conn.cwnd, t.conn.ssthresh) == (cwnd, ssthresh)
    assert t.conn.recovery_counts == {"tail_loss_probes": 1, "timeouts": 1,
                                      "retransmitted_segments": 2, "spurious_undone": 1}
