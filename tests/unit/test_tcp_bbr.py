"""BBR (stack/bbr.py) and the delivery rate samples it lives on
(stack/rate.py): first the estimator on a bare scoreboard, then whole
connections over a simulated path, a bottleneck of fixed rate behind a
fixed propagation delay, with a receiver that acknowledges every segment
(cumulative ACK plus SACK blocks)."""
import heapq
import math

import pytest

from mtcpshim.stack import bbr
from mtcpshim.stack.recovery import Scoreboard
from mtcpshim.stack.tcp import TcpConfig
from mtcpshim.stack.wire.tcp import ACK

MSS = 1460


# ------------------------------------------------------ the rate estimator

def test_a_burst_acknowledged_an_interval_later_samples_bytes_over_that_interval():
    board = Scoreboard()
    board.sent(0, 10 * MSS, 1.0)
    board.acked(10 * MSS, 1.1)
    sample = board.rate.sample(1.1, board.min_rtt)
    assert sample.newly_delivered == sample.delivered == 10 * MSS
    assert sample.rate == pytest.approx(10 * MSS / 0.1)
    assert sample.rtt == pytest.approx(0.1)
    assert not board.rate.pending


def test_after_a_pause_the_interval_starts_at_the_first_new_send():
    """Everything acknowledged, then five segments over 40 ms and their ACK
    at once, 90 ms after the first left: the pause before is no part of
    the sample, and the ACKs coming together do not shrink it."""
    board = Scoreboard()
    board.sent(0, MSS, 1.0)
    board.acked(MSS, 1.1)
    board.rate.sample(1.1, board.min_rtt)
    for k in range(1, 6):
        board.sent(k * MSS, (k + 1) * MSS, 1.1 + k * 0.01)
    board.acked(6 * MSS, 1.2)
    sample = board.rate.sample(1.2, board.min_rtt)
    assert sample.delivered == 5 * MSS
    assert sample.interval == pytest.approx(0.09)
    assert sample.rate == pytest.approx(5 * MSS / 0.09)


def test_sacked_data_counts_as_delivered_and_losses_are_reported():
    board = Scoreboard()
    board.sent(0, 5 * MSS, 1.0)
    board.sack([(2 * MSS, 5 * MSS)], 0, 5 * MSS, 1.1)
    lost, _ = board.detect_loss(1.1, 0.0)
    sample = board.rate.sample(1.1, board.min_rtt)
    assert sample.newly_delivered == 3 * MSS
    assert lost == sample.newly_lost == 2 * MSS


def test_samples_after_the_application_ran_dry_are_app_limited_until_the_flight_is_delivered():
    board = Scoreboard()
    board.sent(0, 2 * MSS, 1.0)
    board.rate.mark_app_limited(2 * MSS)
    board.sent(2 * MSS, 3 * MSS, 1.05)
    board.acked(3 * MSS, 1.1)
    assert board.rate.sample(1.1, board.min_rtt).app_limited
    board.sent(3 * MSS, 4 * MSS, 1.2)
    board.acked(4 * MSS, 1.3)
    assert not board.rate.sample(1.3, board.min_rtt).app_limited


# ------------------------------------------------ connections over a path

class Path:
    """A bottleneck of `rate` bytes/s and a propagation RTT; `drop(index)`
    says whether the index-th data segment sent is lost on the way.  With an
    `ack_period`, ACKs arrive in bursts, only at its multiples (as from a
    receiver or link that aggregates them: GRO, Wi-Fi, a busy peer)."""

    def __init__(self, t, rate, rtt, drop=lambda index: False, ack_period=None):
        self.t, self.rate, self.rtt, self.drop = t, rate, rtt, drop
        self.ack_period = ack_period
        self.events = []           # (time, order, "data" or "ack", what)
        self.order = 0
        self.link_free = 0.0       # when the bottleneck finishes its current frame
        self.sent = 0
        self.received = []         # [start, end) offsets from our ISS + 1, merged

    def _offset(self, seq):
        return (seq - self.t.L - 1) % 2**32

    def _receive(self, start, end):
        ranges = self.received + [[start, end]]
        ranges.sort()
        merged = [ranges[0]]
        for low, high in ranges[1:]:
            if low <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], high)
            else:
                merged.append([low, high])
        self.received = merged

    def _ack(self, newest):
        """The cumulative ACK and up to three SACK blocks, the one holding
        the segment just received first (RFC 2018 section 4)."""
        t = self.t
        cumulative = self.received[0][1] if self.received and self.received[0][0] == 0 else 0
        above = [r for r in self.received if r[0] > cumulative]
        above.sort(key=lambda r: not r[0] <= newest[0] < r[1])
        blocks = tuple(((t.L + 1 + low) % 2**32, (t.L + 1 + high) % 2**32) for low, high in above[:3])
        return t.rx(ACK, t.R + 1, t.L + 1 + cumulative, window=65535, sack_blocks=blocks)

    def _push(self, when, kind, item):
        self.order += 1
        heapq.heappush(self.events, (when, self.order, kind, item))

    def _ack_arrival(self, when):
        if self.ack_period is None:
            return when
        return math.ceil(when / self.ack_period) * self.ack_period

    def _transmit(self):
        t = self.t
        for segment in t.recv():
            if not segment.payload:
                continue
            index, self.sent = self.sent, self.sent + 1
            if self.drop(index):
                continue
            start = self._offset(segment.seq)
            arrival = max(t.now + self.rtt / 2, self.link_free + len(segment.payload) / self.rate)
            self.link_free = arrival
            self._push(arrival, "data", [start, start + len(segment.payload)])

    def run(self, seconds, top_up):
        """Move data for `seconds`, calling top_up() to keep the send queue
        full; returns the bytes acknowledged in that time."""
        t = self.t
        end = t.now + seconds
        acked_before = t.conn.snd_una
        top_up()
        self._transmit()
        while t.now < end:
            deadline = t.conn.deadline()
            if self.events and (deadline is None or self.events[0][0] <= deadline):
                when, _, kind, item = heapq.heappop(self.events)
                t.now = max(t.now, when)
                if kind == "data":
                    self._receive(*item)
                    self._push(self._ack_arrival(when + self.rtt / 2), "ack", self._ack(item))
                else:
                    t.send(item)
            elif deadline is not None:
                t.now = max(t.now, deadline)
                t.conn.on_timer(t.now)
            else:
                break
            top_up()
            self._transmit()
        return (t.conn.snd_una - acked_before) % 2**32


def bulk(t):
    chunk = bytes(64 * 1024)

    def top_up():
        while t.send_buf.space() >= len(chunk):
            t.send_buf.write(chunk)
        t.conn.send_ready(t.now)
    return top_up


def connection(make_tcp_trace, congestion):
    t = make_tcp_trace(config=TcpConfig(timestamps=False, congestion=congestion),
                       buffer_size=1 << 20)
    t.establish(sack_permitted=True)
    return t


RATE = 2_000_000               # bytes/s
RTT = 0.010
BDP = RATE * RTT


def test_bbr_finds_the_bottleneck_and_keeps_about_two_bdp_in_flight(make_tcp_trace):
    t = connection(make_tcp_trace, "bbr")
    path = Path(t, RATE, RTT)
    path.run(1.0, bulk(t))
    model = t.conn.congestion_model
    assert model.mode == bbr.PROBE_BW
    assert model.bandwidth == pytest.approx(RATE, rel=0.1)
    assert model.min_rtt == pytest.approx(RTT, rel=0.2)
    moved = path.run(2.0, bulk(t))
    assert moved >= 0.95 * RATE * 2.0
    assert t.conn.cwnd <= 2 * BDP + 3 * 2 * MSS + 4 * MSS


def test_bbr_drains_the_startup_queue_when_acks_come_in_bursts(make_tcp_trace):
    """The window keeps room for ACK aggregation on top of the BDP, but not
    in DRAIN: without pacing the window is what drains, so with that room
    the flight never fell to one BDP and the connection stayed in DRAIN,
    never probing for bandwidth again."""
    t = connection(make_tcp_trace, "bbr")
    path = Path(t, RATE, RTT, ack_period=RTT / 2)
    path.run(1.0, bulk(t))
    assert t.conn.recovery_counts["bbr_startup_done"] == 1
    assert t.conn.congestion_model.mode == bbr.PROBE_BW
    moved = path.run(2.0, bulk(t))
    assert moved >= 0.95 * RATE * 2.0


def test_the_min_rtt_is_probed_again_after_ten_seconds_counted_from_the_first_sample(make_tcp_trace):
    """On a clock far from zero (the runtime's is monotonic), PROBE_RTT comes
    ten seconds into the connection, not at its first ACK; for 200 ms and a
    round four segments are in flight, then the window comes back."""
    t = make_tcp_trace(config=TcpConfig(timestamps=False, congestion="bbr"), buffer_size=1 << 20)
    t.now = 5000.0
    t.establish(sack_permitted=True)
    path = Path(t, RATE, RTT)
    path.run(9.0, bulk(t))
    assert t.conn.recovery_counts["bbr_probe_rtt"] == 0
    window = t.conn.cwnd
    path.run(1.15, bulk(t))
    assert t.conn.congestion_model.mode == bbr.PROBE_RTT
    assert t.conn.cwnd == 4 * MSS
    path.run(0.5, bulk(t))
    assert t.conn.recovery_counts["bbr_probe_rtt"] == 1
    assert t.conn.congestion_model.mode == bbr.PROBE_BW and t.conn.cwnd >= window - 4 * MSS


@pytest.mark.parametrize("congestion, share", [("bbr", 0.85), ("cubic", 0.5)])
def test_random_loss_costs_bbr_little_and_cubic_half(make_tcp_trace, congestion, share):
    """One segment in twenty lost, as the reliability script's 5% loss:
    BBR keeps the path busy; CUBIC reads each loss as congestion."""
    t = connection(make_tcp_trace, congestion)
    path = Path(t, RATE, RTT, drop=lambda index: index % 20 == 19)
    path.run(1.0, bulk(t))
    moved = path.run(3.0, bulk(t))
    if congestion == "bbr":
        assert moved >= share * RATE * 3.0
    else:
        assert moved < share * RATE * 3.0
