"""The TCP endpoint table of one host: ports, listeners, connections, demux
and timers.  Sans-IO like the TCP core beneath it: segments in (already
stripped of IPv4), segments out through `take_output()`, time passed in.

Buffers come from the caller (the runtime hands out shared-memory rings), so
the host never decides where bytes live.
"""
import errno
import heapq
import random

from stack.tcp import (EV_CLOSED, EV_ESTABLISHED, TcpConfig, TcpConnection, TcpState,
                       reset_for)
from stack.seq import seq_gt
from stack.wire.errors import WireError
from stack.wire.tcp import SYN, ACK, RST, TcpSegment

# RFC 6335 dynamic range, the same as Linux's default ip_local_port_range.
EPHEMERAL_PORTS = range(32768, 61000)


class Listener:
    """A passive socket.  `accept_buffers(remote_ip, remote_port)` returns
    (send_buf, recv_buf, owner) for a new connection or None to refuse it;
    `owner` is the caller's handle, kept on the connection as `conn.owner`."""

    __slots__ = ("port", "backlog", "accept_buffers", "pending")

    def __init__(self, port, backlog, accept_buffers):
        self.port = port
        self.backlog = backlog
        self.accept_buffers = accept_buffers
        self.pending = 0  # connections in SYN_RECEIVED


class TcpHost:
    def __init__(self, ip: int, config: TcpConfig | None = None, rng: random.Random | None = None):
        self.ip = ip
        self.config = config or TcpConfig()
        self.rng = rng or random.SystemRandom()
        self.listeners: dict[int, Listener] = {}
        self.bound_ports: set[int] = set()
        self.connections: dict[tuple[int, int, int], TcpConnection] = {}  # (local_port, remote_ip, remote_port)
        self.touched: set[TcpConnection] = set()  # connections with events for the caller
        self.counters: dict[str, int] = {}
        self._timers: list[tuple[float, int, TcpConnection]] = []
        self._timer_seq = 0
        self._output: list[tuple[int, bytes]] = []

    # -- ports -----------------------------------------------------------

    def bind(self, port: int) -> int:
        """Reserves `port` (0: an ephemeral one).  Raises OSError(EADDRINUSE)."""
        if port == 0:
            return self._ephemeral_port(lambda p: p not in self.bound_ports)
        if port in self.bound_ports:
            raise OSError(errno.EADDRINUSE, "port in use")
        self.bound_ports.add(port)
        return port

    def unbind(self, port: int) -> None:
        """Releases a port its socket reserved.  Connections still using it
        (TIME_WAIT) keep their 4-tuples, which connect_ephemeral avoids."""
        self.bound_ports.discard(port)

    def _ephemeral_port(self, usable) -> int:
        # RFC 6056 algorithm 1: random start, then linear probe.
        span = len(EPHEMERAL_PORTS)
        start = self.rng.randrange(span)
        for i in range(span):
            port = EPHEMERAL_PORTS[(start + i) % span]
            if usable(port):
                self.bound_ports.add(port)
                return port
        raise OSError(errno.EADDRNOTAVAIL, "no free local port")

    # -- opening ---------------------------------------------------------

    def listen(self, port: int, backlog: int, accept_buffers) -> Listener:
        listener = Listener(port, max(1, backlog), accept_buffers)
        self.listeners[port] = listener
        return listener

    def unlisten(self, port: int) -> None:
        self.listeners.pop(port, None)

    def connect(self, local_port, remote_ip, remote_port, send_buf, recv_buf, owner, now) -> TcpConnection:
        key = (local_port, remote_ip, remote_port)
        if key in self.connections:
            raise OSError(errno.EADDRINUSE, "connection exists")
        conn = TcpConnection.connect(self.config, self.ip, local_port, remote_ip, remote_port,
                                     send_buf, recv_buf, self._iss(), now)
        conn.owner = owner
        self.connections[key] = conn
        self.after(conn, now)
        return conn

    def connect_ephemeral(self, remote_ip, remote_port, send_buf, recv_buf, owner, now) -> TcpConnection:
        port = self._ephemeral_port(
            lambda p: p not in self.bound_ports and (p, remote_ip, remote_port) not in self.connections)
        return self.connect(port, remote_ip, remote_port, send_buf, recv_buf, owner, now)

    def _iss(self) -> int:
        return self.rng.getrandbits(32)

    # -- input -----------------------------------------------------------

    def receive(self, src_ip: int, dst_ip: int, data, now: float) -> None:
        """A TCP segment whose checksum the interface has verified."""
        try:
            seg = TcpSegment.parse(data, src_ip, dst_ip, verify_checksum=False)
        except WireError as err:
            self.count(err.reason)
            return
        conn = self.connections.get((seg.dst_port, src_ip, seg.src_port))
        if conn is not None:
            if not self._reincarnates(conn, seg):
                conn.on_segment(seg, now)
                self.after(conn, now)
                return
            self._forget(conn)
        listener = self.listeners.get(seg.dst_port)
        if listener is not None and seg.flags & (SYN | ACK | RST) == SYN:
            self._passive_open(listener, src_ip, seg, now)
            return
        self.count("tcp_no_socket")
        reply = reset_for(seg)
        if reply is not None:
            self._output.append((src_ip, reply.emit(self.ip, src_ip, fill_checksum=False)))

    @staticmethod
    def _reincarnates(conn: TcpConnection, seg: TcpSegment) -> bool:
        """A SYN above the old sequence space may reuse a TIME_WAIT 4-tuple
        (RFC 9293 3.6.1, as Linux does): clients recycle ports quickly."""
        return (conn.state == TcpState.TIME_WAIT and seg.flags & (SYN | ACK | RST) == SYN
                and seq_gt(seg.seq, conn.rcv_nxt))

    def _passive_open(self, listener: Listener, src_ip: int, syn: TcpSegment, now: float) -> None:
        if listener.pending >= listener.backlog:
            self.count("tcp_syn_backlog_full")
            return
        accepted = listener.accept_buffers(src_ip, syn.src_port)
        if accepted is None:
            self.count("tcp_accept_refused")
            return
        send_buf, recv_buf, owner = accepted
        conn = TcpConnection.accept(self.config, self.ip, syn.dst_port, src_ip, syn.src_port, syn,
                                    send_buf, recv_buf, self._iss(), now)
        conn.owner = owner
        conn.listener = listener
        listener.pending += 1
        self.connections[(syn.dst_port, src_ip, syn.src_port)] = conn
        self.after(conn, now)

    # -- bookkeeping after every call into a connection -------------------

    def after(self, conn: TcpConnection, now: float) -> None:
        """Collects a connection's output, timer and events; the runtime
        calls it after driving a connection directly (send_ready, close...)."""
        out = conn.take_output()
        if out:
            remote = conn.remote_ip
            emit = self._output.append
            for seg in out:
                # The interface fills the checksum while framing (C, one pass).
                emit((remote, seg.emit(self.ip, remote, fill_checksum=False)))
        deadline = conn.deadline()
        if deadline is not None and deadline != conn.timer_at:
            conn.timer_at = deadline
            self._timer_seq += 1
            heapq.heappush(self._timers, (deadline, self._timer_seq, conn))
        events = conn.events
        if events:
            if events & EV_ESTABLISHED and conn.listener is not None:
                conn.listener.pending -= 1
                conn.listener = None
            if events & EV_CLOSED:
                self._forget(conn)
            self.touched.add(conn)

    def _forget(self, conn: TcpConnection) -> None:
        conn.timer_at = None  # its heap entries are now stale
        key = (conn.local_port, conn.remote_ip, conn.remote_port)
        if self.connections.get(key) is conn:
            del self.connections[key]
        if conn.listener is not None:
            conn.listener.pending -= 1
            conn.listener = None

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers and timers[0][2].timer_at != timers[0][0]:
            heapq.heappop(timers)  # superseded entry
        return timers[0][0] if timers else None

    def on_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, _, conn = heapq.heappop(timers)
            if conn.timer_at != deadline:
                continue
            conn.timer_at = None
            conn.on_timer(now)
            self.after(conn, now)

    def take_output(self) -> list[tuple[int, bytes]]:
        out, self._output = self._output, []
        return out

    def count(self, reason: str) -> None:
        self.counters[reason] = self.counters.get(reason, 0) + 1
