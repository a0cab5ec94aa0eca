"""Scripted-peer harness for the TCP core, in the style of smoltcp's socket
tests: build the peer's segments with `rx`, the segments we expect with
`tx`, feed with `send`, collect with `recv`.  Every segment goes through
emit and parse on the way, so traces also exercise the wire format.

Every trace runs twice: once into the core alone, once as frames through
the receive fast path first (stack/fastpath.py), which must give the same
segments, events and buffer contents."""
import functools

import pytest

from mtcpshim.stack import native
from mtcpshim.stack.fastpath import FastPath, FlowTable
from mtcpshim.stack.storage import RingBuffer
from mtcpshim.stack.seq import seq_ge
from mtcpshim.stack.tcp import EV_CLOSED, EV_RESET, TcpConfig, TcpConnection, TcpState
from mtcpshim.stack.wire.tcp import ACK, SYN, TcpSegment

LOCAL_IP = 0xC6120002      # 198.18.0.2, the stack
REMOTE_IP = 0xC6120001     # 198.18.0.1, the scripted peer
LOCAL_PORT = 80
REMOTE_PORT = 49152
LOCAL_MAC = bytes.fromhex("020000000002")
REMOTE_MAC = bytes.fromhex("020000000001")
HANDSHAKE_RTT = 0.1


class Trace:
    def __init__(self, config=None, local_iss=1000, remote_iss=5000,
                 buffer_size=60000, send_buffer_size=None, fast_path=False):
        self.config = config or TcpConfig(timestamps=False)
        self.L = local_iss         # our ISS
        self.R = remote_iss        # the peer's ISS
        self.send_buf = RingBuffer(send_buffer_size or buffer_size)
        self.recv_buf = RingBuffer(buffer_size)
        self.window = min(buffer_size, 65535)   # our window while the buffer is empty
        self.now = 0.0
        self.conn = None
        self._right_edge = None    # of our receive window: it never moves left
        self._flows = FlowTable() if fast_path else None
        self._fast_path = FastPath(self._flows, LOCAL_MAC, LOCAL_IP) if fast_path else None
        self.fast_taken = 0        # segments the fast path took

    # segment builders; sequence numbers may be given unwrapped
    def rx(self, flags, seq, ack=0, payload=b"", window=65535, **options) -> TcpSegment:
        return TcpSegment(REMOTE_PORT, LOCAL_PORT, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                          flags, window, payload, **options)

    def tx(self, flags, seq, ack=0, payload=b"", window=None, **options) -> TcpSegment:
        return TcpSegment(LOCAL_PORT, REMOTE_PORT, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                          flags, self.window if window is None else window, payload,
                          **options)

    # the connection's inputs and outputs
    def connect(self):
        return self._adopt(TcpConnection.connect(self.config, LOCAL_IP, LOCAL_PORT, REMOTE_IP,
                                                 REMOTE_PORT, self.send_buf, self.recv_buf,
                                                 self.L, self.now))

    def accept(self, syn: TcpSegment):
        syn = TcpSegment.parse(syn.emit(REMOTE_IP, LOCAL_IP), REMOTE_IP, LOCAL_IP)
        return self._adopt(TcpConnection.accept(self.config, LOCAL_IP, LOCAL_PORT, REMOTE_IP,
                                                REMOTE_PORT, syn, self.send_buf, self.recv_buf,
                                                self.L, self.now))

    def _adopt(self, conn: TcpConnection) -> TcpConnection:
        if self._flows is not None:
            key = (LOCAL_PORT, REMOTE_IP, REMOTE_PORT)
            if self.conn is not None:
                self._flows.remove(key)
            self._flows.add(key, conn)
        self.conn = conn
        self.check()
        return conn

    def check(self) -> None:
        """The connection's invariants, after every step of a trace."""
        conn = self.conn
        if self._fast_path is not None:
            conn.tcb.fp_predict = conn.predictable()   # as the host does after every step
        conn.check_invariants()
        if conn.state in (TcpState.LISTEN, TcpState.SYN_SENT, TcpState.CLOSED):
            return
        if self._right_edge is not None:
            assert seq_ge(conn.rcv_adv, self._right_edge), (
                f"right edge moved left: {self._right_edge} -> {conn.rcv_adv}")
        self._right_edge = conn.rcv_adv

    def send(self, *segments: TcpSegment) -> None:
        """Deliver segments from the peer, as one receive batch."""
        if self._fast_path is not None:
            frames = [native.build_tcp_frame(LOCAL_MAC, REMOTE_MAC, REMOTE_IP, LOCAL_IP, 0,
                                             segment.header(), segment.payload) for segment in segments]
            self.fast_taken += self._fast_path.ingest(frames, self.now, None, self._to_core,
                                                      self._finish_predicted)
            self.check()
            return
        for segment in segments:
            wire = segment.emit(REMOTE_IP, LOCAL_IP)
            self.conn.on_segment(TcpSegment.parse(wire, REMOTE_IP, LOCAL_IP), self.now)
            self.check()

    def _to_core(self, frame, checksum_vouched: int, now: float) -> None:
        wire = bytes(frame[native.TCP_FRAME_HEADROOM:])
        self.conn.on_segment(TcpSegment.parse(wire, REMOTE_IP, LOCAL_IP), now)

    def _finish_predicted(self, conn, seg, payload_len: int, taken: int, now: float) -> None:
        conn.on_predicted_segment(seg, payload_len, taken, now)

    def recv(self) -> list:
        segments = [TcpSegment.parse(segment.emit(LOCAL_IP, REMOTE_IP), LOCAL_IP, REMOTE_IP)
                    for segment in self.conn.take_output()]
        self.check()
        return segments

    def wait(self, seconds: float) -> None:
        """Let time pass, running every timer that falls due on the way."""
        end = self.now + seconds
        for _ in range(1000):
            deadline = self.conn.deadline()
            if deadline is None or deadline > end:
                break
            self.now = max(self.now, deadline)
            self.conn.on_timer(self.now)
            self.check()
        self.now = end

    def wait_for_timer(self) -> float:
        """Advance exactly to the next deadline and run it; return how long that was."""
        deadline = self.conn.deadline()
        assert deadline is not None, "no timer pending"
        waited = deadline - self.now
        self.now = deadline
        self.conn.on_timer(self.now)
        self.check()
        return waited

    def write(self, data: bytes) -> None:
        assert self.send_buf.write(data) == len(data)
        self.conn.send_ready(self.now)
        self.check()

    def read(self, n: int = 1 << 30) -> bytes:
        data = self.recv_buf.read(n)
        self.conn.recv_consumed(self.now)
        self.check()
        return data

    def events(self) -> int:
        """Events raised since the last call, cleared as the runtime would."""
        events, self.conn.events = self.conn.events, 0
        return events

    def assert_failed(self, error: int) -> None:
        """The connection gave up: CLOSED, `error` for the application, and
        the reset and closed events raised."""
        assert self.conn.state == TcpState.CLOSED
        assert self.conn.error == error
        assert self.events() == EV_RESET | EV_CLOSED

    def establish(self, **peer_syn_options) -> None:
        """Passive open from a SYN carrying `peer_syn_options` (MSS 1460 by
        default); the peer's ACK arrives HANDSHAKE_RTT later."""
        peer_syn_options.setdefault("mss", 1460)
        self.accept(self.rx(SYN, self.R, **peer_syn_options))
        self.recv()
        self.now += HANDSHAKE_RTT
        self.send(self.rx(ACK, self.R + 1, self.L + 1))
        self.events()


@pytest.fixture(params=["core", "fast-path"])
def make_tcp_trace(request):
    """`make_trace(config=..., local_iss=..., remote_iss=..., buffer_size=...)`:
    segments into the core alone, or through the receive fast path first."""
    if request.param == "core":
        return Trace
    if not native.ACCELERATED:
        pytest.skip("the fast path needs the C module")
    return functools.partial(Trace, fast_path=True)


@pytest.fixture
def make_core_trace():
    """`make_tcp_trace` into the core only."""
    return Trace


@pytest.fixture
def make_fast_trace():
    """`make_tcp_trace` through the fast path only, for its own tests."""
    if not native.ACCELERATED:
        pytest.skip("the fast path needs the C module")
    return functools.partial(Trace, fast_path=True)


@pytest.fixture
def tcp_trace(make_tcp_trace) -> Trace:
    return make_tcp_trace()


@pytest.fixture
def tcp_established(make_tcp_trace) -> Trace:
    """ESTABLISHED by passive open, no options but MSS 1460 on either side;
    both buffers 60000 bytes (window 60000, no scaling)."""
    trace = make_tcp_trace()
    trace.establish()
    return trace
