"""Opening handshakes: option negotiation, retransmission, refusal."""
import errno

import pytest

from mtcpshim.stack.tcp import EV_ESTABLISHED, TcpConfig, TcpState
from mtcpshim.stack.wire.tcp import ACK, PSH, RST, SYN


def test_passive_open_without_options(tcp_trace):
    t = tcp_trace
    t.accept(t.rx(SYN, t.R))
    # MSS is always announced (as Linux); nothing else was offered.
    assert t.recv() == [t.tx(SYN | ACK, t.L, t.R + 1, mss=1460)]
    assert t.conn.state == TcpState.SYN_RECEIVED
    t.send(t.rx(ACK, t.R + 1, t.L + 1))
    assert t.conn.state == TcpState.ESTABLISHED
    assert t.events() == EV_ESTABLISHED
    assert t.conn.send_mss == 536               # RFC 9293 default without the option
    assert (t.conn.ts_enabled, t.conn.sack_enabled, t.conn.snd_wscale) == (False, False, 0)


def test_passive_open_negotiates_what_the_syn_offered(make_tcp_trace):
    t = make_tcp_trace(config=TcpConfig())
    t.now = 5.0
    t.accept(t.rx(SYN, t.R, window=29200, mss=1400, wscale=7, sack_permitted=True,
                  timestamp=(100, 0)))
    assert t.recv() == [t.tx(SYN | ACK, t.L, t.R + 1, mss=1460, wscale=0,
                             sack_permitted=True, timestamp=(5000, 100))]
    t.now = 5.1
    t.send(t.rx(ACK, t.R + 1, t.L + 1, window=1000, timestamp=(101, 5000)))
    assert t.conn.state == TcpState.ESTABLISHED
    assert t.conn.snd_wnd == 1000 << 7
    assert t.conn.send_mss == 1400 - 12         # timestamps take 12 option bytes
    assert t.conn.rtt.srtt == pytest.approx(0.1)
    t.write(b"hi")
    assert t.recv() == [t.tx(ACK | PSH, t.L + 1, t.R + 1, b"hi", timestamp=(5100, 101))]


def test_passive_open_with_sack_only(make_tcp_trace):
    t = make_tcp_trace(config=TcpConfig())
    t.accept(t.rx(SYN, t.R, mss=1460, sack_permitted=True))
    assert t.recv() == [t.tx(SYN | ACK, t.L, t.R + 1, mss=1460, sack_permitted=True)]


def test_active_open_offers_every_option(make_tcp_trace):
    t = make_tcp_trace(config=TcpConfig(), buffer_size=1 << 20)
    t.now = 1.0
    t.connect()
    assert t.recv() == [t.tx(SYN, t.L, 0, window=65535, mss=1460, wscale=5,
                             sack_permitted=True, timestamp=(1000, 0))]
    t.now = 1.05
    t.send(t.rx(SYN | ACK, t.R, t.L + 1, window=29200, mss=1460, wscale=7,
                sack_permitted=True, timestamp=(77, 1000)))
    # 1 MiB buffer, shift 5: 32768 in the window field.
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1, window=32768, timestamp=(1050, 77))]
    assert t.conn.state == TcpState.ESTABLISHED
    assert t.events() == EV_ESTABLISHED
    assert t.conn.snd_wnd == 29200              # a SYN-ACK's window is not scaled
    t.send(t.rx(ACK, t.R + 1, t.L + 1, window=1000, timestamp=(78, 1050)))
    assert t.conn.snd_wnd == 128000


def test_active_open_to_peer_without_options(make_tcp_trace):
    t = make_tcp_trace(config=TcpConfig())
    t.connect()
    t.recv()
    t.send(t.rx(SYN | ACK, t.R, t.L + 1, window=8192))
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1)]
    t.write(b"x" * 1000)
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1, b"x" * 536),
                        t.tx(ACK | PSH, t.L + 537, t.R + 1, b"x" * 464)]


def test_data_queued_before_established_leaves_with_the_handshake(tcp_trace):
    t = tcp_trace
    t.connect()
    t.recv()
    t.write(b"early")
    assert t.recv() == []
    t.send(t.rx(SYN | ACK, t.R, t.L + 1, mss=1460))
    assert t.recv() == [t.tx(ACK | PSH, t.L + 1, t.R + 1, b"early")]


def test_syn_retransmitted_with_backoff_then_gives_up(make_tcp_trace):
    t = make_tcp_trace(config=TcpConfig(timestamps=False, syn_retries=2))
    t.connect()
    syn = t.tx(SYN, t.L, 0, mss=1460, wscale=0, sack_permitted=True)
    assert t.recv() == [syn]
    assert t.wait_for_timer() == 1.0
    assert t.recv() == [syn]
    assert t.wait_for_timer() == 2.0
    assert t.recv() == [syn]
    assert t.wait_for_timer() == 4.0
    assert t.recv() == []
    t.assert_failed(errno.ETIMEDOUT)


def test_connection_refused(tcp_trace):
    t = tcp_trace
    t.connect()
    t.recv()
    t.send(t.rx(RST | ACK, 0, t.L + 1))
    t.assert_failed(errno.ECONNREFUSED)
    assert t.conn.deadline() is None


def test_syn_sent_ignores_rst_without_acceptable_ack(tcp_trace):
    t = tcp_trace
    t.connect()
    t.recv()
    t.send(t.rx(RST | ACK, 0, t.L + 7))
    t.send(t.rx(RST, 0))
    assert t.conn.state == TcpState.SYN_SENT


def test_syn_sent_answers_bad_ack_with_reset(tcp_trace):
    t = tcp_trace
    t.connect()
    t.recv()
    t.send(t.rx(SYN | ACK, t.R, t.L + 100))
    assert t.recv() == [t.tx(RST, t.L + 100, 0, window=0)]
    assert t.conn.state == TcpState.SYN_SENT


def test_simultaneous_open(tcp_trace):
    t = tcp_trace
    t.connect()
    t.recv()
    t.send(t.rx(SYN, t.R, mss=1460))
    assert t.conn.state == TcpState.SYN_RECEIVED
    assert t.recv() == [t.tx(SYN | ACK, t.L, t.R + 1, mss=1460)]
    t.send(t.rx(SYN | ACK, t.R, t.L + 1, mss=1460))
    assert t.conn.state == TcpState.ESTABLISHED
    assert t.events() == EV_ESTABLISHED


def test_retransmitted_syn_gets_the_syn_ack_again(tcp_trace):
    t = tcp_trace
    syn = t.rx(SYN, t.R, mss=1460)
    t.accept(syn)
    syn_ack = t.tx(SYN | ACK, t.L, t.R + 1, mss=1460)
    assert t.recv() == [syn_ack]
    t.send(syn)
    assert t.recv() == [syn_ack]


def test_syn_ack_retransmitted_until_acked(tcp_trace):
    t = tcp_trace
    t.accept(t.rx(SYN, t.R, mss=1460))
    syn_ack = t.tx(SYN | ACK, t.L, t.R + 1, mss=1460)
    assert t.recv() == [syn_ack]
    assert t.wait_for_timer() == 1.0
    assert t.recv() == [syn_ack]
    t.send(t.rx(ACK, t.R + 1, t.L + 1))
    assert t.conn.state == TcpState.ESTABLISHED
    assert t.conn.deadline() is None


def test_syn_received_resets_unacceptable_ack(tcp_trace):
    t = tcp_trace
    t.accept(t.rx(SYN, t.R, mss=1460))
    t.recv()
    t.send(t.rx(ACK, t.R + 1, t.L + 5))
    assert t.recv() == [t.tx(RST, t.L + 5, 0, window=0)]
    assert t.conn.state == TcpState.SYN_RECEIVED
