"""RFC 9293 state machine corners: the segment acceptability table,
simultaneous open and close across the sequence wrap, and every path
through the closing states."""
import pytest

from mtcpshim.stack.tcp import EV_ESTABLISHED, EV_FIN_ACKED, EV_PEER_FIN, TcpState
from mtcpshim.stack.wire.tcp import ACK, FIN, PSH, SYN

WRAP = 2**32 - 2      # ISS whose SYN and first data byte straddle 2**32


@pytest.fixture
def wrapped(make_tcp_trace):
    t = make_tcp_trace(local_iss=WRAP, remote_iss=WRAP, buffer_size=1000)
    t.establish()
    return t


# RFC 9293 3.10.7.4, the four cases, against RCV.NXT = R + 1 (which wraps
# to 2**32 - 1) and a 1000-byte window.

@pytest.mark.parametrize("offset, acceptable", [
    (0, True), (999, True), (1000, False), (-1, False)])
def test_empty_segment_is_acceptable_inside_the_window(wrapped, offset, acceptable):
    t = wrapped
    t.send(t.rx(ACK, t.R + 1 + offset, t.L + 1, window=777))
    assert (t.conn.snd_wnd == 777) is acceptable
    assert (t.recv() == []) is acceptable                 # unacceptable: an ACK back


@pytest.mark.parametrize("offset, length, delivered", [
    (0, 10, b"0123456789"),
    (-5, 10, b"56789"),                                   # overlaps the left edge
    (995, 10, b""),                                       # overlaps the right edge: held
    (1000, 10, None),                                     # beyond: unacceptable
    (-10, 10, None),                                      # entirely old
])
def test_data_segment_is_acceptable_when_either_end_is_in_window(
        wrapped, offset, length, delivered):
    t = wrapped
    payload = b"0123456789"[:length]
    t.send(t.rx(ACK | PSH, t.R + 1 + offset, t.L + 1, payload))
    if delivered is None:
        assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1, window=1000)]
        assert t.conn._assembler.sack_blocks() == []
    else:
        assert t.read() == delivered


def test_zero_window_takes_only_the_ack_of_a_segment_at_rcv_nxt(wrapped):
    t = wrapped
    t.send(t.rx(ACK | PSH, t.R + 1, t.L + 1, bytes(1000)))
    t.wait_for_timer()                                    # the delayed ACK
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1001, window=0)]
    t.write(b"out")
    t.recv()
    # Data at RCV.NXT into a zero window: not taken, but its ACK is.
    t.send(t.rx(ACK | PSH, t.R + 1001, t.L + 4, b"more"))
    assert t.conn.snd_una == (t.L + 4) % 2**32
    assert t.recv() == [t.tx(ACK, t.L + 4, t.R + 1001, window=0)]
    # An empty segment elsewhere is not acceptable with a zero window.
    t.now += 1.0
    t.send(t.rx(ACK, t.R + 1002, t.L + 4, window=5))
    assert t.conn.snd_wnd != 5


def test_simultaneous_open_across_the_wrap(make_tcp_trace):
    t = make_tcp_trace(local_iss=2**32 - 1, remote_iss=2**32 - 1)
    t.connect()
    t.recv()
    t.send(t.rx(SYN, t.R, mss=1460))                      # the SYNs cross
    assert t.conn.state == TcpState.SYN_RECEIVED
    assert t.recv() == [t.tx(SYN | ACK, t.L, t.R + 1, mss=1460)]
    t.send(t.rx(SYN | ACK, t.R, t.L + 1, mss=1460))
    assert t.conn.state == TcpState.ESTABLISHED
    assert t.events() == EV_ESTABLISHED
    t.write(b"hello")
    assert t.recv() == [t.tx(ACK | PSH, 0, 0, b"hello")]


def test_simultaneous_open_completed_by_a_plain_ack(tcp_trace):
    t = tcp_trace
    t.connect()
    t.recv()
    t.send(t.rx(SYN, t.R, mss=1460))
    t.recv()
    t.send(t.rx(ACK, t.R + 1, t.L + 1))                   # the peer saw our SYN-ACK first
    assert t.conn.state == TcpState.ESTABLISHED


def test_simultaneous_close_across_the_wrap(wrapped):
    t = wrapped
    t.conn.close(t.now)
    assert t.recv() == [t.tx(ACK | FIN, t.L + 1, t.R + 1)]
    t.send(t.rx(ACK | FIN, t.R + 1, t.L + 1))            # crossed our FIN
    assert t.conn.state == TcpState.CLOSING
    assert t.events() == EV_PEER_FIN
    assert t.recv() == [t.tx(ACK, t.L + 2, t.R + 2, window=999)]
    t.wait_for_timer()                                   # no ACK of our FIN yet: it goes again
    assert t.recv() == [t.tx(ACK | FIN, t.L + 1, t.R + 2, window=999)]
    t.send(t.rx(ACK, t.R + 2, t.L + 2))
    assert t.conn.state == TcpState.TIME_WAIT
    assert t.events() == EV_FIN_ACKED                    # the owner of a closed socket frees it now
    t.wait(61)
    assert t.conn.state == TcpState.CLOSED


def test_fin_wait_1_to_time_wait_directly_and_data_before_fin(wrapped):
    t = wrapped
    t.conn.shutdown_write(t.now)                          # still reading, unlike close()
    t.recv()
    # One segment: the peer's last data, its FIN, and the ACK of ours.
    t.send(t.rx(ACK | PSH | FIN, t.R + 1, t.L + 2, b"bye"))
    assert t.conn.state == TcpState.TIME_WAIT
    assert t.read() == b"bye"
    assert t.recv() == [t.tx(ACK, t.L + 2, t.R + 5, window=996)]


def test_last_ack_retransmits_fin_until_acknowledged(wrapped):
    t = wrapped
    t.send(t.rx(ACK | FIN, t.R + 1, t.L + 1))
    t.recv()
    t.conn.close(t.now)
    fin = t.tx(ACK | FIN, t.L + 1, t.R + 2, window=999)
    assert t.recv() == [fin]
    t.wait_for_timer()
    assert t.recv() == [fin]
    t.send(t.rx(ACK, t.R + 2, t.L + 2))
    assert t.conn.state == TcpState.CLOSED


def test_an_impossible_state_fails_the_invariant_check(tcp_established):
    """The checks every trace step runs can fail: a negative control."""
    t = tcp_established
    t.conn.snd_nxt = (t.conn.snd_max + 10) & 0xFFFFFFFF
    with pytest.raises(AssertionError, match="snd_nxt"):
        t.check()
    t.conn.snd_nxt = t.conn.snd_max
    t.conn.rcv_adv = (t.conn.rcv_adv - 100) & 0xFFFFFFFF
    with pytest.raises(AssertionError, match="right edge moved left"):
        t.check()
