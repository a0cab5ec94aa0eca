"""BBR congestion control, version 1 (Cardwell et al., ACM Queue 2016;
draft-cardwell-iccrg-bbr-congestion-control-00), as Linux's tcp_bbr.

Where NewReno and CUBIC read loss as congestion, BBR builds a model of the
path from delivery rate samples (stack/rate.py): the bottleneck bandwidth
as the maximum rate seen over ten round trips, the propagation delay as the
minimum RTT seen over ten seconds.  The window is twice their product, so
a random loss costs a packet-conserving round trip, not half the window.
Linux runs it as the default on many hosts (this machine's kernel does),
and the stack offers it under the same name.

Modes, as Linux:
  STARTUP    the window grows by what each ACK delivers until the
             bandwidth stops growing by 25% for three rounds;
  DRAIN      the queue STARTUP built drains to one BDP in flight;
  PROBE_BW   an eight-phase cycle probes for more bandwidth (gain 1.25),
             drains what the probe queued (0.75), then cruises (1.0);
  PROBE_RTT  when the minimum RTT is ten seconds old, four segments in
             flight for 200 ms and a round, to measure it again.

The connection calls `on_delivery` after each ACK that delivered or lost
something, once loss detection has run; `owns_window` tells it to leave
cwnd to the model through recovery (no PRR, no fall to ssthresh).  What
this version leaves out: pacing (the stack has no pacing timer; the window
alone bounds each flight, so the pacing gains only steer the cycle) and the
long-term bandwidth estimate Linux uses against token-bucket policers.
"""
import collections

_HIGH_GAIN = 2.885                 # 2/ln(2): doubles the sending rate each round
_DRAIN_GAIN = 1 / _HIGH_GAIN
_CWND_GAIN = 2.0
_PACING_GAINS = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
_BW_WINDOW_ROUNDS = 10
_MIN_RTT_WINDOW = 10.0             # seconds
_PROBE_RTT_TIME = 0.2
_MIN_CWND_SEGMENTS = 4
_FULL_BW_GROWTH = 1.25
_FULL_BW_ROUNDS = 3
_INITIAL_WINDOW_SEGMENTS = 10
# ACK aggregation (Linux's extra_acked): the most data acknowledged beyond
# what the bandwidth estimate explains, as a windowed maximum of two halves
# of ten rounds, kept in the window on top of the BDP, at most 100 ms of it.
_AGGREGATION_HALF_ROUNDS = 5
_AGGREGATION_MAX_TIME = 0.1
_AGGREGATION_EPOCH_RESET = 1 << 20

STARTUP, DRAIN, PROBE_BW, PROBE_RTT = "startup", "drain", "probe_bw", "probe_rtt"
# The connection's loss state, as Linux's ca_state (Open and Disorder are one here).
OPEN, RECOVERY, LOSS = 0, 1, 2


class WindowedMax:
    """The maximum of the values seen over the last `window` rounds: a
    deque of (round, value) with values falling from front to back.
    `value` is the front's, kept as an attribute (read on every ACK)."""
    __slots__ = ("_window", "_samples", "value")

    def __init__(self, window: int):
        self._window = window
        self._samples = collections.deque()
        self.value = 0.0

    def update(self, round_count: int, value: float) -> None:
        samples = self._samples
        while samples and samples[-1][1] <= value:
            samples.pop()
        samples.append((round_count, value))
        while samples[0][0] <= round_count - self._window:
            samples.popleft()
        self.value = samples[0][1]


class Bbr:
    name = "bbr"
    owns_window = True
    __slots__ = (
        "mode", "_bw", "_min_rtt", "_min_rtt_at", "_rounds", "_next_round_delivered", "_round_start",
        "_pacing_gain", "_cwnd_gain", "_full_bw", "_full_bw_rounds", "full_bw_reached", "_cycle",
        "_cycle_at", "_prior_cwnd", "_prev_state", "_conservation", "_probe_rtt_done_at",
        "_probe_rtt_round_done", "_idle_restart", "_extra_acked", "_extra_acked_half",
        "_extra_acked_rounds", "_epoch_at", "_epoch_acked",
    )

    def __init__(self):
        self.mode = STARTUP
        self._bw = WindowedMax(_BW_WINDOW_ROUNDS)   # bytes per second
        self._min_rtt = None
        self._min_rtt_at = 0.0
        self._rounds = 0
        self._next_round_delivered = 0
        self._round_start = False
        self._pacing_gain = self._cwnd_gain = _HIGH_GAIN
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        self.full_bw_reached = False
        self._cycle = 0
        self._cycle_at = 0.0
        self._prior_cwnd = 0
        self._prev_state = OPEN
        self._conservation = False
        self._probe_rtt_done_at = None
        self._probe_rtt_round_done = False
        self._idle_restart = False
        self._extra_acked = [0, 0]         # bytes, per half of the window
        self._extra_acked_half = 0
        self._extra_acked_rounds = 0
        self._epoch_at = None              # start of the current aggregation epoch
        self._epoch_acked = 0              # bytes acknowledged since

    @property
    def bandwidth(self) -> float:
        """The bottleneck bandwidth estimate, bytes per second."""
        return self._bw.value

    @property
    def min_rtt(self):
        return self._min_rtt

    # ------------------------------------------- the controller protocol

    def on_ack(self, conn, acked: int, now: float) -> None:
        pass                               # the model, not each ACK, sets the window

    def on_congestion(self, conn, flight: int, now: float) -> None:
        self._save_cwnd(conn)              # to restore once recovery ends

    def on_rto(self, conn, flight: int, now: float) -> None:
        """A timeout: restore the window after it, and count the bandwidth
        growth afresh (Linux bbr_set_state for TCP_CA_Loss)."""
        self._save_cwnd(conn)
        self._prev_state = LOSS
        self._full_bw = 0.0
        self._round_start = True

    def on_undo(self, conn) -> None:
        self._full_bw = 0.0
        self._full_bw_rounds = 0

    def on_transmit_start(self, conn, idle: float, now: float) -> None:
        """Sending again after the application left the connection idle: an
        RTT sample then would be stale, so PROBE_RTT waits (Linux's
        idle_restart), and one that came due during the pause may end."""
        if conn.app_limited:
            self._idle_restart = True
            if self.mode == PROBE_RTT:
                self._check_probe_rtt_done(conn, now)

    def on_delivery(self, conn, sample, now: float) -> None:
        """One ACK's delivery sample: update the model, then the window."""
        in_flight = conn.in_flight
        self._update_bandwidth(sample)
        self._update_ack_aggregation(conn, sample, now)
        self._update_cycle_phase(conn, sample, in_flight, now)
        self._check_full_bandwidth(sample)
        self._check_drain(conn, in_flight, now)
        self._update_min_rtt(conn, sample, in_flight, now)
        self._update_gains()
        self._set_cwnd(conn, sample, in_flight)

    # --------------------------------------------------------- the model

    def _update_bandwidth(self, sample) -> None:
        self._round_start = False
        if sample.rate is None:
            return                         # not a valid observation
        if sample.prior_delivered >= self._next_round_delivered:
            self._next_round_delivered = sample.total_delivered
            self._rounds += 1
            self._round_start = True
            self._conservation = False
        if not sample.app_limited or sample.rate >= self._bw.value:
            self._bw.update(self._rounds, sample.rate)

    def _update_ack_aggregation(self, conn, sample, now: float) -> None:
        """How far ACKs ran ahead of the bandwidth estimate: receivers that
        ACK in bursts (GRO, delayed and compressed ACKs, a busy peer) would
        otherwise leave a window of one BDP idle between bursts."""
        acked = sample.newly_delivered
        if not acked or sample.rate is None:
            return
        if self._round_start:
            self._extra_acked_rounds += 1
            if self._extra_acked_rounds >= _AGGREGATION_HALF_ROUNDS:
                self._extra_acked_rounds = 0
                self._extra_acked_half ^= 1
                self._extra_acked[self._extra_acked_half] = 0
        expected = 0 if self._epoch_at is None else self._bw.value * (now - self._epoch_at)
        if self._epoch_acked <= expected or self._epoch_acked + acked >= _AGGREGATION_EPOCH_RESET:
            self._epoch_acked = 0
            self._epoch_at = now
            expected = 0
        self._epoch_acked += acked
        extra = min(self._epoch_acked - int(expected), conn.cwnd)
        if extra > self._extra_acked[self._extra_acked_half]:
            self._extra_acked[self._extra_acked_half] = extra

    def _aggregation_allowance(self) -> int:
        if not self.full_bw_reached:
            return 0
        return int(min(max(self._extra_acked), self._bw.value * _AGGREGATION_MAX_TIME))

    def _update_cycle_phase(self, conn, sample, in_flight: int, now: float) -> None:
        if self.mode != PROBE_BW:
            return
        full_length = self._min_rtt is not None and now - self._cycle_at > self._min_rtt
        gain = self._pacing_gain
        prior_in_flight = in_flight + sample.newly_delivered
        if gain == 1.0:
            advance = full_length
        elif gain > 1.0:
            # Probing: until a round at the higher rate, and the queue it
            # meant to build is built (or loss says it cannot be).
            advance = full_length and (sample.newly_lost > 0
                                       or prior_in_flight >= self._inflight(conn, gain))
        else:
            # Draining the probe's queue: a round, or sooner once it is gone.
            advance = full_length or prior_in_flight <= self._inflight(conn, 1.0)
        if advance:
            self._cycle = (self._cycle + 1) % len(_PACING_GAINS)
            self._cycle_at = now

    def _check_full_bandwidth(self, sample) -> None:
        if self.full_bw_reached or not self._round_start or sample.app_limited:
            return
        bandwidth = self._bw.value
        if bandwidth >= self._full_bw * _FULL_BW_GROWTH:
            self._full_bw = bandwidth
            self._full_bw_rounds = 0
            return
        self._full_bw_rounds += 1
        self.full_bw_reached = self._full_bw_rounds >= _FULL_BW_ROUNDS

    def _check_drain(self, conn, in_flight: int, now: float) -> None:
        if self.mode == STARTUP and self.full_bw_reached:
            self.mode = DRAIN
            conn.recovery_counts["bbr_startup_done"] += 1
        if self.mode == DRAIN and in_flight <= self._inflight(conn, 1.0):
            self._enter_probe_bw(conn, now)

    def _enter_probe_bw(self, conn, now: float) -> None:
        """Start the cycle at a random phase other than the drain (the ISN
        is random enough, and keeps a connection's run reproducible)."""
        self.mode = PROBE_BW
        self._cycle = (len(_PACING_GAINS) - conn.iss % (len(_PACING_GAINS) - 1)) % len(_PACING_GAINS)
        self._cycle_at = now

    def _update_min_rtt(self, conn, sample, in_flight: int, now: float) -> None:
        expired = self._min_rtt is not None and now - self._min_rtt_at > _MIN_RTT_WINDOW
        rtt = sample.rtt
        if rtt is not None and (self._min_rtt is None or rtt < self._min_rtt or expired):
            self._min_rtt = rtt
            self._min_rtt_at = now
        if expired and not self._idle_restart and self.mode != PROBE_RTT:
            self.mode = PROBE_RTT
            conn.recovery_counts["bbr_probe_rtt"] += 1
            self._save_cwnd(conn)
            self._probe_rtt_done_at = None
        if self.mode == PROBE_RTT:
            conn.mark_app_limited()        # the samples of a deliberately small window
            if self._probe_rtt_done_at is None:
                if in_flight <= _MIN_CWND_SEGMENTS * conn.send_mss:
                    self._probe_rtt_done_at = now + _PROBE_RTT_TIME
                    self._probe_rtt_round_done = False
                    self._next_round_delivered = sample.total_delivered
            else:
                if self._round_start:
                    self._probe_rtt_round_done = True
                if self._probe_rtt_round_done:
                    self._check_probe_rtt_done(conn, now)
        if sample.newly_delivered:
            self._idle_restart = False

    def _check_probe_rtt_done(self, conn, now: float) -> None:
        if self._probe_rtt_done_at is None or now < self._probe_rtt_done_at:
            return
        self._min_rtt_at = now
        conn.cwnd = max(conn.cwnd, self._prior_cwnd)
        if self.full_bw_reached:
            self._enter_probe_bw(conn, now)
        else:
            self.mode = STARTUP

    def _update_gains(self) -> None:
        mode = self.mode
        if mode == STARTUP:
            self._pacing_gain = self._cwnd_gain = _HIGH_GAIN
        elif mode == DRAIN:
            # Linux drains by pacing below the bandwidth with the window at
            # STARTUP's gain; without pacing, the window has to do it.
            self._pacing_gain = _DRAIN_GAIN
            self._cwnd_gain = 1.0
        elif mode == PROBE_BW:
            self._pacing_gain = _PACING_GAINS[self._cycle]
            self._cwnd_gain = _CWND_GAIN
        else:
            self._pacing_gain = self._cwnd_gain = 1.0

    # -------------------------------------------------------- the window

    def _save_cwnd(self, conn) -> None:
        """The window to come back to after recovery or PROBE_RTT."""
        if self._prev_state == OPEN and self.mode != PROBE_RTT:
            self._prior_cwnd = conn.cwnd
        else:
            self._prior_cwnd = max(self._prior_cwnd, conn.cwnd)

    def _bdp(self, conn, gain: float) -> int:
        if self._min_rtt is None:
            return _INITIAL_WINDOW_SEGMENTS * conn.send_mss
        return int(self._bw.value * self._min_rtt * gain) + 1

    def _inflight(self, conn, gain: float, extra: int = 0) -> int:
        """What the model says may be in flight at `gain`, plus `extra`, with
        room for the bursts segmentation offload sends (Linux's quantization
        budget: three bursts of about a millisecond at the pacing rate)."""
        mss = conn.send_mss
        burst = self._bw.value * self._pacing_gain / 1000
        burst = min(max(burst, 2 * mss), max(conn.config.gso_max_size, mss))
        window = self._bdp(conn, gain) + extra + 3 * int(burst)
        segments = -(-window // mss)
        segments += segments & 1           # an even count of segments
        if self.mode == PROBE_BW and self._cycle == 0:
            segments += 2                  # the probe needs room to show more bandwidth
        return segments * mss

    def _set_cwnd(self, conn, sample, in_flight: int) -> None:
        acked = sample.newly_delivered
        mss = conn.send_mss
        cwnd = conn.cwnd
        if acked:
            state = LOSS if conn.in_loss else RECOVERY if conn.in_recovery else OPEN
            if sample.newly_lost:
                cwnd = max(cwnd - sample.newly_lost, mss)
            if state == RECOVERY and self._prev_state != RECOVERY:
                # Packet conservation for the first round of recovery: one
                # out for each delivered.
                self._conservation = True
                self._next_round_delivered = sample.total_delivered
                cwnd = in_flight + acked
            elif self._prev_state != OPEN and state == OPEN:
                cwnd = max(cwnd, self._prior_cwnd)
                self._conservation = False
            self._prev_state = state
            if self._conservation:
                cwnd = max(cwnd, in_flight + acked)
            else:
                # DRAIN drains by the window (see _update_gains), so it gets
                # no room for ACK aggregation: with it the flight never fell
                # to the BDP and the mode never ended.
                extra = 0 if self.mode == DRAIN else self._aggregation_allowance()
                target = self._inflight(conn, self._cwnd_gain, extra)
                if self.full_bw_reached:
                    cwnd = min(cwnd + acked, target)
                elif cwnd < target or sample.total_delivered < _INITIAL_WINDOW_SEGMENTS * mss:
                    cwnd += acked
                cwnd = max(cwnd, _MIN_CWND_SEGMENTS * mss)
        if self.mode == PROBE_RTT:
            cwnd = min(cwnd, _MIN_CWND_SEGMENTS * mss)
        conn.cwnd = cwnd
