"""Sans-IO TCP (RFC 9293): segments in, segments and events out, time passed in.

A `TcpConnection` owns one connection's state machine.  The runtime feeds it
parsed segments (`on_segment`), the passage of time (`on_timer` once `now`
reaches `deadline()`) and application actions (`send_ready`,
`recv_consumed`, `close`, `shutdown_write`, `abort`); after each batch it
collects segments with `take_output()` and readiness from `events`.

Implemented: handshakes both ways with MSS, window scale (RFC 7323),
SACK-permitted (RFC 2018) and timestamps negotiated; PAWS; sliding windows
that never shrink the right edge; out-of-order reassembly with SACK blocks
sent back; RFC 6298 retransmission timer with Karn's rule or timestamp RTT
samples; congestion control from `mtcpshim.stack.cc` (CUBIC or NewReno, per
connection) from a 10-segment initial window (RFC 6928); with SACK, loss
detection by RACK-TLP (RFC 8985) over a scoreboard of what is in flight
(`mtcpshim.stack.recovery`), adapting its reordering window to D-SACKs (RFC 2883),
retransmission within Proportional Rate Reduction (RFC 6937), and undo of
spurious recoveries and timeouts (D-SACK, timestamps as Eifel, RFC 3522);
without SACK, NewReno (RFC 6582); limited transmit (RFC 3042); delayed ACKs; Nagle
with Minshall's refinement (as Linux) or TCP_NODELAY; sender and receiver
silly-window avoidance (RFC 9293 3.8.6.2); zero-window probing; keepalive;
TCP_USER_TIMEOUT; half-close, simultaneous open and close, TIME_WAIT;
RFC 5961 (challenge ACKs for RST and SYN, ACK range checks, rate limits);
path MTU discovery from ICMP "fragmentation needed" (RFC 1191, through
`on_path_mtu`); with `TcpConfig.gso_max_size`, segments of many MSS for the
device to cut (TSO), which congestion control, SACK and RACK see in bytes.

Buffers are the runtime's (shared-memory rings there, `RingBuffer` in
tests).  Send buffer: `len(buf)` bytes queued and not yet acknowledged,
`peek(offset, n)` counted from the oldest unacknowledged byte, `consume(n)`.
Receive buffer: `space()`, `write(data) -> int`, and `len(buf)` (unread
bytes: close() resets the connection when some remain, as Linux).  Both may
change between calls as the application writes and reads.

Not implemented: urgent data (URG is ignored), ECN, packetization-layer
path MTU discovery (RFC 4821).

Pure ACKs are mostly not sent from inside `on_segment`: the connection notes
that one is owed, and `take_output()` builds at most one, carrying the latest
state.  TcpHost collects output after every segment, so a run of full-sized
segments is ACKed every second one (RFC 5681 4.2) and a GRO-merged segment
once.  The exception is out-of-order data, which gets one duplicate ACK per
segment.
"""
from __future__ import annotations

import collections
import enum
import errno
import random

from mtcpshim.stack import cc, native
from mtcpshim.stack.recovery import Scoreboard
from mtcpshim.stack.rtt import RttEstimator
from mtcpshim.stack.seq import seq_add, seq_diff, seq_ge, seq_gt, seq_le, seq_lt
from mtcpshim.stack.storage import Assembler
from mtcpshim.stack.timers import Timer, Timers
from mtcpshim.stack.wire.tcp import ACK, FIN, PSH, RST, SYN, MAX_WSCALE, TcpSegment

_MASK = 0xFFFFFFFF
_HALF = 0x80000000
_TIMESTAMP_OPTION_LEN = 12       # NOP, NOP, kind 8 length 10
_SACK_OPTION_HEAD = 4            # NOP, NOP, kind 5, length
_SACK_BLOCK_LEN = 8
_IPV4_TCP_HEADERS_LEN = 40       # IPv4 and TCP headers without options
_DEFAULT_PEER_MSS = 536          # RFC 9293 3.7.1: no MSS option received
_MAX_WINDOW = 0xFFFF
# TCP_INFO (linux/tcp.h): the option bits, and the slow-start threshold
# that means none yet (TCP_INFINITE_SSTHRESH).
_TCPI_OPT_TIMESTAMPS, _TCPI_OPT_SACK, _TCPI_OPT_WSCALE = 1, 2, 4
_INFINITE_SSTHRESH = 0x7FFFFFFF
_NO_SSTHRESH = 1 << 30           # bytes: slow start runs until the first loss
_PAWS_IDLE = 24 * 24 * 3600      # RFC 7323 5.5: TS.Recent is invalid after 24 days idle
_DUPTHRESH = 3                   # RFC 5681 / 6675 DupThresh
# Tail loss probe (RFC 8985 section 7): wait 2*SRTT, at least this long, and
# a peer's delayed ACK more when a single segment is out.
_TLP_MIN = 0.010
_TLP_DELAYED_ACK = 0.200


class TcpConfig:
    """Tunables, with Linux-like defaults.  Override by keyword:
    `TcpConfig(nodelay=True, time_wait=0.5)`."""

    mss = 1460                   # MSS we announce; caps the MSS we send with
    window_scaling = True        # offer/accept RFC 7323 window scaling
    recv_wscale = None           # None: smallest shift that covers the receive buffer
    timestamps = True
    sack = True
    time_wait = 60.0             # seconds in TIME_WAIT (2 MSL, as Linux)
    max_time_wait = 131072       # TIME_WAIT records a host keeps; past it a connection
                                 # closes at once (Linux tcp_max_tw_buckets)
    fin_wait2_timeout = 60.0     # FIN_WAIT_2 after close() (Linux tcp_fin_timeout)
    delayed_ack = 0.040
    initial_rto = 1.0
    min_rto = 0.2
    max_rto = 120.0
    syn_retries = 6
    retries = 15                 # data retransmissions before ETIMEDOUT
    initial_window_segments = 10
    slow_start_after_idle = True  # Linux tcp_slow_start_after_idle: cwnd restarts after an idle RTO
    nodelay = False
    keepalive = False
    keepidle = 7200.0
    keepintvl = 75.0
    keepcnt = 9
    user_timeout = 0.0           # TCP_USER_TIMEOUT in seconds; 0: off
    congestion = "cubic"         # a name from stack/cc.py; the stack takes the kernel's (cc.host_default)
    invalid_ack_interval = 0.5   # Linux tcp_invalid_ratelimit: per-connection
                                 # limit on ACKs answering invalid segments
    challenge_ack_limit = 1000   # per second and host (Linux tcp_challenge_ack_limit)
    syn_cookies = True           # answer SYNs with cookies when the backlog is full
    max_ooo_ranges = 32          # out-of-order ranges held for reassembly
    gso_max_size = 0             # payload bytes one segment may carry for the device
                                 # to cut into send_mss pieces (TSO/GSO); 0: one MSS

    def __init__(self, **overrides):
        for name, value in overrides.items():
            if not hasattr(TcpConfig, name) or name.startswith("_"):
                raise TypeError(f"unknown TcpConfig option {name!r}")
            setattr(self, name, value)


class TcpState(enum.IntEnum):
    CLOSED = 0
    LISTEN = 1
    SYN_SENT = 2
    SYN_RECEIVED = 3
    ESTABLISHED = 4
    FIN_WAIT_1 = 5
    FIN_WAIT_2 = 6
    CLOSE_WAIT = 7
    CLOSING = 8
    LAST_ACK = 9
    TIME_WAIT = 10


CLOSED = TcpState.CLOSED
LISTEN = TcpState.LISTEN
SYN_SENT = TcpState.SYN_SENT
SYN_RECEIVED = TcpState.SYN_RECEIVED
ESTABLISHED = TcpState.ESTABLISHED
FIN_WAIT_1 = TcpState.FIN_WAIT_1
FIN_WAIT_2 = TcpState.FIN_WAIT_2
CLOSE_WAIT = TcpState.CLOSE_WAIT
CLOSING = TcpState.CLOSING
LAST_ACK = TcpState.LAST_ACK
TIME_WAIT = TcpState.TIME_WAIT

# State sets as bit masks: `(1 << state) & MASK` costs less than hashing an enum.
_SENDING = ((1 << ESTABLISHED) | (1 << CLOSE_WAIT) | (1 << FIN_WAIT_1)
            | (1 << CLOSING) | (1 << LAST_ACK))
_RECEIVING = (1 << SYN_RECEIVED) | (1 << ESTABLISHED) | (1 << FIN_WAIT_1) | (1 << FIN_WAIT_2)
_SYNCHRONIZED = _SENDING | (1 << SYN_RECEIVED) | (1 << FIN_WAIT_2) | (1 << TIME_WAIT)
# Linux tcp_need_reset(): states in which an abort tells the peer with a RST.
_RESET_ON_ABORT = ((1 << SYN_RECEIVED) | (1 << ESTABLISHED) | (1 << CLOSE_WAIT)
                   | (1 << FIN_WAIT_1) | (1 << FIN_WAIT_2))
_KEEPALIVE_STATES = (1 << ESTABLISHED) | (1 << CLOSE_WAIT) | (1 << FIN_WAIT_2)

EV_ESTABLISHED = 0x01   # handshake completed
EV_READABLE = 0x02      # new in-order data was written to the receive buffer
EV_WRITABLE = 0x04      # an ACK freed send-buffer space
EV_PEER_FIN = 0x08      # the peer closed its side: EOF after the buffered data
EV_RESET = 0x10         # reset, refused or timed out; `error` holds the errno
EV_CLOSED = 0x20        # finished: the runtime can forget the connection
EV_FIN_ACKED = 0x40     # our FIN was acknowledged: nothing of ours is left to send


class ChallengeAckLimiter:
    """RFC 5961 section 7: the host-wide budget of challenge ACKs.  Each
    second's budget is drawn from [limit/2, 3*limit/2), as Linux does since
    CVE-2016-5696: with a fixed budget an off-path attacker could count the
    challenge ACKs a victim connection spent and so find its sequence
    numbers."""

    __slots__ = ("limit", "_rng", "_second", "_left")

    def __init__(self, limit: int, rng: random.Random | None = None):
        self.limit = limit
        self._rng = rng or random.SystemRandom()
        self._second = None
        self._left = 0

    def allow(self, now: float) -> bool:
        second = int(now)
        if second != self._second:
            self._second = second
            half = (self.limit + 1) // 2
            self._left = half + self._rng.randrange(max(self.limit, 1))
        if self._left <= 0:
            return False
        self._left -= 1
        return True


def reset_for(seg: TcpSegment):
    """RFC 9293 3.10.7.1: the reply to `seg` when no connection owns it."""
    if seg.flags & RST:
        return None
    if seg.flags & ACK:
        return TcpSegment(seg.dst_port, seg.src_port, seg.ack, 0, RST, 0)
    return TcpSegment(seg.dst_port, seg.src_port, 0, seq_add(seg.seq, seg.seg_len),
                      RST | ACK, 0)


class TcpConnection:
    __slots__ = (
        "config", "local_ip", "local_port", "remote_ip", "remote_port",
        "tcb",                             # the numbers the fast path shares (native.TCB_NUMBERS)
        "send_buf", "_recv_buf", "state", "error", "events", "outbox",
        "nodelay", "keepalive", "keepidle", "keepintvl", "keepcnt", "user_timeout",
        "challenge_acks", "recovery_counts",
        # send sequence space
        "iss", "snd_nxt", "snd_wnd", "snd_wl1", "snd_wl2",
        "snd_wscale", "_max_snd_wnd", "_send_base", "_fin_seq", "send_mss", "_snd_sml",
        # congestion control and loss recovery
        "cwnd", "ssthresh", "_cc", "_dupacks", "_in_recovery", "_in_loss", "_recover",
        "_board", "_prr_delivered", "_prr_out", "_recover_fs",
        "_undo_marker", "_undo_retrans", "_undo_cwnd", "_undo_ssthresh", "_retrans_stamp",
        "rtt", "_rtt_seq", "_rtt_time", "_retries", "_stall_start", "_last_tx", "retransmitted_segments",
        # receive sequence space
        "irs", "rcv_wscale", "_rcv_mss", "_rcv_buf_size", "_sws_threshold",
        "_rcv_unacked", "_assembler", "_rcv_fin_seq", "_dsack",
        # negotiated options
        "_ts_offset", "sack_enabled",
        "_wscale_ok",
        # timers and bookkeeping
        "timers", "_now", "_ack_now", "_invalid_ack_at",
        "_persist_backoff", "_probes_unanswered", "_last_rx",
        "_keepalive_probes", "_orphaned",
        # the host's and the runtime's own per-connection fields, never touched here
        "owner", "listener", "timer_at", "reuse_address",
    )

    def __init__(self, config: TcpConfig, local_ip: int, local_port: int,
                 remote_ip: int, remote_port: int, send_buf, recv_buf, iss: int,
                 now: float, ts_offset: int = 0):
        self.config = config
        self.local_ip = local_ip
        self.local_port = local_port
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        self.tcb = native.new_tcb()
        self.send_buf = send_buf
        self.recv_buf = recv_buf
        self.state = CLOSED
        self.error = 0
        self.events = 0
        self.outbox = []
        self.nodelay = config.nodelay
        self.keepalive = config.keepalive
        self.keepidle = config.keepidle
        self.keepintvl = config.keepintvl
        self.keepcnt = config.keepcnt
        self.user_timeout = config.user_timeout
        self.challenge_acks = None         # a host-wide ChallengeAckLimiter, if any
        self.recovery_counts = collections.Counter()  # loss recovery events; the host's, once adopted

        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = seq_add(iss, 1)
        self.snd_max = self.snd_nxt
        self.snd_wnd = 0
        self.snd_wl1 = 0
        self.snd_wl2 = iss
        self.snd_wscale = 0
        self._max_snd_wnd = 0
        self._send_base = self.snd_nxt     # sequence number of send_buf's first byte
        self._fin_seq = None               # sequence number of our FIN once queued
        self.send_mss = _DEFAULT_PEER_MSS
        self._snd_sml = iss                # end of the last small segment (Minshall)

        self.cwnd = 0
        self.ssthresh = _NO_SSTHRESH
        self._cc = cc.create(config.congestion)
        self._dupacks = 0
        self._in_recovery = False          # fast recovery (PRR with SACK, else NewReno)
        self._in_loss = False              # after a timeout, until snd_una passes _recover
        self._recover = iss
        self._board = Scoreboard(ts_offset)
        self._prr_delivered = 0            # RFC 6937, bytes
        self._prr_out = 0
        self._recover_fs = 1
        self._undo_marker = None           # snd_una when the episode began; None: nothing to undo
        self._undo_retrans = 0             # retransmissions of the episode not yet D-SACKed
        self._undo_cwnd = 0
        self._undo_ssthresh = 0
        self._retrans_stamp = None         # our timestamp on the episode's first retransmission
        self.rtt = RttEstimator(config.initial_rto, config.min_rto, config.max_rto)
        self._rtt_seq = None               # Karn: sequence number being timed
        self._rtt_time = 0.0
        self._retries = 0
        self.retransmitted_segments = 0    # since the connection began (TCP_INFO's total_retrans)
        self._stall_start = None           # since when data or probes go unanswered
        self._last_tx = now                # when data last went out (Linux lsndtime)

        space = recv_buf.space()
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_adv = 0                   # right edge of the window we advertised
        if config.recv_wscale is not None:
            self.rcv_wscale = config.recv_wscale
        else:
            shift = 0
            while shift < MAX_WSCALE and (_MAX_WINDOW << shift) < space:
                shift += 1
            self.rcv_wscale = shift
        self._rcv_buf_size = space
        self._set_rcv_mss(_DEFAULT_PEER_MSS)
        self._rcv_unacked = 0              # in-order bytes received since our last ACK
        self.last_ack_sent = 0
        self._assembler = Assembler(config.max_ooo_ranges)
        self._rcv_fin_seq = None           # peer's FIN, seen before the data ahead of it
        self._dsack = None                 # (start, end) of data received twice, to report

        self.ts_enabled = False
        self.ts_recent = 0
        self.ts_recent_at = now
        self._ts_offset = ts_offset
        self.sack_enabled = False
        self._wscale_ok = False

        self._now = now
        self._ack_now = False
        self._invalid_ack_at = None
        self.timers = Timers()
        self._persist_backoff = 0
        self._probes_unanswered = 0
        self._last_rx = now
        self._keepalive_probes = 0
        self._orphaned = False             # the application closed the socket
        self.owner = None
        self.listener = None
        self.timer_at = None
        self.reuse_address = False  # SO_REUSEADDR of its socket (TcpHost.bind)

    # ----------------------------------------------------------- opening

    @classmethod
    def connect(cls, config, local_ip, local_port, remote_ip, remote_port,
                send_buf, recv_buf, iss, now, ts_offset=0) -> "TcpConnection":
        """Active open: the SYN is in the outbox."""
        conn = cls(config, local_ip, local_port, remote_ip, remote_port,
                   send_buf, recv_buf, iss, now, ts_offset)
        if not config.window_scaling:
            conn.rcv_wscale = 0
        conn.state = SYN_SENT
        conn._stall_start = now
        conn._send_syn()
        return conn

    @classmethod
    def accept(cls, config, local_ip, local_port, remote_ip, remote_port, syn,
               send_buf, recv_buf, iss, now, ts_offset=0) -> "TcpConnection":
        """Passive open from a received SYN: the SYN-ACK is in the outbox and
        carries only the options the SYN offered (plus our MSS, as Linux)."""
        conn = cls._from_syn(config, local_ip, local_port, remote_ip, remote_port, syn,
                             send_buf, recv_buf, iss, now, ts_offset)
        conn._send_syn()
        return conn

    @classmethod
    def accept_cookie(cls, config, local_ip, local_port, remote_ip, remote_port, syn,
                      rcv_wscale, syn_ack_window, send_buf, recv_buf, iss, now,
                      ts_offset=0) -> "TcpConnection":
        """Passive open whose SYN-ACK was a SYN cookie sent without state.
        `syn` is the SYN as the cookie recorded it (sequence number and the
        options it carried); `rcv_wscale` and `syn_ack_window` are what that
        SYN-ACK announced.  The connection is in SYN_RECEIVED with nothing
        to send: feed it the ACK that carried the cookie."""
        conn = cls._from_syn(config, local_ip, local_port, remote_ip, remote_port, syn,
                             send_buf, recv_buf, iss, now, ts_offset)
        if conn._wscale_ok:
            conn.rcv_wscale = rcv_wscale
        conn.rcv_adv = seq_add(conn.rcv_nxt, syn_ack_window)
        conn.last_ack_sent = conn.rcv_nxt
        conn.timers.arm_retransmit(now + conn.rtt.rto)
        return conn

    @classmethod
    def _from_syn(cls, config, local_ip, local_port, remote_ip, remote_port, syn,
                  send_buf, recv_buf, iss, now, ts_offset) -> "TcpConnection":
        conn = cls(config, local_ip, local_port, remote_ip, remote_port,
                   send_buf, recv_buf, iss, now, ts_offset)
        conn._learn_peer_syn(syn)
        conn.snd_wnd = syn.window          # never scaled in a SYN
        conn._max_snd_wnd = syn.window
        conn.snd_wl1 = syn.seq
        conn.state = SYN_RECEIVED
        conn._stall_start = now
        return conn

    @property
    def congestion(self) -> str:
        """The congestion control algorithm's name (TCP_CONGESTION).
        Assigning another name switches algorithm from the current window
        on; ValueError for unknown names."""
        return self._cc.name

    @congestion.setter
    def congestion(self, name: str) -> None:
        if name != self._cc.name:
            self._cc = cc.create(name)

    @property
    def congestion_model(self):
        """The controller itself, for statistics (BBR's bandwidth, min RTT, mode)."""
        return self._cc

    def info(self) -> dict[str, int]:
        """The figures Linux's TCP_INFO reports of a connection (tcp_get_info):
        times in microseconds, windows in segments."""
        mss = self.send_mss
        srtt = self.rtt.srtt
        wscales = _TCPI_OPT_WSCALE | self.snd_wscale << 8 | self.rcv_wscale << 12 if self._wscale_ok else 0
        return {
            "rto_us": int(self.rtt.rto * 1e6),
            "rtt_us": int(srtt * 1e6) if srtt is not None else 0,
            "rttvar_us": int(self.rtt.rttvar * 1e6),
            "snd_mss": mss,
            "rcv_mss": self._rcv_mss,
            "advmss": self.config.mss - (_TIMESTAMP_OPTION_LEN if self.ts_enabled else 0),
            "snd_cwnd": self.cwnd // mss,
            "snd_ssthresh": _INFINITE_SSTHRESH if self.ssthresh >= _NO_SSTHRESH else self.ssthresh // mss,
            "unacked": -(-seq_diff(self.snd_nxt, self.snd_una) // mss),
            "total_retrans": self.retransmitted_segments,
            "retransmits": self._retries,
            "options": ((_TCPI_OPT_TIMESTAMPS if self.ts_enabled else 0)
                        | (_TCPI_OPT_SACK if self.sack_enabled else 0) | wscales),
        }

    # What a congestion controller reads of the connection (stack/cc.py).
    @property
    def in_flight(self) -> int:
        """Bytes in the network by the scoreboard's count (RFC 6675 pipe)."""
        return self._board.pipe(seq_diff(self.snd_nxt, self.snd_una))

    @property
    def in_recovery(self) -> bool:
        return self._in_recovery

    @property
    def in_loss(self) -> bool:
        return self._in_loss

    @property
    def app_limited(self) -> bool:
        return self._board.rate.app_limited_until != 0

    def mark_app_limited(self) -> None:
        self._board.rate.mark_app_limited(self.in_flight)

    def _learn_peer_syn(self, syn: TcpSegment) -> None:
        """Sequence numbers and options from the peer's SYN or SYN-ACK."""
        config = self.config
        self.irs = syn.seq
        self.rcv_nxt = seq_add(syn.seq, 1)
        self._wscale_ok = config.window_scaling and syn.wscale is not None
        if self._wscale_ok:
            self.snd_wscale = syn.wscale
        else:
            self.snd_wscale = 0
            self.rcv_wscale = 0
        self.sack_enabled = config.sack and syn.sack_permitted
        self.ts_enabled = config.timestamps and syn.timestamp is not None
        if self.ts_enabled:
            self.ts_recent = syn.timestamp[0]
        option_bytes = _TIMESTAMP_OPTION_LEN if self.ts_enabled else 0
        peer_mss = syn.mss if syn.mss else _DEFAULT_PEER_MSS
        self.send_mss = max(min(peer_mss, config.mss) - option_bytes, 1)
        self._set_rcv_mss(self.send_mss)
        self.cwnd = config.initial_window_segments * self.send_mss

    def _send_syn(self) -> None:
        """(Re)transmit our SYN, or SYN-ACK in SYN_RECEIVED."""
        config = self.config
        window = min(self.recv_buf.space(), _MAX_WINDOW)
        if self.state == SYN_SENT:
            segment = TcpSegment(self.local_port, self.remote_port, self.iss, 0, SYN,
                                 window, mss=config.mss,
                                 sack_permitted=config.sack)
            if config.window_scaling:
                segment.wscale = self.rcv_wscale
            if config.timestamps:
                segment.timestamp = (self._ts_now(), 0)
        else:
            segment = TcpSegment(self.local_port, self.remote_port, self.iss, self.rcv_nxt,
                                 SYN | ACK, window, mss=config.mss,
                                 sack_permitted=self.sack_enabled)
            if self._wscale_ok:
                segment.wscale = self.rcv_wscale
            if self.ts_enabled:
                segment.timestamp = (self._ts_now(), self.ts_recent)
            self.rcv_adv = seq_add(self.rcv_nxt, window)
            self.last_ack_sent = self.rcv_nxt
        self.outbox.append(segment)
        if not self.timers.retransmit_armed():
            self.timers.arm_retransmit(self._now + self.rtt.rto)
        if self._retries == 0:
            self._rtt_seq = self.iss
            self._rtt_time = self._now

    # ------------------------------------------------------ application

    def take_output(self) -> list:
        """Segments to transmit, oldest first; includes the ACK owed, if any."""
        if self._ack_now and (1 << self.state) & _SYNCHRONIZED:
            self._send_ack()
        outbox = self.outbox
        if outbox:
            self.outbox = []
        return outbox

    def send_ready(self, now: float) -> None:
        """The application queued more data in send_buf."""
        self._now = now
        self._output()

    def recv_consumed(self, now: float) -> None:
        """The application read from recv_buf: announce the larger window if
        it grew by at least min(buffer/2, MSS) (RFC 1122 4.2.3.3) and the
        current one is below half the buffer, so steady reading does not
        double the ACK rate."""
        self._now = now
        if not (1 << self.state) & _RECEIVING:
            return
        current = seq_diff(self.rcv_adv, self.rcv_nxt)
        if (current <= self._rcv_buf_size // 2
                and self.recv_buf.space() - current >= self._sws_threshold):
            self._ack_now = True

    def close(self, now: float) -> None:
        """The application closed the socket: FIN after the queued data, or a
        RST if received data was left unread (as Linux)."""
        self._now = now
        state = self.state
        if state == CLOSED or state == TIME_WAIT:
            self._orphaned = True
            return
        if state == SYN_SENT:
            self._enter_closed()
            return
        if len(self.recv_buf):
            self.abort(now)
            return
        self._orphaned = True
        if state == FIN_WAIT_2:
            self.timers.linger = now + self.config.fin_wait2_timeout
        self._queue_fin()

    def shutdown_write(self, now: float) -> None:
        """SHUT_WR: FIN after the queued data; receiving continues."""
        self._now = now
        if self.state != CLOSED:
            self._queue_fin()

    def abort(self, now: float) -> None:
        """Drop the connection now, telling the peer with a RST (SO_LINGER 0)."""
        self._now = now
        if self.state == CLOSED:
            return
        if (1 << self.state) & _RESET_ON_ABORT:
            self.outbox.append(TcpSegment(self.local_port, self.remote_port, self.snd_nxt,
                                          self.rcv_nxt, RST | ACK, 0))
        self._enter_closed()

    def _queue_fin(self) -> None:
        if self._fin_seq is not None:
            return
        state = self.state
        if state == ESTABLISHED:
            self.state = FIN_WAIT_1
        elif state == CLOSE_WAIT:
            self.state = LAST_ACK
        elif state != SYN_SENT and state != SYN_RECEIVED:
            return
        # Before the handshake completes the FIN waits; see _handshake_acked.
        self._fin_seq = seq_add(self._send_base, len(self.send_buf))
        self._output()

    # ------------------------------------------------------------ timers

    def deadline(self):
        """The earliest time on_timer has work to do, or None."""
        return self.timers.earliest(self._keepalive_at() if self.keepalive else None)

    def _keepalive_at(self):
        if (not self.keepalive or not (1 << self.state) & _KEEPALIVE_STATES
                or self.snd_una != self.snd_max):
            return None
        return self._last_rx + self.keepidle + self._keepalive_probes * self.keepintvl

    def on_timer(self, now: float) -> None:
        self._now = now
        timers = self.timers
        if timers.expired(Timer.LINGER, now):
            self._enter_closed()
            return
        if timers.expired(Timer.RACK, now):
            self._detect_losses()
            if self._in_recovery and not self._cc.owns_window:
                self._prr(0)
            self._output()
        if timers.expired(Timer.TAIL_PROBE, now):
            self._send_tail_probe()
        if timers.expired(Timer.RETRANSMIT, now):
            self._on_retransmit_timeout()
        if timers.expired(Timer.PERSIST, now):
            self._on_persist_timeout()
        if timers.expired(Timer.DELAYED_ACK, now):
            self._ack_now = True
        keepalive_at = self._keepalive_at()
        if keepalive_at is not None and now >= keepalive_at:
            self._on_keepalive_timeout()

    def _on_retransmit_timeout(self) -> None:
        now = self._now
        if self._stall_start is None:
            self._stall_start = now - self.rtt.rto     # when the head went out, near enough
        self._retries += 1
        self.recovery_counts["timeouts"] += 1
        self._rtt_seq = None               # Karn: never time a retransmission
        self.rtt.back_off()
        if self._user_timed_out():
            self._fail(errno.ETIMEDOUT)
            return
        if self.state == SYN_SENT or self.state == SYN_RECEIVED:
            if self._retries > self.config.syn_retries:
                self._fail(errno.ETIMEDOUT)
                return
            self._send_syn()
            self._clamp_to_user_timeout()
            return
        if self._retries > self.config.retries:
            self._fail(errno.ETIMEDOUT)
            return
        # RFC 5681 (4) and RFC 6582 section 4: collapse to one segment, resend
        # from the first unacknowledged byte, and do not fast-retransmit on
        # the duplicate ACKs this will cause.  Only the first timeout of a
        # series, outside a recovery that already reduced the window, counts
        # as a new congestion event (as Linux).
        if self._retries == 1 and not self._in_recovery:
            self._begin_undo()
            self._cc.on_rto(self, seq_diff(self.snd_max, self.snd_una), now)
        self.cwnd = self.send_mss
        self._in_recovery = False
        self._in_loss = True
        self._dupacks = 0
        self._recover = self.snd_max
        self.timers.rack = None
        # RFC 8985 section 6.3: the head is lost, and what was sent a RACK
        # RTT and reordering window ago; SACKed data stays SACKed unless the
        # peer reneged.  Without SACK nothing tells more: all of it goes again.
        board = self._board
        board.mark_lost_on_timeout(now, board.reo_wnd(self.rtt.srtt, True, self.send_mss),
                                   not self.sack_enabled)
        self._retransmit_from(self.snd_una, seq_diff(self.snd_max, self.snd_una))
        self._output()
        if not self.timers.retransmit_armed():
            self._arm_retransmit(now)
        self._clamp_to_user_timeout()

    def _user_timed_out(self) -> bool:
        """TCP_USER_TIMEOUT: data (or our SYN) unacknowledged, or queued
        behind a zero window, for user_timeout seconds."""
        return (self.user_timeout > 0 and self._stall_start is not None
                and self._now - self._stall_start >= self.user_timeout)

    def _clamp_to_user_timeout(self) -> None:
        """Fire no later than the user timeout, so it is kept to the timer
        granularity rather than to the next backed-off retransmission."""
        timers = self.timers
        armed = timers.retransmit if timers.retransmit is not None else timers.tail_probe
        if self.user_timeout > 0 and armed is not None:
            give_up = self._stall_start + self.user_timeout
            if give_up < armed:
                timers.arm_retransmit(give_up)

    def _on_persist_timeout(self) -> None:
        self._probes_unanswered += 1
        if self._user_timed_out() or self._probes_unanswered > self.config.retries:
            self._fail(errno.ETIMEDOUT)
            return
        # A window too small to be worth a segment (sender SWS avoidance)
        # is used anyway once the persist timer runs out (RFC 9293
        # 3.8.6.2.1, the override timeout); a zero window gets a probe.
        if self._send_window_filler():
            return
        self._send_probe()
        self._persist_backoff += 1
        self._arm_persist()

    def _send_window_filler(self) -> bool:
        """Send as much new data as the peer's window takes now, in one
        segment; False if the window or the queue is empty."""
        snd_nxt = self.snd_nxt
        usable = seq_diff(seq_add(self.snd_una, self.snd_wnd), snd_nxt)
        fin_seq = self._fin_seq
        data_end = fin_seq if fin_seq is not None else seq_add(self._send_base,
                                                                len(self.send_buf))
        unsent = seq_diff(data_end, snd_nxt)
        size = min(usable, unsent, self.send_mss)
        if size <= 0:
            return False
        flags = ACK
        if size == unsent:
            flags = ACK | PSH if fin_seq is None else ACK | PSH | FIN
        self._segment(snd_nxt, flags, self.send_buf.peek(seq_diff(snd_nxt, self._send_base),
                                                         size))
        self._record_sent(snd_nxt, seq_add(snd_nxt, size + (flags & FIN)))
        self.snd_nxt = seq_add(snd_nxt, size + (flags & FIN))
        if seq_gt(self.snd_nxt, self.snd_max):
            self.snd_max = self.snd_nxt
        self._persist_backoff = 0
        if not self.timers.retransmit_armed():
            self.timers.arm_retransmit(self._now + self.rtt.rto)
        return True

    def _on_keepalive_timeout(self) -> None:
        # Linux's rule: with TCP_USER_TIMEOUT set, it (not keepcnt) bounds
        # how long unanswered probes may go on.
        if self.user_timeout > 0:
            gave_up = (self._keepalive_probes > 0
                       and self._now - self._last_rx >= self.user_timeout)
        else:
            gave_up = self._keepalive_probes >= self.keepcnt
        if gave_up:
            self.outbox.append(TcpSegment(self.local_port, self.remote_port, self.snd_nxt,
                                          self.rcv_nxt, RST | ACK, 0))
            self._fail(errno.ETIMEDOUT)
            return
        self._keepalive_probes += 1
        self._send_probe()

    def _send_probe(self) -> None:
        """An ACK with an already acknowledged sequence number: the peer
        must answer it with its current ACK and window (Linux style)."""
        self._segment(seq_add(self.snd_una, -1), ACK, b"")

    def _arm_persist(self) -> None:
        if self._stall_start is None:
            self._stall_start = self._now
        interval = min(max(self.rtt.rto, self.config.min_rto) * (1 << self._persist_backoff),
                       self.config.max_rto)
        self.timers.persist = self._now + interval

    # ----------------------------------------------------------- receive

    def on_segment(self, seg: TcpSegment, now: float) -> None:
        self._now = now
        state = self.state
        if state == SYN_SENT:
            self._on_segment_syn_sent(seg)
            return
        if not (1 << state) & _SYNCHRONIZED:
            return
        flags = seg.flags
        if state == SYN_RECEIVED and flags & SYN and seg.seq == self.irs:
            self._on_syn_again(seg)
            return
        self._last_rx = now
        self._keepalive_probes = 0
        payload = seg.payload
        payload_len = len(payload)
        seq = seg.seq
        rcv_nxt = self.rcv_nxt

        # PAWS (RFC 7323 5.3): an old timestamp marks an old duplicate,
        # unless TS.Recent itself is too old to compare with (5.5).
        timestamp = seg.timestamp
        if (timestamp is not None and self.ts_enabled and not flags & RST
                and ((timestamp[0] - self.ts_recent) & _MASK) >= _HALF
                and now - self.ts_recent_at <= _PAWS_IDLE):
            if flags & SYN:
                self._challenge_ack()
            else:
                self._answer_invalid(payload_len or flags & FIN)
            return

        # Acceptability (RFC 9293 3.10.7.4), against the window we advertised.
        offset = ((seq - rcv_nxt + _HALF) & _MASK) - _HALF
        rcv_wnd = ((self.rcv_adv - rcv_nxt + _HALF) & _MASK) - _HALF
        if rcv_wnd < 0:
            rcv_wnd = 0
        seg_len = payload_len + (flags & SYN) // SYN + (flags & FIN)
        if seg_len == 0:
            acceptable = 0 <= offset < rcv_wnd or offset == 0
        else:
            # With a zero window a segment at rcv_nxt is still accepted for
            # its ACK and RST; its data is trimmed away below.
            acceptable = (0 <= offset < rcv_wnd or 0 <= offset + seg_len - 1 < rcv_wnd
                          or offset == 0)
        if not acceptable:
            if flags & RST:
                return                     # RFC 5961 3.2: silently dropped
            if payload_len and offset < 0:
                self._report_duplicate(seq, seq_add(seq, payload_len))
            if flags & SYN:
                self._challenge_ack()      # RFC 5961 4.2, whatever the sequence number
                return
            self._answer_invalid(seg_len)
            if state == TIME_WAIT and flags & FIN:
                self.timers.linger = now + self.config.time_wait
            return

        if flags & (RST | SYN | ACK) != ACK:
            if flags & RST:
                if offset == 0:
                    self._reset_by_peer()
                else:
                    self._challenge_ack()  # RFC 5961 3.2: in window but not exact
            elif flags & SYN:
                self._challenge_ack()      # RFC 5961 4.2
            return                         # and without ACK, nothing to do

        # RFC 7323 4.3: remember the timestamp of a segment that covers the
        # left edge of what we last acknowledged.
        if timestamp is not None and ((self.last_ack_sent - seq) & _MASK) < _HALF:
            self.ts_recent = timestamp[0]
            self.ts_recent_at = now

        if state == SYN_RECEIVED:
            ack = seg.ack
            if not (seq_lt(self.snd_una, ack) and seq_le(ack, self.snd_max)):
                self.outbox.append(TcpSegment(self.local_port, self.remote_port, ack, 0,
                                              RST, 0))
                return
            self._handshake_acked()
        if not self._process_ack(seg, payload_len):
            return
        if self.state == CLOSED:
            return

        if payload_len and (1 << self.state) & _RECEIVING:
            if self._orphaned and seq_diff(seq_add(seq, payload_len), rcv_nxt) > 0:
                # Nobody will read this data (Linux: TCPAbortOnData).
                self.abort(now)
                return
            self._receive_data(offset, payload, rcv_wnd)
        if flags & FIN and (1 << self.state) & _RECEIVING:
            fin_offset = offset + payload_len
            if 0 <= fin_offset < rcv_wnd or fin_offset == 0:
                self._rcv_fin_seq = seq_add(rcv_nxt, fin_offset)
        if self._rcv_fin_seq is not None and self._rcv_fin_seq == self.rcv_nxt:
            self._receive_fin()
        self._output()

    def predictable(self) -> bool:
        """Whether the fast path may take this connection's next segments
        (stack/csrc/fastpath.h): nothing but the common case can then
        differ between it and on_segment.  Outside loss recovery, so that
        ACK processing sends nothing: the fast path takes the payload
        before the core processes the ACK, which on_segment does the other
        way round, and a segment sent in between would carry the new
        rcv_nxt."""
        return (self.state == ESTABLISHED and not self._orphaned and self._fin_seq is None
                and self._rcv_fin_seq is None and not self._assembler
                and not self._in_recovery and not self._in_loss
                and not self._board.sacked and not self._board.lost)

    def on_predicted_segment(self, seg: TcpSegment, payload_len: int, taken: int, now: float) -> None:
        """The rest of on_segment for a segment the fast path took, which
        did TS.Recent, put `taken` payload bytes into recv_buf and moved
        rcv_nxt: the ACK, the receive bookkeeping, output.  on_segment takes
        the payload after the ACK; predictable() holds only where that
        order changes nothing."""
        self._now = now
        self._last_rx = now
        self._keepalive_probes = 0
        self._process_ack(seg, payload_len)   # the fast path checked that it is acceptable
        if payload_len:
            self._took_in_order(taken, payload_len)
        self._output()

    def _on_segment_syn_sent(self, seg: TcpSegment) -> None:
        flags = seg.flags
        ack = seg.ack
        if flags & ACK and (seq_le(ack, self.iss) or seq_gt(ack, self.snd_max)):
            if not flags & RST:
                self.outbox.append(TcpSegment(self.local_port, self.remote_port, ack, 0,
                                              RST, 0))
            return
        if flags & RST:
            if flags & ACK:
                self._fail(errno.ECONNREFUSED)
            return
        if not flags & SYN:
            return
        self._learn_peer_syn(seg)
        # The window of a SYN or SYN-ACK is never scaled.
        self.snd_wnd = seg.window
        self._max_snd_wnd = seg.window
        self.snd_wl1 = seg.seq
        if flags & ACK:
            self.snd_wl2 = ack
            self.rcv_adv = seq_add(self.rcv_nxt, min(self.recv_buf.space(), _MAX_WINDOW))
            self._on_new_ack(seg, ack)
            self._handshake_acked()
            self._ack_now = True
            self._output()
        else:
            self.state = SYN_RECEIVED      # simultaneous open
            self.timers.retransmit = None
            self._send_syn()

    def _on_syn_again(self, seg: TcpSegment) -> None:
        """The peer's SYN once more, in SYN_RECEIVED: either a retransmission
        (our SYN-ACK was lost) or, after a simultaneous open, the peer's
        SYN-ACK, which completes the handshake (as Linux does)."""
        if not seg.flags & ACK:
            self._send_syn()
            return
        ack = seg.ack
        if seg.flags & RST or not (seq_lt(self.snd_una, ack) and seq_le(ack, self.snd_max)):
            return
        self.snd_wnd = seg.window          # a SYN's window is never scaled
        self.snd_wl1 = seg.seq
        self.snd_wl2 = ack
        self._on_new_ack(seg, ack)
        self._handshake_acked()
        self._output()

    def _handshake_acked(self) -> None:
        self.state = ESTABLISHED if self._fin_seq is None else FIN_WAIT_1
        self.events |= EV_ESTABLISHED
        self._retries = 0

    def _reset_by_peer(self) -> None:
        state = self.state
        if state == TIME_WAIT:
            return                         # RFC 1337: TIME_WAIT ignores RST
        if state == SYN_RECEIVED:
            self._fail(errno.ECONNREFUSED)
        elif state == CLOSE_WAIT:
            self._fail(errno.EPIPE)
        else:
            self._fail(errno.ECONNRESET)

    def _challenge_ack(self) -> None:
        """RFC 5961: ACK a suspicious RST, SYN or ACK, so that a genuine
        peer learns where we are, within the rate limits of section 7."""
        now = self._now
        last = self._invalid_ack_at
        if last is not None and now - last < self.config.invalid_ack_interval:
            return
        limiter = self.challenge_acks
        if limiter is not None and not limiter.allow(now):
            return
        self._invalid_ack_at = now
        self._ack_now = True

    def _answer_invalid(self, seg_len: int) -> None:
        """The duplicate ACK RFC 9293 asks for after an unacceptable segment.
        Segments without data are answered at most once per
        invalid_ack_interval, so two ends that disagree cannot ping-pong
        ACKs forever (Linux tcp_oow_rate_limited)."""
        if not seg_len:
            now = self._now
            last = self._invalid_ack_at
            if last is not None and now - last < self.config.invalid_ack_interval:
                return
            self._invalid_ack_at = now
        self._ack_now = True

    def _process_ack(self, seg: TcpSegment, payload_len: int) -> bool:
        """The ACK field and window of an acceptable segment carrying
        `payload_len` bytes.  Returns False if the segment must be dropped."""
        ack = seg.ack
        snd_una = self.snd_una
        acked = ((ack - snd_una + _HALF) & _MASK) - _HALF
        window = seg.window << self.snd_wscale
        self._probes_unanswered = 0
        if acked > 0:
            if ((self.snd_max - ack) & _MASK) >= _HALF:
                self._challenge_ack()      # RFC 5961 5.2: acknowledges data never sent
                return False
            self._on_new_ack(seg, ack)
        elif acked == 0:
            if self.sack_enabled:
                # Even with nothing outstanding: a D-SACK may follow the
                # last ACK, and it says a retransmission was needless.
                if seg.sack_blocks:
                    board = self._board
                    board.tsecr = seg.timestamp[1] if seg.timestamp and self.ts_enabled else None
                    self._on_sack(seg.sack_blocks, 0, board.sacked)
            elif (snd_una != self.snd_max and not payload_len and not seg.flags & (SYN | FIN)
                  and window == self.snd_wnd):
                self._on_duplicate_ack()
        elif acked < -self._max_snd_wnd:
            self._challenge_ack()          # RFC 5961 5.2: older than any window we saw
            return False
        rate = self._board.rate
        if rate.pending:
            sample = rate.sample(self._now, self._board.min_rtt)
            if self._cc.owns_window:
                self._cc.on_delivery(self, sample, self._now)

        # RFC 9293 3.10.7.4: take the window from the newest segment only.
        seq = seg.seq
        wl1 = self.snd_wl1
        if (((wl1 - seq) & _MASK) >= _HALF
                or (wl1 == seq and ((ack - self.snd_wl2) & _MASK) < _HALF)):
            if window and not self.snd_wnd:
                self.timers.persist = None
                self._persist_backoff = 0
            self.snd_wnd = window
            self.snd_wl1 = seq
            self.snd_wl2 = ack
            if window > self._max_snd_wnd:
                self._max_snd_wnd = window

        fin_seq = self._fin_seq
        if fin_seq is not None and self.snd_una == (fin_seq + 1) & _MASK:
            # The owner frees what sending needed (a closed socket's rings)
            # on an event, and an ACK of the FIN alone frees no data.
            state = self.state
            if state == FIN_WAIT_1:
                self.state = FIN_WAIT_2
                self.events |= EV_FIN_ACKED
                if self._orphaned:
                    self.timers.linger = self._now + self.config.fin_wait2_timeout
            elif state == CLOSING:
                self._enter_time_wait()
                self.events |= EV_FIN_ACKED
            elif state == LAST_ACK:
                self._enter_closed()
        return True

    def _on_new_ack(self, seg: TcpSegment, ack: int) -> None:
        now = self._now
        snd_una = self.snd_una
        flight_before = (self.snd_max - snd_una) & _MASK

        timestamp = seg.timestamp
        if self.ts_enabled and timestamp is not None and timestamp[1]:
            elapsed = (int(now * 1000) + self._ts_offset - timestamp[1]) & _MASK
            if elapsed < _HALF:
                self.rtt.sample(elapsed / 1000.0)
        elif self._rtt_seq is not None and seq_gt(ack, self._rtt_seq):
            self.rtt.sample(now - self._rtt_time)
            self._rtt_seq = None

        send_buf = self.send_buf
        send_base = self._send_base
        data_acked = ((ack - send_base + _HALF) & _MASK) - _HALF
        if data_acked > 0:
            queued = len(send_buf)
            if data_acked > queued:
                data_acked = queued        # the rest acknowledges our FIN
            if data_acked:
                send_buf.consume(data_acked)
                self._send_base = (send_base + data_acked) & _MASK
                self.events |= EV_WRITABLE
        else:
            data_acked = 0
        self.snd_una = ack
        if ((self.snd_nxt - ack) & _MASK) >= _HALF:
            self.snd_nxt = ack
        self._retries = 0
        self._stall_start = None
        board = self._board
        sacked_before = board.sacked
        if board.records:
            board.tsecr = timestamp[1] if timestamp is not None and self.ts_enabled else None
            board.acked(ack, now)

        if self._in_recovery:
            if seq_ge(ack, self._recover):
                self._end_recovery(timestamp)
            elif not self.sack_enabled:
                # NewReno partial acknowledgment: the next hole is lost too.
                # (With SACK, RACK tells _output what to resend.)
                self._retransmit_head()
                if not self._cc.owns_window:
                    self.cwnd = max(self.cwnd - data_acked + self.send_mss, self.send_mss)
        else:
            if self._in_loss:
                self._on_ack_after_timeout(ack, timestamp)
            self._dupacks = 0
            # Grow only while the window is what limits us (RFC 7661 spirit).
            if data_acked and 2 * flight_before >= self.cwnd:
                self._cc.on_ack(self, data_acked, now)
        if self.sack_enabled and (seg.sack_blocks or board.sacked or self._in_recovery
                                  or self._in_loss):
            self._on_sack(seg.sack_blocks, (ack - snd_una) & _MASK, sacked_before)

        if ack == self.snd_max:
            self.timers.retransmit = self.timers.tail_probe = None
        else:
            self._arm_retransmit(now)

    def _on_duplicate_ack(self) -> None:
        """Without SACK: RFC 5681 fast retransmit on the third, NewReno."""
        self._dupacks += 1
        if self._in_recovery:
            if not self._cc.owns_window:
                self.cwnd += self.send_mss  # NewReno: each dup ACK, a segment has left
            return
        # RFC 6582 section 4: not for losses of a window already recovered.
        if seq_lt(self.snd_una, self._recover):
            return
        if self._dupacks >= _DUPTHRESH:
            self._enter_recovery()

    def _enter_recovery(self) -> None:
        """Fast recovery: with SACK, RACK has marked what to resend and PRR
        paces it (RFC 6937 section 3, at the start of recovery); without,
        NewReno's fast retransmit."""
        now = self._now
        snd_una = self.snd_una
        flight = seq_diff(self.snd_max, snd_una)
        self._begin_undo()
        self._cc.on_congestion(self, flight, now)
        self.recovery_counts["fast_recoveries"] += 1
        self._recover = self.snd_max
        self._in_recovery = True
        if self.sack_enabled:
            self._prr_delivered = 0
            self._prr_out = 0
            self._recover_fs = max(flight, 1)
        else:
            self._retransmit_head()
            if not self._cc.owns_window:
                self.cwnd = self.ssthresh + 3 * self.send_mss
        self.timers.arm_retransmit(now + self.rtt.rto)

    def _end_recovery(self, timestamp) -> None:
        """The recovery point is acknowledged: cwnd falls to ssthresh (RFC
        6937, as RFC 6582 3.2 step 3 and Linux, rather than the flight,
        which leaves an application-limited sender at one segment), unless
        the recovery proves spurious."""
        self._in_recovery = False
        self._dupacks = 0
        self._board.recovery_ended()
        if self._spurious(timestamp):
            self._undo()
        elif not self._cc.owns_window:
            self.cwnd = self.ssthresh

    def _on_ack_after_timeout(self, ack: int, timestamp) -> None:
        """Eifel detection (RFC 3522): an ACK that echoes a timestamp older
        than the first retransmission was caused by an original, so the
        timeout was spurious.  Otherwise the loss state ends at the
        recovery point."""
        if self._spurious(timestamp):
            self._undo()
        elif seq_ge(ack, self._recover):
            self._in_loss = False
            self._board.recovery_ended()

    def _on_sack(self, blocks, advanced: int, sacked_before: int) -> None:
        """One ACK's SACK information (RFC 2018, 2883) into the scoreboard,
        then RACK loss detection and, in recovery, PRR.  `advanced` is how
        far snd_una moved, `sacked_before` the SACKed bytes before it did."""
        board = self._board
        if blocks:
            board.sack(blocks, self.snd_una, self.snd_max, self._now)
            if board.dsack is not None:
                self._on_dsack(board.dsack, board.dsack_retransmitted)
        self._detect_losses()
        if self._in_recovery and not self._cc.owns_window:
            # RFC 6937 DeliveredData: what snd_una passed plus the change in
            # SACKed bytes (SACKed bytes now acknowledged count once).
            self._prr(advanced + board.sacked - sacked_before)

    def _detect_losses(self) -> None:
        """RACK (RFC 8985 section 6.2 step 5) marks what is lost and sets
        the reordering timer for the rest; a first loss starts recovery."""
        board = self._board
        now = self._now
        reo_wnd = board.reo_wnd(self.rtt.srtt, self._in_recovery or self._in_loss, self.send_mss)
        lost, timeout = board.detect_loss(now, reo_wnd)
        self.timers.rack = now + timeout if timeout else None
        if lost and not self._in_recovery and not self._in_loss:
            self._enter_recovery()

    def _prr(self, delivered: int) -> None:
        """Proportional Rate Reduction (RFC 6937 section 3.1, with the
        slow-start reduction bound, PRR-SSRB, as Linux): spread the
        reduction to ssthresh over the recovery's ACKs, in proportion to
        what each delivered, by setting cwnd to pipe + what may go now."""
        mss = self.send_mss
        self._prr_delivered += delivered
        pipe = self._board.pipe(seq_diff(self.snd_nxt, self.snd_una))
        ssthresh = self.ssthresh
        if pipe > ssthresh:
            sndcnt = (-(-self._prr_delivered * ssthresh // self._recover_fs)
                      - self._prr_out)
        else:
            sndcnt = max(self._prr_delivered - self._prr_out, delivered) + mss
            if sndcnt > ssthresh - pipe:
                sndcnt = ssthresh - pipe
        if not self._prr_out and sndcnt < mss:
            sndcnt = mss                   # the fast retransmit goes at once
        elif sndcnt < 0:
            sndcnt = 0
        self.cwnd = pipe + sndcnt

    def _on_dsack(self, dsack, retransmitted: bool) -> None:
        """A D-SACK: the reordering window widens (RFC 8985 section 6.2
        step 4), and once every retransmission of the episode is reported
        as a duplicate, it was all spurious and is undone (RFC 3708's idea,
        as Linux's D-SACK undo)."""
        self._board.on_dsack(self.snd_una, self.snd_max)
        self.recovery_counts["dsacks_received"] += 1
        start, end = dsack
        if (self._undo_marker is None or self._retrans_stamp is None or not retransmitted
                or not seq_gt(end, self._undo_marker)):
            return
        mss = self.send_mss
        self._undo_retrans -= max(1, (seq_diff(end, start) + mss - 1) // mss)
        if self._undo_retrans <= 0:
            self._undo()

    def _begin_undo(self) -> None:
        """A congestion response starts: remember what to restore should it
        prove spurious (Linux tcp_init_undo)."""
        self._undo_marker = self.snd_una
        self._undo_retrans = 0
        self._undo_cwnd = self.cwnd
        self._undo_ssthresh = self.ssthresh
        self._retrans_stamp = None

    def _spurious(self, timestamp) -> bool:
        """Whether the episode's retransmissions were all needless: every
        one D-SACKed, or this ACK echoes a timestamp from before the first
        of them, so an original caused it (RFC 3522 section 3.2)."""
        if self._undo_marker is None or self._retrans_stamp is None:
            return False
        if self._undo_retrans <= 0:
            return True
        return (timestamp is not None and self.ts_enabled and timestamp[1] != 0
                and ((timestamp[1] - self._retrans_stamp) & _MASK) >= _HALF)

    def _undo(self) -> None:
        """Restore the window from before the episode (Linux
        tcp_undo_cwnd_reduction); after a timeout, what it marked lost was
        not, and the loss state ends."""
        self.recovery_counts["spurious_undone"] += 1
        if self._undo_cwnd > self.cwnd and not self._cc.owns_window:
            self.cwnd = self._undo_cwnd
        if self._undo_ssthresh > self.ssthresh:
            self.ssthresh = self._undo_ssthresh
        self._cc.on_undo(self)
        self._undo_marker = None
        if self._in_recovery:
            self._in_recovery = False
            self._board.recovery_ended()
        if self._in_loss:
            self._in_loss = False
            self._board.recovery_ended()
            self._board.unmark_lost()

    def _receive_data(self, offset: int, payload, rcv_wnd: int) -> None:
        """Payload starting `offset` bytes after rcv_nxt, already known to
        overlap the window."""
        end = offset + len(payload)
        if end > rcv_wnd:
            payload = payload[:rcv_wnd - offset] if rcv_wnd > offset else b""
            self._ack_now = True
        if offset < 0:
            self._report_duplicate(seq_add(self.rcv_nxt, offset), self.rcv_nxt)
            payload = payload[-offset:]
            offset = 0
        if not payload:
            self._ack_now = True           # a duplicate: tell the sender at once
            return
        assembler = self._assembler
        if assembler:
            held = assembler.overlap(offset, offset + len(payload))
            if held is not None:
                self._report_duplicate(seq_add(self.rcv_nxt, held[0]),
                                       seq_add(self.rcv_nxt, held[1]))
        recv_buf = self.recv_buf
        if offset == 0 and not assembler:
            taken = recv_buf.write(payload)
            self.rcv_nxt = (self.rcv_nxt + taken) & _MASK
            self._took_in_order(taken, len(payload))
            return
        assembler.add(offset, payload)
        if offset:
            # RFC 5681 4.2: one duplicate ACK per out-of-order segment, even
            # within a batch: the sender counts them to detect loss.
            self._send_ack()
            return
        # Filling a hole: acknowledge at once, so recovery moves on.
        self._ack_now = True
        data = assembler.pop_contiguous(recv_buf.space())
        taken = recv_buf.write(data)
        if taken:
            self.rcv_nxt = (self.rcv_nxt + taken) & _MASK
            self.events |= EV_READABLE
        if taken < len(data):              # the buffer shrank: forget the rest
            assembler.clear()

    def _took_in_order(self, taken: int, offered: int) -> None:
        """The receive buffer took `taken` of `offered` in-order bytes, and
        rcv_nxt has moved past them: ACK at once every second full segment
        (RFC 5681 4.2) or when the buffer was short, else within the
        delayed-ACK time."""
        if taken:
            self.events |= EV_READABLE
            self._rcv_unacked += taken
        if taken < offered or self._rcv_unacked >= 2 * self._rcv_mss:
            self._ack_now = True
        elif self.timers.delayed_ack is None:
            self.timers.delayed_ack = self._now + self.config.delayed_ack

    def _report_duplicate(self, start: int, end: int) -> None:
        """Data from `start` to `end` arrived twice: the next ACK, sent at
        once, reports it in a D-SACK block (RFC 2883), so a sender that
        retransmitted a segment that was only reordered, or whose ACK was
        lost, learns it and undoes its window reduction (Linux tcp_dsack_set)."""
        if self.sack_enabled:
            self._dsack = (start, end)
        self._ack_now = True

    def _receive_fin(self) -> None:
        self.rcv_nxt = seq_add(self.rcv_nxt, 1)
        self._rcv_fin_seq = None
        self.events |= EV_PEER_FIN
        self._ack_now = True
        state = self.state
        if state == ESTABLISHED or state == SYN_RECEIVED:
            self.state = CLOSE_WAIT
        elif state == FIN_WAIT_1:
            self.state = CLOSING
        elif state == FIN_WAIT_2:
            self._enter_time_wait()

    # ---------------------------------------------------------- path MTU

    def on_path_mtu(self, mtu: int, now: float) -> bool:
        """The path to the peer carries IPv4 packets of at most `mtu` bytes
        (an ICMP "fragmentation needed" the caller has validated and
        clamped): lower send_mss to fit and, since every larger segment in
        flight was dropped on the way, resend from snd_una at once at the
        new size (Linux tcp_simple_retransmit).  The MSS never grows here.
        Returns False, changing nothing, when segments already fit or the
        handshake has not yet fixed the MSS."""
        self._now = now
        if not (1 << self.state) & _SYNCHRONIZED:
            return False
        options = _TIMESTAMP_OPTION_LEN if self.ts_enabled else 0
        mss = max(mtu - _IPV4_TCP_HEADERS_LEN - options, 1)
        if mss >= self.send_mss:
            return False
        self.send_mss = mss
        if self.snd_una == self.snd_max or not (1 << self.state) & _SENDING:
            return True
        # Go back as after a timeout, but without its congestion response:
        # the drops came from the packet size, not from a queue, so cwnd and
        # ssthresh stay (a recovery ends as a full ACK would end it).  As
        # after a timeout, duplicate ACKs for what is resent must not start
        # a fast retransmit, and SACKed data goes again.
        if self._in_recovery:
            if not self._cc.owns_window:
                self.cwnd = self.ssthresh
            self._in_recovery = False
        self._in_loss = False
        self._dupacks = 0
        self._recover = self.snd_max
        self._board.forget()
        self.timers.rack = None
        self._rtt_seq = None               # Karn: never time a retransmission
        # The short segment Nagle waits on was dropped with the rest: the
        # resent tail may go at once and becomes the one to wait on.
        self._snd_sml = self.snd_una
        self.snd_nxt = self.snd_una
        self._output()
        self._arm_retransmit(now)          # counted from the resend, as Linux does
        return True

    # -------------------------------------------------------------- send

    def _output(self) -> None:
        """Send what the peer's window, cwnd, Nagle and the queue allow,
        then our FIN once all data is out.  Once anything is SACKed, lost or
        resent, what is deemed lost goes first and the pipe, not the
        flight, is held to cwnd (RFC 6675 section 5, as Linux)."""
        if not (1 << self.state) & _SENDING:
            return
        send_buf = self.send_buf
        send_base = self._send_base
        fin_seq = self._fin_seq
        data_end = fin_seq if fin_seq is not None else (send_base + len(send_buf)) & _MASK
        snd_nxt = self.snd_nxt
        board = self._board
        if data_end == snd_nxt and fin_seq is None and not board.lost:
            return                         # all sent: the common case on receive
        snd_una = self.snd_una
        if snd_una == self.snd_max:
            self._start_after_idle()
        mss = self.send_mss
        burst = self._segment_limit()
        if board.lost or self._in_loss or (self.sack_enabled and (
                board.sacked or board.extra or self._in_recovery)):
            budget = self.cwnd - board.pipe((snd_nxt - snd_una) & _MASK)
            if board.lost:
                budget = self._retransmit_lost(budget)
            peer_edge = (snd_una + self.snd_wnd) & _MASK
            budget_edge = (snd_nxt + max(budget, 0)) & _MASK
            window_end = peer_edge if seq_lt(peer_edge, budget_edge) else budget_edge
        else:
            cwnd = self.cwnd
            if 0 < self._dupacks < _DUPTHRESH and not self._in_recovery and snd_nxt == self.snd_max:
                # Limited transmit (RFC 3042): a new segment per early
                # duplicate ACK, so a small window can still produce the third.
                cwnd += self._dupacks * mss
            window = self.snd_wnd if self.snd_wnd < cwnd else cwnd
            window_end = (snd_una + window) & _MASK
        nagle = not self.nodelay and fin_seq is None
        unsent = ((data_end - snd_nxt + _HALF) & _MASK) - _HALF
        first_new = snd_nxt
        sent = False
        while unsent > 0:
            size = ((window_end - snd_nxt + _HALF) & _MASK) - _HALF
            if size > burst:
                size = burst
            if size > unsent:
                size = unsent
            if size <= 0:
                break
            partial = size % mss
            if size > mss and partial:
                # A short piece goes only at the end of the queue, and then
                # only if Nagle lets it (Linux tcp_mss_split_point); the next
                # round decides about it alone.
                if (size < unsent or nagle and snd_nxt != snd_una
                        and seq_gt(self._snd_sml, snd_una)):
                    size -= partial
                else:
                    self._snd_sml = (snd_nxt + size) & _MASK
            elif size < mss:
                if size < unsent:
                    # Sender SWS avoidance (RFC 9293 3.8.6.2.1): a segment
                    # cut short by the window goes only if it is at least
                    # half the largest window the peer offered.
                    if size < self._max_snd_wnd >> 1:
                        break
                elif nagle and snd_nxt != snd_una and seq_gt(self._snd_sml, snd_una):
                    # The tail of the queue waits while an earlier short
                    # segment is unacknowledged (Nagle, Minshall's variant).
                    break
                self._snd_sml = (snd_nxt + size) & _MASK
            flags = ACK
            if size == unsent:
                flags = ACK | PSH if fin_seq is None else ACK | PSH | FIN
            payload = send_buf.peek(((snd_nxt - send_base) & _MASK), size)
            if self._rtt_seq is None and not self.ts_enabled and snd_nxt == self.snd_max:
                self._rtt_seq = snd_nxt
                self._rtt_time = self._now
            self._segment(snd_nxt, flags, payload)
            snd_nxt = (snd_nxt + size + (flags & FIN)) & _MASK
            unsent -= size
            sent = True
        if unsent == 0 and fin_seq is not None and snd_nxt == fin_seq and not sent:
            self._segment(snd_nxt, ACK | FIN, b"")
            snd_nxt = (snd_nxt + 1) & _MASK
            sent = True
        if not sent:
            if (unsent > 0 and snd_nxt == snd_una and not self.timers.retransmit_armed()
                    and self.timers.persist is None):
                self._arm_persist()       # zero or silly window, nothing in flight
            return
        if snd_nxt != first_new:
            if first_new == self.snd_max:
                board.sent(first_new, snd_nxt, self._now)
            else:
                self._record_sent(first_new, snd_nxt)
            if self._in_recovery:
                self._prr_out += (snd_nxt - first_new) & _MASK
            self.snd_nxt = snd_nxt
            if seq_gt(snd_nxt, self.snd_max):
                self.snd_max = snd_nxt
        if unsent <= 0 and not board.lost:
            # The queue ran dry before the window did: what is delivered
            # next says how fast the application wrote, not the path.
            in_flight = board.pipe((snd_nxt - snd_una) & _MASK)
            if in_flight < self.cwnd:
                board.rate.mark_app_limited(in_flight)
        self.timers.persist = None
        if not self.timers.retransmit_armed():
            self._arm_retransmit(self._now)

    def _start_after_idle(self) -> None:
        """New data is about to go with nothing in flight.  The congestion
        control hears how long the connection was idle; after more than an
        RTO the window it earned no longer says what the path holds, so
        cwnd halves for every RTO of the pause, down to the initial window
        (RFC 5681 4.1 and RFC 2861, as Linux's tcp_cwnd_restart)."""
        now = self._now
        idle = now - self._last_tx
        self._last_tx = now
        if idle <= 0:
            return
        self._cc.on_transmit_start(self, idle, now)
        rto = self.rtt.rto
        if not self.config.slow_start_after_idle or idle <= rto or self._cc.owns_window:
            return
        cwnd = self.cwnd
        restart = min(self.config.initial_window_segments * self.send_mss, cwnd)
        self.ssthresh = max(self.ssthresh, cwnd * 3 // 4)
        idle -= rto
        while idle > 0 and cwnd > restart:
            cwnd >>= 1
            idle -= rto
        self.cwnd = max(cwnd, restart)

    def _arm_retransmit(self, now: float) -> None:
        """The retransmission timer, preceded by a tail loss probe (RFC 8985
        section 7) when one can recover a lost tail, or the lost ACKs of a
        flight, in a few round trips instead of a timeout."""
        rto_at = now + self.rtt.rto
        if (self.sack_enabled and not self._in_recovery and not self._in_loss and self._retries == 0
                and self.rtt.srtt is not None and (1 << self.state) & _SENDING):
            pto = 2 * self.rtt.srtt
            if pto < _TLP_MIN:
                pto = _TLP_MIN
            if seq_diff(self.snd_max, self.snd_una) <= self.send_mss:
                pto += _TLP_DELAYED_ACK
            if now + pto < rto_at:
                self.timers.arm_tail_probe(now + pto)
                return
        self.timers.arm_retransmit(rto_at)

    def _send_tail_probe(self) -> None:
        """New data if the peer's window has room, else the last segment
        again: either way the peer's answer (SACK) shows what was lost."""
        self.timers.arm_retransmit(self._now + self.rtt.rto)  # counted from the probe
        self.recovery_counts["tail_loss_probes"] += 1
        if self._send_window_filler():
            return
        outstanding = seq_diff(self.snd_max, self.snd_una)
        last = min(outstanding, self.send_mss)
        if last > 0:
            self._rtt_seq = None               # Karn: never time a retransmission
            self._retransmit_from(seq_add(self.snd_max, -last), last)

    def _segment_limit(self) -> int:
        """Payload one segment may carry: with segmentation offload, whole
        MSS-sized pieces up to the device's limit (it cuts them on the
        wire); else one MSS."""
        mss = self.send_mss
        burst = self.config.gso_max_size
        return burst - burst % mss if burst > mss else mss

    def _retransmit_lost(self, budget: int) -> int:
        """Resend what is deemed lost, oldest first, while each segment fits
        in `budget` (cwnd - pipe; RFC 6675 NextSeg rule 1, with RACK's
        marks).  A lost run leaves in segments of as many whole MSS as the
        budget and the device allow, as Linux resends a lost TSO skb whole.
        Returns what is left of the budget."""
        board = self._board
        snd_nxt = self.snd_nxt
        mss = self.send_mss
        burst = self._segment_limit()
        seq = self.snd_una
        while budget > 0:
            lost = board.next_lost(seq)
            if lost is None:
                break
            start, end = lost
            if not seq_lt(start, snd_nxt):
                break                      # not yet resent by a go-back: it will be
            limit = seq_diff(end, start)
            if (limit if limit < mss else mss) > budget:
                break
            used = self._retransmit_from(start, limit, min(burst, max(budget - budget % mss, mss)))
            if not used:
                break
            budget -= used
            seq = seq_add(start, used)
        return budget

    def _record_sent(self, start: int, end: int) -> None:
        """Scoreboard the range [start, end) just sent: new data past
        snd_max, and below it data resent after a go-back (snd_nxt moved
        back: the copies before are gone)."""
        board = self._board
        snd_max = self.snd_max
        now = self._now
        if seq_lt(start, snd_max):
            resent_end = end if seq_lt(end, snd_max) else snd_max
            board.retransmitted(start, resent_end, now, in_flight=False)
            start = resent_end
        if start != end:
            board.sent(start, end, now)

    def _retransmit_head(self) -> None:
        """Resend the first unacknowledged segment (fast retransmit, partial ACK)."""
        outstanding = seq_diff(self.snd_max, self.snd_una)
        if outstanding > 0:
            self._retransmit_from(self.snd_una, outstanding)

    def _retransmit_from(self, seq: int, limit: int, most: int = 0) -> int:
        """Resend one segment from `seq` of at most `most` payload bytes (one
        MSS if 0) and no more than `limit` sequence numbers; returns how
        many it covered (0: nothing to send)."""
        fin_seq = self._fin_seq
        data_end = seq_add(self._send_base, len(self.send_buf))
        size = min(most or self.send_mss, max(seq_diff(data_end, seq), 0), limit)
        end = seq_add(seq, size)
        flags = ACK
        if fin_seq is not None and end == fin_seq and limit > size:
            flags |= FIN
        elif not size:
            return 0
        if size and end == data_end:
            flags |= PSH                   # as the original carried it
        payload = self.send_buf.peek(seq_diff(seq, self._send_base), size) if size else b""
        self._rtt_seq = None               # Karn
        self._segment(seq, flags, payload)
        used = size + (flags & FIN)
        pieces = max(1, -(-size // self.send_mss))
        self.recovery_counts["retransmitted_segments"] += pieces
        self.retransmitted_segments += pieces
        self._board.retransmitted(seq, seq_add(seq, used), self._now)
        if self._in_recovery:
            self._prr_out += used
        if self._undo_marker is not None and (self._in_recovery or self._in_loss):
            self._undo_retrans += pieces
            if self._retrans_stamp is None:
                self._retrans_stamp = self._ts_now()
        return used

    def _segment(self, seq: int, flags: int, payload) -> None:
        """Queue a segment that carries our current ACK, window and options."""
        if payload:
            self._last_tx = self._now
        rcv_nxt = self.rcv_nxt
        segment = TcpSegment(self.local_port, self.remote_port, seq, rcv_nxt, flags,
                             self._advertise_window(), payload)
        if self.ts_enabled:
            segment.timestamp = ((int(self._now * 1000) + self._ts_offset) & _MASK,
                                 self.ts_recent)
        if self.sack_enabled and (self._assembler or self._dsack):
            # Only in the room the MSS leaves: a full-sized segment with SACK
            # blocks would outgrow the path MTU (pure ACKs carry them anyway).
            fits = min((self.send_mss - len(payload) - _SACK_OPTION_HEAD) // _SACK_BLOCK_LEN,
                       3 if self.ts_enabled else 4)
            if fits > 0:
                dsack = self._dsack
                if dsack is not None:
                    self._dsack = None     # reported once, first (RFC 2883 section 4)
                    fits -= 1
                blocks = tuple(((rcv_nxt + left) & _MASK, (rcv_nxt + right) & _MASK)
                               for left, right in self._assembler.sack_blocks(fits))
                segment.sack_blocks = blocks if dsack is None else (dsack,) + blocks
        self._ack_now = False
        self.timers.delayed_ack = None
        self._rcv_unacked = 0
        self.last_ack_sent = rcv_nxt
        self.outbox.append(segment)

    def _send_ack(self) -> None:
        self._segment(self.snd_nxt, ACK, b"")

    def time_wait_fields(self) -> tuple:
        """(snd_nxt, rcv_nxt, window field, ts_recent or None, timestamp
        offset): what answering the peer in TIME_WAIT needs once this object
        is gone (stack/timewait.py)."""
        window = ((self.rcv_adv - self.rcv_nxt + _HALF) & _MASK) - _HALF
        raw = max(0, window) >> self.rcv_wscale
        return (self.snd_nxt, self.rcv_nxt, min(raw, _MAX_WINDOW),
                self.ts_recent if self.ts_enabled else None, self._ts_offset)

    def _advertise_window(self) -> int:
        """The raw window field, updating rcv_adv.  The right edge never moves
        left, and moves right only by min(buffer/2, MSS) or more (receiver
        SWS avoidance, RFC 1122 4.2.3.3).  A scaled window that cannot say
        the edge exactly is rounded up, unless the buffer lacks the room: then
        down, the edge shrinking by less than a unit of the scale (RFC 7323
        2.4) while rcv_adv keeps the old one, whose data the buffer takes.
        Rounding up regardless let the edge creep a unit ahead of the room
        with every ACK, and a full buffer never showed a zero window."""
        rcv_nxt = self.rcv_nxt
        shift = self.rcv_wscale
        current = ((self.rcv_adv - rcv_nxt + _HALF) & _MASK) - _HALF
        if current < 0:
            current = 0
        room = window = self.recv_buf.space()
        if window - current < self._sws_threshold:
            window = current
        raw = window >> shift
        if raw > _MAX_WINDOW:
            raw = _MAX_WINDOW
        elif (raw << shift) < current and (raw + 1) << shift <= room:
            raw += 1                       # round up rather than shrink
        if (raw << shift) > current:
            self.rcv_adv = (rcv_nxt + (raw << shift)) & _MASK
        return raw

    def _set_rcv_mss(self, mss: int) -> None:
        self._rcv_mss = mss
        # Receiver SWS threshold, min(buffer/2, MSS), kept because every
        # segment sent needs it.
        self._sws_threshold = min(self._rcv_buf_size // 2, mss)

    def _ts_now(self) -> int:
        return (int(self._now * 1000) + self._ts_offset) & _MASK

    # ----------------------------------------------------------- closing

    def _enter_time_wait(self) -> None:
        self.state = TIME_WAIT
        self.timers.stop_sending()
        self.timers.linger = self._now + self.config.time_wait

    def _enter_closed(self) -> None:
        self.state = CLOSED
        self.events |= EV_CLOSED
        self._ack_now = False
        self.timers.stop_sending()
        self.timers.linger = None
        self._assembler.clear()

    def _fail(self, error: int) -> None:
        self.error = error
        self.events |= EV_RESET
        self._enter_closed()

    def check_invariants(self) -> None:
        """AssertionError on a state no input may lead to, as lwIP's
        LWIP_ASSERTs in tcp_in.c; the segment-level tests call it after
        every step.  The receive window's right edge never moving left is
        checked across steps, by the caller."""
        una, nxt, top = self.snd_una, self.snd_nxt, self.snd_max
        assert seq_le(una, nxt) and seq_le(nxt, top), f"snd_una {una}, snd_nxt {nxt}, snd_max {top}"
        data_end = seq_add(self._send_base, len(self.send_buf))
        fin_end = data_end if self._fin_seq is None else seq_add(self._fin_seq, 1)
        assert seq_le(top, fin_end), f"snd_max {top} beyond the data queued, {fin_end}"
        for start, end, *_ in self._board.records:
            assert seq_le(una, start) and seq_lt(start, end) and seq_le(end, top), (
                f"scoreboard record [{start}, {end}) outside [snd_una {una}, snd_max {top}]")
        assert not self.tcb.fp_predict or self.predictable(), "fast path allowed on an unpredictable connection"

    @property
    def recv_buf(self):
        return self._recv_buf

    @recv_buf.setter
    def recv_buf(self, buffer) -> None:
        """A buffer the fast path can append to (rx_write, rx_sink) is named
        to it; any other keeps it away."""
        self._recv_buf = buffer
        native.attach_rx_sink(self.tcb, getattr(buffer, "rx_write", 0), getattr(buffer, "rx_sink", 0))

    def __repr__(self) -> str:
        return (f"<TcpConnection {self.local_port}->{self.remote_port} {self.state.name} "
                f"una={self.snd_una} nxt={self.snd_nxt} rcv_nxt={self.rcv_nxt} "
                f"cwnd={self.cwnd} wnd={self.snd_wnd}>")


def _tcb_attribute(name: str) -> property:
    # Compiled per field, so that both CPython and PyPy's JIT see a plain
    # attribute access (operator.attrgetter is app-level code on PyPy).
    code = f"def get(conn): return conn.tcb.{name}\ndef put(conn, value): conn.tcb.{name} = value\n"
    namespace: dict = {}
    exec(code, namespace)
    return property(namespace["get"], namespace["put"], doc=f"tcb.{name}, shared with the fast path")


for _name in native.TCB_NUMBERS:
    setattr(TcpConnection, _name, _tcb_attribute(_name))
