"""Congestion control: NewReno (RFC 5681, 6582), CUBIC (RFC 9438), and BBR
(stack/bbr.py).

A controller decides how the congestion window grows and how far it falls.
The connection keeps `cwnd` and `ssthresh` (bytes) in its own fields, where
the send path reads them without an indirection, and calls the controller:

  on_ack(conn, acked, now)            `acked` new bytes were cumulatively
                                      acknowledged while cwnd limited the
                                      sender and no loss was being repaired:
                                      grow conn.cwnd.
  on_congestion(conn, flight, now)    a loss was detected by fast
                                      retransmit with `flight` bytes
                                      outstanding: set conn.ssthresh.  The
                                      connection then sets cwnd as its
                                      recovery requires.
  on_rto(conn, flight, now)           the first timeout of a series: set
                                      conn.ssthresh; the connection then
                                      starts again from one segment.
  on_undo(conn)                       the last reduction was spurious: the
                                      connection restored cwnd and ssthresh;
                                      restore the controller's own state.
  on_transmit_start(conn, idle, now)  new data goes out with nothing in
                                      flight, `idle` seconds after the last
                                      transmission (Linux CA_EVENT_TX_START);
                                      the connection restarts cwnd itself
                                      if the pause was long (RFC 5681 4.1).

A model-based controller (BBR) sets `owns_window`: the connection then
leaves cwnd alone through recovery and after idle, and calls

  on_delivery(conn, sample, now)      after every ACK that delivered or
                                      lost data, with its delivery rate
                                      sample (stack/rate.py): set conn.cwnd.

Both grow the window the same way below ssthresh (slow start, counting
bytes as Linux does, RFC 3465); they differ in congestion avoidance and in
the reduction.  `create(name)` builds one by its Linux name, which is what
TCP_CONGESTION carries.
"""
from __future__ import annotations


from mtcpshim.stack.bbr import Bbr

# RFC 9438 section 4.1 constants: window in segments, time in seconds.
_CUBIC_C = 0.4
_CUBIC_BETA = 0.7
_CUBIC_ALPHA = 3 * (1 - _CUBIC_BETA) / (1 + _CUBIC_BETA)


def _slow_start(conn, acked: int) -> int:
    """Grow cwnd by the bytes acknowledged, up to ssthresh; return the
    acknowledged bytes left over for congestion avoidance."""
    cwnd = conn.cwnd
    ssthresh = conn.ssthresh
    if cwnd >= ssthresh:
        return acked
    grown = cwnd + acked
    if grown <= ssthresh:
        conn.cwnd = grown
        return 0
    conn.cwnd = ssthresh
    return grown - ssthresh


class NewReno:
    """RFC 5681: one segment per window of acknowledged data in congestion
    avoidance; half the flight on loss.  The fast-recovery part (RFC 6582)
    lives in the connection, which owns retransmission."""

    name = "reno"
    owns_window = False
    __slots__ = ("_acked",)

    def __init__(self):
        self._acked = 0                    # bytes acknowledged toward the next increment

    def on_ack(self, conn, acked: int, now: float) -> None:
        acked = _slow_start(conn, acked)
        if not acked:
            return
        self._acked += acked
        cwnd = conn.cwnd
        if self._acked >= cwnd:
            self._acked -= cwnd
            conn.cwnd = cwnd + conn.send_mss

    def on_congestion(self, conn, flight: int, now: float) -> None:
        conn.ssthresh = max(flight // 2, 2 * conn.send_mss)
        self._acked = 0

    on_rto = on_congestion

    def on_undo(self, conn) -> None:
        pass                               # nothing of its own beyond cwnd

    def on_transmit_start(self, conn, idle: float, now: float) -> None:
        pass                               # no clock of its own


class Cubic:
    """RFC 9438.  After a reduction the window follows the cubic
    W(t) = C (t - K)^3 + W_max, concave up to the window where the loss
    happened, then convex beyond it; never slower than the Reno estimate
    W_est (section 4.3).  Windows here are in segments, as in the RFC."""

    name = "cubic"
    owns_window = False
    __slots__ = ("_w_max", "_k", "_epoch_start", "_w_est", "_cwnd_prior", "_before_reduction")

    def __init__(self):
        self._w_max = 0.0                  # window before the last reduction
        self._k = 0.0                      # seconds from epoch start to reach _w_max
        self._epoch_start = None           # start of the current avoidance epoch
        self._w_est = 0.0                  # Reno-friendly estimate
        self._cwnd_prior = 0.0             # window when ssthresh was last set
        self._before_reduction = None      # (w_max, k, epoch_start, w_est, cwnd_prior) for undo

    def on_ack(self, conn, acked: int, now: float) -> None:
        acked = _slow_start(conn, acked)
        if not acked:
            return
        mss = conn.send_mss
        window = conn.cwnd / mss
        if self._epoch_start is None:
            self._epoch_start = now
            self._w_est = window
            if window < self._w_max:
                self._k = ((self._w_max - window) / _CUBIC_C) ** (1 / 3)
            else:
                self._k = 0.0
                self._w_max = window
        elapsed = now - self._epoch_start
        segments = acked / mss
        alpha = 1.0 if self._w_est >= self._cwnd_prior else _CUBIC_ALPHA
        self._w_est += alpha * segments / window
        cubic = _CUBIC_C * (elapsed - self._k) ** 3 + self._w_max
        if cubic < self._w_est:
            target = self._w_est           # Reno-friendly region
            window = max(window, target)
        else:
            # Aim at where the curve will be one RTT from now (section 4.2),
            # never more than 1.5 times the current window.
            rtt = conn.rtt.srtt or 0.0
            target = _CUBIC_C * (elapsed + rtt - self._k) ** 3 + self._w_max
            if target < window:
                target = window
            elif target > 1.5 * window:
                target = 1.5 * window
            window += (target - window) / window * segments
        grown = int(window * mss)
        if grown > conn.cwnd:
            conn.cwnd = grown

    def on_congestion(self, conn, flight: int, now: float) -> None:
        self._before_reduction = (self._w_max, self._k, self._epoch_start, self._w_est,
                                  self._cwnd_prior)
        mss = conn.send_mss
        window = conn.cwnd / mss
        # Fast convergence (section 4.7): a flow whose window keeps falling
        # releases bandwidth to newcomers by aiming lower.
        if window < self._w_max:
            self._w_max = window * (1 + _CUBIC_BETA) / 2
        else:
            self._w_max = window
        self._cwnd_prior = window
        self._epoch_start = None
        conn.ssthresh = max(int(conn.cwnd * _CUBIC_BETA), 2 * mss)

    def on_rto(self, conn, flight: int, now: float) -> None:
        """RFC 9438 4.8: ssthresh as for a loss; the first avoidance stage
        after slow start then has K = 0 and W_max = the window it starts at."""
        self.on_congestion(conn, flight, now)
        self._w_max = 0.0

    def on_transmit_start(self, conn, idle: float, now: float) -> None:
        """Time the application left the connection idle is not time on
        the curve (RFC 9438 5.8, as Linux's CUBIC): the epoch moves on by
        it, or W(t) would jump by the whole pause at the next ACK."""
        if self._epoch_start is not None:
            self._epoch_start = min(self._epoch_start + idle, now)

    def on_undo(self, conn) -> None:
        """RFC 9438 4.9: a spurious reduction takes back the curve too."""
        if self._before_reduction is not None:
            (self._w_max, self._k, self._epoch_start, self._w_est,
             self._cwnd_prior) = self._before_reduction
            self._before_reduction = None


ALGORITHMS = {NewReno.name: NewReno, Cubic.name: Cubic, Bbr.name: Bbr}


# Linux's build default, for hosts whose default the stack does not offer.
DEFAULT = Cubic.name
_HOST_DEFAULT = "/proc/sys/net/ipv4/tcp_congestion_control"


def host_default(path: str = _HOST_DEFAULT) -> tuple[str, str | None]:
    """The kernel's default in this network namespace, which is what a
    program expects to get, and the name the kernel had when the stack does
    not offer it (then DEFAULT), or None."""
    try:
        with open(path) as sysctl:
            name = sysctl.read().strip()
    except OSError:
        return DEFAULT, None
    if name in ALGORITHMS:
        return name, None
    return DEFAULT, name


def create(name: str):
    """A fresh controller by its Linux name ("reno", "cubic", "bbr"); ValueError
    for others (the runtime answers TCP_CONGESTION with ENOENT, as Linux)."""
    try:
        return ALGORITHMS[name]()
    except KeyError:
        raise ValueError(f"unknown congestion control {name!r}") from None
