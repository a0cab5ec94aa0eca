"""Loss recovery: retransmission timeout with backoff, fast retransmit, NewReno
without SACK, RFC 6675 with it."""
import errno

import pytest

from mtcpshim.stack.tcp import TcpConfig
from mtcpshim.stack.wire.tcp import ACK, PSH

MSS = 1460


def test_retransmission_timeout_backs_off_exponentially(tcp_established):
    t = tcp_established
    # The handshake measured 100 ms: RTO = srtt + 4 * rttvar = 0.3 s.
    assert t.conn.rtt.rto == pytest.approx(0.3)
    t.write(b"data")
    segment = t.tx(ACK | PSH, t.L + 1, t.R + 1, b"data")
    assert t.recv() == [segment]
    for expected_wait in (0.3, 0.6, 1.2, 2.4):
        assert t.wait_for_timer() == pytest.approx(expected_wait)
        assert t.recv() == [segment]
    t.send(t.rx(ACK, t.R + 1, t.L + 5))
    assert t.conn.deadline() is None


def test_retransmission_gives_up_after_retries(make_tcp_trace):
    t = make_tcp_trace(config=TcpConfig(timestamps=False, retries=3))
    t.establish()
    t.write(b"data")
    for _ in range(4):
        t.recv()
        t.wait_for_timer()
    assert t.recv() == []
    t.assert_failed(errno.ETIMEDOUT)


def test_timeout_restarts_from_one_segment_and_goes_back_n(tcp_established):
    t = tcp_established
    data = bytes(range(250)) * 18                 # 4500 bytes: 1460 1460 1460 120
    t.write(data)
    assert len(t.recv()) == 4
    t.wait_for_timer()
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1, data[:MSS])]
    assert t.conn.cwnd == MSS
    t.send(t.rx(ACK, t.R + 1, t.L + 1 + MSS))     # slow start: two more
    assert t.recv() == [t.tx(ACK, t.L + 1 + MSS, t.R + 1, data[MSS:2 * MSS]),
                        t.tx(ACK, t.L + 1 + 2 * MSS, t.R + 1, data[2 * MSS:3 * MSS])]


def test_fast_retransmit_and_newreno_recovery(make_tcp_trace):
    t = make_tcp_trace(config=TcpConfig(timestamps=False, congestion="reno"))
    t.establish()
    data = b"".join(bytes([65 + i]) * MSS for i in range(12))
    t.write(data[:10 * MSS])
    sent = t.recv()
    assert len(sent) == 10                        # initial window: 10 segments

    def ack(segment_index, window=65535):
        return t.rx(ACK, t.R + 1, t.L + 1 + segment_index * MSS, window=window)

    # Segments 1 and 4 are lost.  Segment 0 arrives, then 2 and 3: two
    # duplicate ACKs change nothing.
    t.send(ack(1))
    t.send(ack(1), ack(1))
    assert t.recv() == []
    # Segment 5: the third duplicate ACK retransmits segment 1 at once.
    t.send(ack(1))
    assert t.recv() == [sent[1]]
    assert t.conn.ssthresh == 9 * MSS // 2
    assert t.conn.cwnd == t.conn.ssthresh + 3 * MSS
    # The application writes more; segments 6 to 9 arrive and every
    # duplicate ACK inflates the window by one segment, until new data fits.
    t.write(data[10 * MSS:])
    assert t.recv() == []
    t.send(ack(1), ack(1), ack(1), ack(1))
    assert t.recv() == [t.tx(ACK, t.L + 1 + 10 * MSS, t.R + 1, data[10 * MSS:11 * MSS]),
                        t.tx(ACK | PSH, t.L + 1 + 11 * MSS, t.R + 1, data[11 * MSS:])]
    # The retransmitted segment 1 arrives: a partial ACK, up to the next
    # hole.  NewReno retransmits segment 4 at once, without waiting for
    # three more duplicates.
    t.send(ack(4))
    assert t.recv() == [sent[4]]
    assert t.conn._in_recovery
    # Segment 4 arrives: everything up to the recovery point is acknowledged.
    t.send(ack(10))
    assert not t.conn._in_recovery
    assert t.conn.cwnd == t.conn.ssthresh
    t.send(ack(12))
    assert len(t.send_buf) == 0
    assert t.conn.deadline() is None


def test_no_second_fast_retransmit_for_losses_of_the_same_window(tcp_established):
    t = tcp_established
    t.write(bytes(10 * MSS))
    t.recv()
    t.wait_for_timer()                            # timeout: recover = everything sent
    t.recv()
    ack = t.rx(ACK, t.R + 1, t.L + 1)
    t.send(ack, ack, ack)
    assert t.recv() == []                         # RFC 6582 section 4
    assert not t.conn._in_recovery


def test_karn_no_rtt_sample_from_a_retransmitted_segment(tcp_established):
    t = tcp_established
    t.write(b"data")
    t.recv()
    t.wait_for_timer()
    t.recv()
    srtt, backed_off = t.conn.rtt.srtt, t.conn.rtt.rto
    t.now += 0.05
    t.send(t.rx(ACK, t.R + 1, t.L + 5))
    assert (t.conn.rtt.srtt, t.conn.rtt.rto) == (srtt, backed_off)


def test_limited_transmit_sends_new_data_on_the_first_two_duplicate_acks(tcp_established):
    t = tcp_established
    data = bytes(12 * MSS)
    t.write(data)
    assert len(t.recv()) == 10                    # the congestion window is full
    duplicate = t.rx(ACK, t.R + 1, t.L + 1)
    t.send(duplicate)
    assert t.recv() == [t.tx(ACK, t.L + 1 + 10 * MSS, t.R + 1, data[:MSS])]
    t.send(duplicate)
    assert t.recv() == [t.tx(ACK | PSH, t.L + 1 + 11 * MSS, t.R + 1, data[:MSS])]
    t.send(duplicate)                             # the third: fast retransmit
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1, data[:MSS])]


def test_tcp_info_reports_rtt_window_flight_and_retransmissions(tcp_established):
    """TCP_INFO's figures follow the connection: the handshake's 100 ms
    sample, the initial window, segments in flight, and a timeout's
    retransmission counted both in total and in a row."""
    t = tcp_established
    info = t.conn.info()
    assert (info["rtt_us"], info["rto_us"], info["snd_mss"]) == (100_000, 300_000, MSS)
    assert (info["snd_cwnd"], info["snd_ssthresh"], info["unacked"]) == (10, 0x7FFFFFFF, 0)
    t.write(b"x" * (2 * MSS + 1))
    t.recv()
    assert t.conn.info()["unacked"] == 3
    t.wait_for_timer()
    t.recv()
    info = t.conn.info()
    assert (info["total_retrans"], info["retransmits"], info["snd_cwnd"]) == (1, 1, 1)
    t.send(t.rx(ACK, t.R + 1, t.L + 1 + 2 * MSS + 1))
    info = t.conn.info()
    assert (info["total_retrans"], info["retransmits"], info["unacked"]) == (1, 0, 0)
