"""RFC 5961, blind in-window attacks: RST and SYN answered with challenge
ACKs, the ACK field checked against what was sent and MAX.SND.WND, and the
rate limits of section 7 (per connection and per host).  Each rule also
runs with sequence numbers that wrap during the trace."""
import errno
import random

import pytest

from mtcpshim.stack.tcp import ChallengeAckLimiter, TcpConfig, TcpState
from mtcpshim.stack.wire.tcp import ACK, FIN, PSH, RST, SYN

WRAPS = pytest.mark.parametrize("local_iss, remote_iss",
                                [(1000, 5000), (2**32 - 1, 2**32 - 1)],
                                ids=["plain", "wrapping"])


@pytest.fixture
def established(make_tcp_trace, local_iss, remote_iss):
    t = make_tcp_trace(local_iss=local_iss, remote_iss=remote_iss)
    t.establish()
    return t


# The states a peer's RST can meet, each reached by its own short trace.
# Returns the peer's next sequence number (RCV.NXT) in that state.

def to_established(t):
    return t.R + 1


def to_fin_wait_1(t):
    t.conn.close(t.now)
    return t.R + 1


def to_fin_wait_2(t):
    t.conn.close(t.now)
    t.send(t.rx(ACK, t.R + 1, t.L + 2))
    return t.R + 1


def to_close_wait(t):
    t.send(t.rx(ACK | FIN, t.R + 1, t.L + 1))
    return t.R + 2


def to_closing(t):
    t.conn.close(t.now)
    t.send(t.rx(ACK | FIN, t.R + 1, t.L + 1))
    return t.R + 2


def to_last_ack(t):
    t.send(t.rx(ACK | FIN, t.R + 1, t.L + 1))
    t.conn.close(t.now)
    return t.R + 2


def to_time_wait(t):
    t.conn.close(t.now)
    t.send(t.rx(ACK | FIN, t.R + 1, t.L + 2))
    return t.R + 2


RESET_OUTCOMES = [
    (to_established, TcpState.ESTABLISHED, errno.ECONNRESET),
    (to_fin_wait_1, TcpState.FIN_WAIT_1, errno.ECONNRESET),
    (to_fin_wait_2, TcpState.FIN_WAIT_2, errno.ECONNRESET),
    (to_close_wait, TcpState.CLOSE_WAIT, errno.EPIPE),        # as Linux
    (to_closing, TcpState.CLOSING, errno.ECONNRESET),
    (to_last_ack, TcpState.LAST_ACK, errno.ECONNRESET),
    (to_time_wait, TcpState.TIME_WAIT, None),                 # RFC 1337: ignored
]


@WRAPS
@pytest.mark.parametrize("reach, state, error", RESET_OUTCOMES,
                         ids=[state.name for _, state, _ in RESET_OUTCOMES])
def test_exact_reset_closes_every_synchronized_state(established, reach, state, error):
    t = established
    rcv_nxt = reach(t)
    assert t.conn.state == state
    t.recv()
    t.send(t.rx(RST, rcv_nxt))
    if error is None:
        assert t.conn.state == state
    else:
        assert t.conn.state == TcpState.CLOSED
        assert t.conn.error == error
    assert t.recv() == []


def assert_challenged(t, segment, rcv_nxt) -> None:
    """`segment` from the peer leaves the state as it was and draws one ACK
    of rcv_nxt: a challenge ACK."""
    state = t.conn.state
    t.recv()
    t.send(segment)
    assert t.conn.state == state
    (challenge,) = t.recv()
    assert challenge.flags == ACK and challenge.ack == rcv_nxt % 2**32


@WRAPS
@pytest.mark.parametrize("reach, state, error", RESET_OUTCOMES,
                         ids=[state.name for _, state, _ in RESET_OUTCOMES])
def test_inexact_reset_gets_a_challenge_ack_in_every_synchronized_state(
        established, reach, state, error):
    t = established
    rcv_nxt = reach(t)
    assert t.conn.state == state
    assert_challenged(t, t.rx(RST | ACK, rcv_nxt + 1000, t.L + 1), rcv_nxt)


@WRAPS
def test_reset_outside_the_window_is_silently_dropped(established):
    t = established
    t.send(t.rx(RST, t.R + 1 + 70000), t.rx(RST, t.R))
    assert t.conn.state == TcpState.ESTABLISHED
    assert t.recv() == []


def test_reset_in_syn_received_aborts_the_embryonic_connection(tcp_trace):
    t = tcp_trace
    t.accept(t.rx(SYN, t.R, mss=1460))
    t.recv()
    t.send(t.rx(RST, t.R + 50))                           # not exact: challenged
    assert t.conn.state == TcpState.SYN_RECEIVED
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1)]
    t.send(t.rx(RST, t.R + 1))
    assert t.conn.state == TcpState.CLOSED
    assert t.conn.error == errno.ECONNREFUSED


@WRAPS
@pytest.mark.parametrize("reach", [to_established, to_fin_wait_2, to_close_wait])
@pytest.mark.parametrize("distance", [0, 100, 70000, -70000],
                         ids=["at-rcv-nxt", "in-window", "beyond", "behind"])
def test_any_syn_in_a_synchronized_state_gets_a_challenge_ack(established, reach, distance):
    t = established
    rcv_nxt = reach(t)
    assert_challenged(t, t.rx(SYN, rcv_nxt + distance, mss=1460), rcv_nxt)


@WRAPS
def test_ack_for_data_never_sent_is_challenged_and_the_segment_dropped(established):
    t = established
    t.write(b"abc")
    t.recv()
    t.send(t.rx(ACK | PSH, t.R + 1, t.L + 5, b"forged"))   # snd_max is L + 4
    assert t.recv() == [t.tx(ACK, t.L + 4, t.R + 1)]
    assert t.read() == b""
    assert t.conn.snd_una == (t.L + 1) % 2**32


@WRAPS
def test_ack_older_than_max_snd_wnd_is_challenged_and_dropped(established):
    t = established
    # Move snd_una 100000 bytes on, past anything the 65535 window allows.
    for _ in range(4):
        for _ in range(10):
            t.write(bytes(2500))
            t.recv()
            t.send(t.rx(ACK, t.R + 1, t.conn.snd_nxt))
    sent = t.conn.snd_una
    assert (sent - t.L - 1) % 2**32 == 100000
    t.now += 1.0
    t.send(t.rx(ACK | PSH, t.R + 1, sent - 70000, b"stale"))
    assert t.recv() == [t.tx(ACK, sent, t.R + 1)]
    assert t.read() == b""
    # Old, but within MAX.SND.WND: acceptable (a delayed duplicate ACK).
    t.send(t.rx(ACK | PSH, t.R + 1, sent - 60000, b"fine"))
    assert t.read() == b"fine"


def test_challenge_acks_are_limited_per_connection(tcp_established):
    t = tcp_established
    t.send(t.rx(RST, t.R + 100), t.rx(RST, t.R + 200), t.rx(SYN, t.R + 300))
    assert len(t.recv()) == 1
    t.now += 0.4
    t.send(t.rx(RST, t.R + 100))
    assert t.recv() == []
    t.now += 0.2                                          # invalid_ack_interval passed
    t.send(t.rx(RST, t.R + 100))
    assert len(t.recv()) == 1


def test_challenge_acks_are_limited_per_host(make_tcp_trace):
    limiter = ChallengeAckLimiter(limit=1)                # exactly one per second
    traces = [make_tcp_trace() for _ in range(3)]
    for t in traces:
        t.establish()
        t.conn.challenge_acks = limiter
    for t in traces:
        t.send(t.rx(RST, t.R + 100))
    assert [len(t.recv()) for t in traces] == [1, 0, 0]
    for t in traces[1:]:
        t.now = 1.1                                       # the next second: a new budget
        t.send(t.rx(RST, t.R + 100))
    assert [len(t.recv()) for t in traces[1:]] == [1, 0]


def test_host_budget_is_randomised_around_the_limit():
    limiter = ChallengeAckLimiter(limit=100, rng=random.Random(7))
    budgets = set()
    for second in range(20):
        allowed = sum(limiter.allow(second + 0.5) for _ in range(300))
        assert 50 <= allowed < 150
        budgets.add(allowed)
    assert len(budgets) > 5                               # not a constant to count against


def test_out_of_window_pure_acks_are_answered_at_most_twice_a_second(tcp_established):
    t = tcp_established
    stale = t.rx(ACK, t.R + 1 + 70000, t.L + 1)
    t.send(stale, stale)
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1)]
    t.send(stale)
    assert t.recv() == []
    # Data is no ACK loop: every such segment is answered.
    far = t.rx(ACK, t.R + 1 + 70000, t.L + 1, b"far")
    t.send(far)
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1)]
    t.send(far)
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1)]


def test_limit_comes_from_the_config():
    assert TcpConfig().challenge_ack_limit == 1000
    assert TcpConfig(invalid_ack_interval=0.0).invalid_ack_interval == 0.0
