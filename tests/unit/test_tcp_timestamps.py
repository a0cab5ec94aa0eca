"""RFC 7323 timestamps: PAWS, the TS.Recent update rule, the 24-day idle
rule, and timestamp values that wrap."""
import pytest

from mtcpshim.stack.tcp import TcpConfig
from mtcpshim.stack.wire.tcp import ACK, PSH, RST, SYN

DAY = 24 * 3600


@pytest.fixture
def ts_trace(make_tcp_trace):
    def make(peer_tsval=1000, **options):
        t = make_tcp_trace(config=TcpConfig(**options))
        t.establish(timestamp=(peer_tsval, 0))
        assert t.conn.ts_enabled
        t.recv()
        return t
    return make


def test_old_timestamp_is_rejected_with_an_ack(ts_trace):
    t = ts_trace()
    t.send(t.rx(ACK | PSH, t.R + 1, t.L + 1, b"new", timestamp=(1010, 100)))
    t.send(t.rx(ACK | PSH, t.R + 4, t.L + 1, b"old", timestamp=(900, 100)))
    (ack,) = t.recv()
    assert ack.ack == t.R + 4 and ack.timestamp[1] == 1010
    assert t.read() == b"new"


def test_paws_does_not_apply_to_reset(ts_trace):
    t = ts_trace()
    t.send(t.rx(RST, t.R + 1, timestamp=(1, 0)))
    assert t.conn.error != 0


def test_ts_recent_is_taken_only_from_segments_at_the_left_edge(ts_trace):
    t = ts_trace()
    # Out of order: its timestamp must not become TS.Recent, or the
    # retransmission that fills the hole (older timestamp) would fail PAWS.
    t.send(t.rx(ACK | PSH, t.R + 101, t.L + 1, b"b" * 100, timestamp=(1050, 0)))
    assert t.conn.ts_recent == 1000
    t.send(t.rx(ACK | PSH, t.R + 1, t.L + 1, b"a" * 100, timestamp=(1020, 0)))
    assert t.conn.ts_recent == 1020
    assert t.read() == b"a" * 100 + b"b" * 100


def test_delayed_ack_echoes_the_earliest_unacknowledged_timestamp(ts_trace):
    t = ts_trace()
    t.send(t.rx(ACK | PSH, t.R + 1, t.L + 1, b"x" * 100, timestamp=(1001, 0)))
    t.send(t.rx(ACK | PSH, t.R + 101, t.L + 1, b"y" * 100, timestamp=(1002, 0)))
    t.wait_for_timer()
    (ack,) = t.recv()
    # RFC 7323 4.3: the echo measures the whole delay, from the first segment.
    assert ack.timestamp[1] == 1001


def test_timestamps_wrap_without_tripping_paws(ts_trace):
    t = ts_trace(peer_tsval=2**32 - 5)
    t.send(t.rx(ACK | PSH, t.R + 1, t.L + 1, b"a", timestamp=(2**32 - 1, 0)))
    t.wait_for_timer()
    assert t.recv()[0].timestamp[1] == 2**32 - 1
    t.send(t.rx(ACK | PSH, t.R + 2, t.L + 1, b"b", timestamp=(3, 0)))   # wrapped: newer
    assert t.read() == b"ab"
    assert t.conn.ts_recent == 3
    t.send(t.rx(ACK | PSH, t.R + 3, t.L + 1, b"c", timestamp=(2**32 - 2, 0)))
    assert t.read() == b""                                   # older across the wrap
    assert t.recv()[0].ack == t.R + 3


def test_ts_recent_expires_after_24_days_idle(ts_trace):
    t = ts_trace(keepalive=False)
    t.now += 25 * DAY
    # Valid by sequence number but "older" than a TS.Recent that is itself
    # too old to compare with (RFC 7323 5.5): accepted.
    t.send(t.rx(ACK | PSH, t.R + 1, t.L + 1, b"late", timestamp=(5, 0)))
    assert t.read() == b"late"
    assert t.conn.ts_recent == 5


def test_our_rtt_comes_from_the_echoed_timestamp(make_tcp_trace):
    t = make_tcp_trace(config=TcpConfig())
    t.establish(timestamp=(1, 0))
    t.write(b"q")
    (segment,) = t.recv()
    t.now += 0.25
    t.send(t.rx(ACK, t.R + 1, t.L + 2, timestamp=(2, segment.timestamp[0])))
    assert t.conn.rtt.srtt == pytest.approx(0.1 * 7 / 8 + 0.25 / 8, abs=0.002)


def test_syn_with_old_timestamp_still_gets_a_challenge_ack(ts_trace):
    t = ts_trace()
    t.send(t.rx(SYN, t.R + 50, timestamp=(10, 0)))
    (ack,) = t.recv()
    assert ack.flags == ACK and ack.ack == t.R + 1
