"""Closing: FIN in both orders (simultaneous close is in test_tcp_states), half-close,
TIME_WAIT, resets, challenge ACKs."""
import errno

import pytest

from mtcpshim.stack.tcp import (EV_CLOSED, EV_FIN_ACKED, EV_PEER_FIN, EV_READABLE, EV_WRITABLE,
                       TcpConfig, TcpState, reset_for)
from mtcpshim.stack.wire.tcp import ACK, FIN, PSH, RST, SYN, TcpSegment


def test_active_close_through_time_wait(tcp_established):
    t = tcp_established
    t.conn.close(t.now)
    assert t.conn.state == TcpState.FIN_WAIT_1
    assert t.recv() == [t.tx(ACK | FIN, t.L + 1, t.R + 1)]
    t.send(t.rx(ACK, t.R + 1, t.L + 2))
    assert t.conn.state == TcpState.FIN_WAIT_2
    assert t.events() == EV_FIN_ACKED             # the owner may free the send side now
    t.send(t.rx(ACK | FIN, t.R + 1, t.L + 2))
    assert t.conn.state == TcpState.TIME_WAIT
    assert t.events() == EV_PEER_FIN
    # The FIN takes a sequence number but no buffer space: the window's
    # right edge stays put, so the window reads one less.
    assert t.recv() == [t.tx(ACK, t.L + 2, t.R + 2, window=59999)]
    t.wait(59.9)
    assert t.conn.state == TcpState.TIME_WAIT
    t.wait(0.2)
    assert t.conn.state == TcpState.CLOSED
    assert t.events() == EV_CLOSED
    assert t.conn.error == 0


def test_time_wait_acks_a_retransmitted_fin_and_restarts(tcp_established):
    t = tcp_established
    t.conn.close(t.now)
    t.send(t.rx(ACK | FIN, t.R + 1, t.L + 2))
    t.recv()
    t.wait(30)
    t.send(t.rx(ACK | FIN, t.R + 1, t.L + 2))     # our ACK was lost
    assert t.recv() == [t.tx(ACK, t.L + 2, t.R + 2, window=59999)]
    t.wait(59)
    assert t.conn.state == TcpState.TIME_WAIT
    t.wait(1.1)
    assert t.conn.state == TcpState.CLOSED


def test_passive_close(tcp_established):
    t = tcp_established
    t.send(t.rx(ACK | FIN, t.R + 1, t.L + 1))
    assert t.conn.state == TcpState.CLOSE_WAIT
    assert t.events() == EV_PEER_FIN
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 2, window=59999)]  # at once
    t.write(b"bye")                                   # half-closed: we may still send
    assert t.recv() == [t.tx(ACK | PSH, t.L + 1, t.R + 2, b"bye", window=59999)]
    t.conn.close(t.now)
    assert t.conn.state == TcpState.LAST_ACK
    assert t.recv() == [t.tx(ACK | FIN, t.L + 4, t.R + 2, window=59999)]
    t.send(t.rx(ACK, t.R + 2, t.L + 5))
    assert t.conn.state == TcpState.CLOSED
    assert t.events() == EV_WRITABLE | EV_CLOSED


def test_fin_follows_the_queued_data(tcp_established):
    t = tcp_established
    t.write(b"a" * 1460)
    t.recv()
    t.send_buf.write(b"b" * 2000)
    t.conn.close(t.now)
    assert t.recv() == [t.tx(ACK, t.L + 1461, t.R + 1, b"b" * 1460),
                        t.tx(ACK | PSH | FIN, t.L + 2921, t.R + 1, b"b" * 540)]


def test_fin_that_acks_our_fin_goes_straight_to_time_wait(tcp_established):
    t = tcp_established
    t.conn.close(t.now)
    t.recv()
    t.send(t.rx(ACK | FIN, t.R + 1, t.L + 2))
    assert t.conn.state == TcpState.TIME_WAIT


def test_half_close_keeps_receiving(tcp_established):
    t = tcp_established
    t.conn.shutdown_write(t.now)
    assert t.recv() == [t.tx(ACK | FIN, t.L + 1, t.R + 1)]
    t.send(t.rx(ACK, t.R + 1, t.L + 2))
    assert t.conn.state == TcpState.FIN_WAIT_2
    assert t.events() == EV_FIN_ACKED             # no space freed, nothing left to send
    t.send(t.rx(ACK | PSH, t.R + 1, t.L + 2, b"late data"))
    assert t.events() == EV_READABLE
    assert t.read() == b"late data"
    t.send(t.rx(ACK | FIN, t.R + 10, t.L + 2))
    assert t.recv() == [t.tx(ACK, t.L + 2, t.R + 11, window=59990)]
    assert t.conn.state == TcpState.TIME_WAIT


def test_fin_arriving_before_missing_data_waits_for_it(tcp_established):
    t = tcp_established
    t.send(t.rx(ACK | FIN, t.R + 4, t.L + 1, b"def"))
    assert t.conn.state == TcpState.ESTABLISHED
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1)]
    t.send(t.rx(ACK, t.R + 1, t.L + 1, b"abc"))
    assert t.conn.state == TcpState.CLOSE_WAIT
    # The FIN took a sequence number but no buffer space: the edge holds.
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 8, window=59993)]
    assert t.read() == b"abcdef"


def test_orphaned_fin_wait_2_times_out(tcp_established):
    t = tcp_established
    t.conn.close(t.now)
    t.send(t.rx(ACK, t.R + 1, t.L + 2))
    t.wait(60.1)
    assert t.conn.state == TcpState.CLOSED


def test_data_for_a_closed_socket_is_answered_with_reset(tcp_established):
    t = tcp_established
    t.conn.close(t.now)
    t.recv()
    t.send(t.rx(ACK, t.R + 1, t.L + 2, b"nobody reads this"))
    assert t.recv() == [t.tx(RST | ACK, t.L + 2, t.R + 1, window=0)]
    assert t.conn.state == TcpState.CLOSED


def test_close_with_unread_data_resets(tcp_established):
    t = tcp_established
    t.send(t.rx(ACK | PSH, t.R + 1, t.L + 1, b"unread"))
    t.conn.close(t.now)
    assert t.recv() == [t.tx(RST | ACK, t.L + 1, t.R + 7, window=0)]
    assert t.conn.state == TcpState.CLOSED


def test_abort_sends_reset(tcp_established):
    t = tcp_established
    t.conn.abort(t.now)
    assert t.recv() == [t.tx(RST | ACK, t.L + 1, t.R + 1, window=0)]
    assert t.events() == EV_CLOSED


def test_reset_at_rcv_nxt_resets_the_connection(tcp_established):
    t = tcp_established
    t.send(t.rx(RST, t.R + 1))
    t.assert_failed(errno.ECONNRESET)
    assert t.recv() == []


# Outside the window a reset is ignored (test_tcp_rfc5961.py covers every state).
@pytest.mark.parametrize("flags, offset", [(RST, 100), (SYN, 500)], ids=["inexact-reset", "syn"])
def test_an_inexact_reset_or_a_syn_on_established_gets_a_challenge_ack(tcp_established, flags, offset):
    t = tcp_established
    t.send(t.rx(flags, t.R + offset))
    assert t.conn.state == TcpState.ESTABLISHED
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1)]


def test_out_of_window_segment_is_answered_with_an_ack(tcp_established):
    t = tcp_established
    t.send(t.rx(ACK, t.R + 70000, t.L + 1, b"far"))
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1)]
    t.send(t.rx(ACK, t.R + 1, t.L + 999))             # acknowledges unsent data
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1)]


def test_paws_drops_a_segment_with_an_old_timestamp(make_tcp_trace):
    t = make_tcp_trace(config=TcpConfig())
    t.establish(timestamp=(1000, 0))
    t.send(t.rx(ACK, t.R + 1, t.L + 1, b"new", timestamp=(1010, 100)))
    t.send(t.rx(ACK, t.R + 4, t.L + 1, b"old", timestamp=(900, 100)))
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 4, window=59997, timestamp=(100, 1010))]
    assert t.read() == b"new"


def test_keepalive_probes_then_gives_up(tcp_established):
    t = tcp_established
    t.conn.keepalive, t.conn.keepidle, t.conn.keepintvl, t.conn.keepcnt = True, 10.0, 1.0, 2
    probe = t.tx(ACK, t.L, t.R + 1)
    assert t.wait_for_timer() == pytest.approx(10.0)
    assert t.recv() == [probe]
    t.send(t.rx(ACK, t.R + 1, t.L + 1))               # the peer is alive
    assert t.wait_for_timer() == pytest.approx(10.0)
    assert t.recv() == [probe]
    assert t.wait_for_timer() == pytest.approx(1.0)
    assert t.recv() == [probe]
    t.wait_for_timer()
    assert t.recv() == [t.tx(RST | ACK, t.L + 1, t.R + 1, window=0)]
    assert t.conn.error == errno.ETIMEDOUT


def test_reset_for_segments_without_a_connection():
    syn = TcpSegment(1234, 80, 100, 0, SYN, 512)
    assert reset_for(syn) == TcpSegment(80, 1234, 0, 101, RST | ACK, 0)
    data = TcpSegment(1234, 80, 100, 777, ACK | PSH, 512, b"xyz")
    assert reset_for(data) == TcpSegment(80, 1234, 777, 0, RST, 0)
    assert reset_for(TcpSegment(1234, 80, 100, 0, RST, 0)) is None
