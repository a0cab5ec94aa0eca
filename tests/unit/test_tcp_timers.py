"""Timers that end or unblock a connection: TCP_USER_TIMEOUT, keepalive
(TCP_KEEPIDLE / TCP_KEEPINTVL / TCP_KEEPCNT), and the persist timer as
the sender's silly-window override."""
import errno

import pytest

from mtcpshim.stack.tcp import TcpConfig, TcpState
from mtcpshim.stack.wire.tcp import ACK, PSH, RST, SYN


def test_user_timeout_aborts_when_data_stays_unacknowledged(tcp_established):
    t = tcp_established
    t.conn.user_timeout = 2.0
    t.write(b"data")
    t.recv()
    waited = 0.0
    for _ in range(10):
        waited += t.wait_for_timer()
        if t.conn.state == TcpState.CLOSED:
            break
    # RTO 0.3 doubling: 0.3, 0.9, 2.1 would overshoot; the last timer is
    # clamped to the user timeout instead.
    assert waited == pytest.approx(2.0)
    t.assert_failed(errno.ETIMEDOUT)


def test_user_timeout_restarts_with_every_acknowledgment(tcp_established):
    t = tcp_established
    t.conn.user_timeout = 1.0
    for _ in range(5):
        t.write(b"x")
        t.recv()
        t.wait(0.8)                                      # two RTOs, not yet fatal
        t.send(t.rx(ACK, t.R + 1, t.conn.snd_max))
    assert t.conn.state == TcpState.ESTABLISHED


def test_user_timeout_bounds_connect(tcp_trace):
    t = tcp_trace
    t.config.user_timeout = 2.5
    t.connect()
    t.recv()
    t.wait(2.4)
    assert t.conn.state == TcpState.SYN_SENT
    t.wait(0.2)
    assert t.conn.state == TcpState.CLOSED
    assert t.conn.error == errno.ETIMEDOUT


def test_user_timeout_bounds_a_zero_window_stall(tcp_established):
    t = tcp_established
    t.conn.user_timeout = 3.0
    t.send(t.rx(ACK, t.R + 1, t.L + 1, window=0))
    t.write(b"blocked")
    for _ in range(20):
        if t.conn.state == TcpState.CLOSED:
            break
        t.wait_for_timer()
        t.recv()
        t.send(t.rx(ACK, t.R + 1, t.L + 1, window=0))    # probes are answered...
    # ...but the data never leaves: ETIMEDOUT once the stall exceeds 3 s.
    assert t.conn.error == errno.ETIMEDOUT
    assert 3.0 <= t.now < 3.0 + 2.4


def test_keepalive_follows_idle_interval_and_count(tcp_established):
    t = tcp_established
    t.conn.keepalive, t.conn.keepidle, t.conn.keepintvl, t.conn.keepcnt = True, 30.0, 5.0, 3
    probe = t.tx(ACK, t.L, t.R + 1)
    assert t.wait_for_timer() == pytest.approx(30.0)      # TCP_KEEPIDLE of silence
    assert t.recv() == [probe]
    assert t.wait_for_timer() == pytest.approx(5.0)       # then every TCP_KEEPINTVL
    assert t.recv() == [probe]
    assert t.wait_for_timer() == pytest.approx(5.0)
    assert t.recv() == [probe]
    # TCP_KEEPCNT probes unanswered: one interval later, reset.
    assert t.wait_for_timer() == pytest.approx(5.0)
    assert t.recv() == [t.tx(RST | ACK, t.L + 1, t.R + 1, window=0)]
    assert t.conn.error == errno.ETIMEDOUT


def test_keepalive_waits_while_data_is_in_flight(tcp_established):
    t = tcp_established
    t.conn.keepalive, t.conn.keepidle = True, 1.0
    t.write(b"x")
    t.recv()
    assert t.conn.deadline() == pytest.approx(t.now + t.conn.rtt.rto)   # the RTO, not keepalive
    t.send(t.rx(ACK, t.R + 1, t.L + 2))
    assert t.conn.deadline() == pytest.approx(t.now + 1.0)


def test_keepalive_with_user_timeout_gives_up_by_time_not_count(tcp_established):
    t = tcp_established
    t.conn.keepalive, t.conn.keepidle, t.conn.keepintvl, t.conn.keepcnt = True, 10.0, 1.0, 100
    t.conn.user_timeout = 12.5
    for _ in range(10):
        if t.conn.state == TcpState.CLOSED:
            break
        t.wait_for_timer()
    # The peer was last heard at 0.1 s (the handshake): probes at 10.1,
    # 11.1 and 12.1 s; at 13.1 s it has been silent for more than 12.5 s.
    assert t.now == pytest.approx(13.1)
    assert t.conn.error == errno.ETIMEDOUT


def test_sender_holds_a_runt_the_window_forces_until_the_persist_timer(tcp_established):
    t = tcp_established
    # The peer offered 65535 once; now it offers 100 bytes.
    t.send(t.rx(ACK, t.R + 1, t.L + 1, window=100))
    t.write(b"y" * 1000)
    assert t.recv() == []                                 # 100 < 65535 / 2: silly
    assert t.conn.timers.persist is not None
    t.wait_for_timer()
    # The override: what the window takes, in one segment.
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1, b"y" * 100)]
    t.send(t.rx(ACK, t.R + 1, t.L + 101, window=30000))
    assert [len(s.payload) for s in t.recv()] == [900]


def test_small_window_peer_gets_segments_of_half_its_window(tcp_trace):
    t = tcp_trace
    t.accept(t.rx(SYN, t.R, mss=1460, window=1000))      # a peer that never offers more
    t.recv()
    t.send(t.rx(ACK, t.R + 1, t.L + 1, window=1000))
    t.write(b"z" * 3000)
    assert [len(s.payload) for s in t.recv()] == [1000]
    t.send(t.rx(ACK, t.R + 1, t.L + 1001, window=600))   # at least half: sent at once
    assert [len(s.payload) for s in t.recv()] == [600]
    t.send(t.rx(ACK, t.R + 1, t.L + 1601, window=400))   # less than half: held
    assert t.recv() == []


def test_tail_and_nagle_still_decide_short_segments(tcp_established):
    t = tcp_established
    t.write(b"a" * 1500)                                  # a full segment and a short tail
    assert [len(s.payload) for s in t.recv()] == [1460, 40]
    t.write(b"b")                                         # Nagle: a short one is in flight
    assert t.recv() == []
    t.send(t.rx(ACK, t.R + 1, t.L + 1501))
    assert t.recv() == [t.tx(ACK | PSH, t.L + 1501, t.R + 1, b"b")]


def test_user_timeout_defaults_to_the_config():
    assert TcpConfig().user_timeout == 0.0
    assert TcpConfig(user_timeout=5.0).user_timeout == 5.0
