"""The sender's scoreboard and RACK on their own (stack/recovery.py), without
a connection: records, counters and pipe, SACK and D-SACK, and RACK's loss
marks, timer and reordering window.  Sequence numbers start just below
2**32 so every case crosses the wrap."""
import pytest

from mtcpshim.stack.recovery import EVER_RETRANS, LOST, RETRANS, SACKED, Scoreboard

MSS = 1000
BASE = 2**32 - 2500          # segment k is [seq(k), seq(k + 1))


def seq(k):
    return (BASE + k * MSS) % 2**32


def block(first, end):
    return (seq(first), seq(end))


def board_with(*bursts):
    """A scoreboard with bursts (first segment, end segment, time) sent."""
    board = Scoreboard()
    for first, end, now in bursts:
        board.sent(seq(first), seq(end), now)
    return board


def flags_by_segment(board, count):
    result = []
    for k in range(count):
        for start, end, _, flags, *_ in board.records:
            if (seq(k) - start) % 2**32 < (end - start) % 2**32:
                result.append(flags & (SACKED | LOST | RETRANS))
    return result


def test_a_burst_is_one_record_and_later_sends_are_new_records():
    board = board_with((0, 4, 1.0), (4, 6, 1.0), (6, 7, 1.5))
    assert [(start, end) for start, end, *_ in board.records] == [(seq(0), seq(6)),
                                                                  (seq(6), seq(7))]
    assert board.pipe(7 * MSS) == 7 * MSS


def test_cumulative_ack_drops_and_trims_records():
    board = board_with((0, 4, 1.0), (4, 8, 1.1))
    board.acked(seq(5) + 10, 1.2)
    assert [(start, end) for start, end, *_ in board.records] == [(seq(5) + 10, seq(8))]
    assert board.rack_rtt == pytest.approx(0.1)            # the newest delivered: sent at 1.1
    assert board.min_rtt == pytest.approx(0.1)


def test_sack_splits_records_and_counts_bytes():
    board = board_with((0, 10, 1.0))
    assert board.sack([block(3, 5), block(7, 8)], seq(0), seq(10), 1.1) == 3 * MSS
    assert flags_by_segment(board, 10) == [0, 0, 0, SACKED, SACKED, 0, 0, SACKED, 0, 0]
    assert board.sacked_ranges() == [block(3, 5), block(7, 8)]
    assert board.pipe(10 * MSS) == 7 * MSS
    # Known blocks again are no news; a cumulative ACK over them forgets them.
    assert board.sack([block(3, 5)], seq(0), seq(10), 1.1) == 0
    board.acked(seq(4), 1.2)
    assert board.sacked == 2 * MSS and board.pipe(6 * MSS) == 4 * MSS


def test_blocks_beyond_what_was_sent_or_malformed_are_ignored():
    board = board_with((0, 4, 1.0))
    assert board.sack([block(3, 6), (seq(2), seq(1)), block(1, 1)], seq(0), seq(4), 1.1) == 0
    assert board.sacked == 0 and board.dsack is None


@pytest.mark.parametrize("blocks", [
    [block(0, 1), block(3, 4)],            # below snd_una
    [block(3, 4), block(2, 5)],            # inside the block that follows (RFC 2883 4.1)
])
def test_a_first_block_reporting_a_duplicate_is_a_dsack(blocks):
    board = board_with((1, 6, 1.0))
    board.sack(blocks, seq(1), seq(6), 1.1)
    assert board.dsack == blocks[0]


def test_sack_blocks_repeated_by_a_later_ack_are_no_dsack():
    board = board_with((0, 6, 1.0))
    board.sack([block(3, 5)], seq(0), seq(6), 1.1)
    board.sack([block(3, 5)], seq(0), seq(6), 1.2)          # a window update, say
    assert board.dsack is None
    board.sack([block(5, 6), block(3, 5)], seq(0), seq(6), 1.3)
    assert board.dsack is None


def test_rack_marks_what_was_sent_before_the_newest_delivered_once_an_rtt_passed():
    board = board_with((0, 4, 1.0), (4, 8, 1.05))
    board.sack([block(2, 3)], seq(0), seq(8), 1.1)         # sent at 1.0, RTT 0.1
    assert board.detect_loss(1.1, 0.02) == (0, pytest.approx(0.02))
    assert board.detect_loss(1.12, 0.02) == (2 * MSS, 0.0)
    # 0 and 1 are lost; 3 went in the same burst as 2 but after it; 4 to 7 later.
    assert flags_by_segment(board, 8) == [LOST, LOST, SACKED, 0, 0, 0, 0, 0]
    assert board.pipe(8 * MSS) == 5 * MSS
    assert board.next_lost(seq(0)) == (seq(0), seq(2))


def test_a_lost_retransmission_is_marked_again_by_what_was_sent_after_it():
    board = board_with((0, 4, 1.0))
    board.sack([block(1, 4)], seq(0), seq(4), 1.1)
    board.detect_loss(1.1, 0.0)
    board.retransmitted(seq(0), seq(1), 1.1)
    assert board.lost == 0 and board.pipe(4 * MSS) == MSS
    board.sent(seq(4), seq(5), 1.1)                        # after it, in the same instant
    board.sack([block(4, 5), block(1, 4)], seq(0), seq(5), 1.15)
    assert board.detect_loss(1.15, 0.0) == (MSS, 0.0)
    assert flags_by_segment(board, 1) == [LOST]


def test_a_sacked_retransmission_advances_rack_whatever_timestamp_the_ack_echoes():
    """Holes 0 and 2 resent at 1.2 (0 first); the SACK for 2's copy echoes
    the timestamp of the last in-order segment, sent at 1.0, as a Linux
    receiver does: still the copy of 2 arrived, so 0's copy, sent before
    it, is lost once RACK's RTT has passed."""
    board = board_with((0, 4, 1.0))
    board.sack([block(1, 2), block(3, 4)], seq(0), seq(4), 1.1)
    board.detect_loss(1.1, 0.0)
    board.retransmitted(seq(0), seq(1), 1.2)
    board.retransmitted(seq(2), seq(3), 1.2)
    board.tsecr = int(1.0 * 1000)
    board.sack([block(1, 4)], seq(0), seq(4), 1.3)
    assert board.rack_xmit_ts == 1.2
    assert board.detect_loss(1.4, 0.0) == (MSS, 0.0)
    assert flags_by_segment(board, 1) == [LOST]


def test_a_probe_of_data_not_deemed_lost_counts_twice_in_the_pipe():
    board = board_with((0, 4, 1.0))
    board.retransmitted(seq(3), seq(4), 1.2)
    assert board.extra == MSS and board.pipe(4 * MSS) == 5 * MSS
    board.acked(seq(4), 1.3)
    assert board.extra == 0 and board.records == []


def test_an_ambiguous_ack_of_a_retransmission_gives_no_rtt_sample():
    board = board_with((0, 2, 1.0))
    board.acked(seq(1), 1.1)                               # min RTT 0.1
    board.retransmitted(seq(1), seq(2), 1.5)
    board.acked(seq(2), 1.52)                              # 20 ms: the original's ACK
    assert board.rack_rtt == pytest.approx(0.1) and board.rack_xmit_ts == 1.0
    board = board_with((0, 2, 1.0))
    board.acked(seq(1), 1.1)
    board.retransmitted(seq(1), seq(2), 1.5)
    board.acked(seq(2), 1.65)
    assert board.rack_rtt == pytest.approx(0.15) and board.rack_xmit_ts == 1.5


def test_the_reordering_window():
    board = board_with((0, 8, 1.0))
    board.acked(seq(1), 1.04)                              # min RTT 40 ms
    assert board.reo_wnd(0.05, False, MSS) == pytest.approx(0.01)
    # No reordering seen: none in recovery, none with DupThresh SACKed.
    assert board.reo_wnd(0.05, True, MSS) == 0.0
    board.sack([block(3, 6)], seq(1), seq(8), 1.05)
    assert board.reo_wnd(0.05, False, MSS) == 0.0
    # Segment 2 arrives after 3 to 5, never resent: reordering.
    board.acked(seq(6), 1.06)
    assert board.reordering_seen
    assert board.reo_wnd(0.05, True, MSS) == pytest.approx(0.01)
    # Each round trip with a D-SACK widens it by min_rtt/4, up to SRTT ...
    board.on_dsack(seq(6), seq(8))
    board.on_dsack(seq(6), seq(8))                          # same round: once
    assert board.reo_wnd(0.05, True, MSS) == pytest.approx(0.02)
    for _ in range(5):
        board.on_dsack(seq(8), seq(8))
    assert board.reo_wnd(0.05, True, MSS) == pytest.approx(0.05)
    # ... and it narrows back after 16 recoveries without one.
    for _ in range(16):
        board.recovery_ended()
    assert board.reo_wnd(0.05, True, MSS) == pytest.approx(0.01)


def test_timeout_marks_the_head_and_old_segments_and_keeps_sacks():
    board = board_with((0, 3, 1.0), (3, 5, 1.9))
    board.sack([block(1, 2)], seq(0), seq(5), 2.0)         # RACK RTT 1.0
    board.mark_lost_on_timeout(2.2, 0.0, everything=False)
    assert flags_by_segment(board, 5) == [LOST, SACKED, LOST, 0, 0]
    board.mark_lost_on_timeout(2.2, 0.0, everything=True)
    assert flags_by_segment(board, 5) == [LOST, SACKED, LOST, LOST, LOST]


def test_a_sacked_head_at_a_timeout_means_the_peer_reneged():
    board = board_with((0, 3, 1.0))
    board.sack([block(0, 1), block(2, 3)], seq(0), seq(3), 1.1)   # SACKed, never ACKed
    board.mark_lost_on_timeout(3.0, 0.0, everything=False)
    assert board.sacked == 0
    assert flags_by_segment(board, 3) == [LOST, LOST, LOST]


def test_forget_and_unmark():
    board = board_with((0, 4, 1.0))
    board.sack([block(2, 3)], seq(0), seq(4), 1.1)
    board.detect_loss(1.2, 0.0)
    board.retransmitted(seq(0), seq(1), 1.2)
    board.unmark_lost()
    assert flags_by_segment(board, 4) == [0, 0, SACKED, 0]
    assert board.records[0][3] & EVER_RETRANS
    board.forget()
    assert board.sacked == board.lost == board.extra == 0
    assert board.pipe(4 * MSS) == 4 * MSS
