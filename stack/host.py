"""The TCP endpoint table of one host: ports, listeners, connections, demux
and timers.  Sans-IO like the TCP core beneath it: segments in (already
stripped of IPv4), segments out through `take_output()`, time passed in.
Each output is (destination, TCP header, payload, gso_size): the header's
checksum is left to the framer, the payload is a view where the bytes
already are (the send ring), and a gso_size above 0 asks the device to cut
the segment into pieces of that much payload.

Buffers come from the caller (the runtime hands out shared-memory rings), so
the host never decides where bytes live.

Initial sequence numbers follow RFC 6528 and ephemeral ports RFC 6056
(algorithm 3), both from keyed hashes in `mtcpshim.stack.isn`.  A listener holds at
most `backlog` connections in SYN_RECEIVED; SYNs beyond that are answered
with SYN cookies (as Linux with tcp_syncookies=1), which keep no state at
all: the connection and its buffers come into being only when an ACK
returns a valid cookie.  Under a SYN flood the host's memory therefore
stays bounded by the backlogs.

ICMP "fragmentation needed" messages come in through `receive_icmp_error`
and lower a connection's MSS (RFC 1191) once they pass the checks of RFC
5927: they must name a live connection and a sequence number it has in
flight, and the MTU they report is held to Linux's floor.
"""
from __future__ import annotations

import collections
import errno
import heapq
import random

from mtcpshim.stack import native
from mtcpshim.stack.fastpath import FlowTable
from mtcpshim.stack.io.steer import worker_of_ports
from mtcpshim.stack.isn import COOKIE_MAX_AGE, COOKIE_PERIOD, MSS_TABLE, TcpSecrets, mss_index_for
from mtcpshim.stack.tcp import (EV_CLOSED, EV_ESTABLISHED, TIME_WAIT, ChallengeAckLimiter, TcpConfig,
                       TcpConnection, reset_for)
from mtcpshim.stack.seq import SEQ_MASK, seq_add, seq_gt
from mtcpshim.stack.timewait import REINCARNATE, TimeWaitTable
from mtcpshim.stack.wire.errors import WireError
from mtcpshim.stack.wire.icmp import FragmentationNeeded
from mtcpshim.stack.wire.tcp import SYN, ACK, RST, MAX_WSCALE, TcpSegment

# RFC 6335 dynamic range, the same as Linux's default ip_local_port_range.
EPHEMERAL_PORTS = range(32768, 61000)
# Linux net.ipv4.route.min_pmtu: a smaller reported MTU is raised to this,
# so a forged ICMP message cannot shrink segments to a trickle.
MIN_PATH_MTU = 552

# A cookie SYN-ACK is sent before any buffer exists, so it announces a fixed
# window and, unless TcpConfig.recv_wscale says otherwise, Linux's usual
# shift; the connection made from the cookie keeps to both.
COOKIE_WINDOW = 65535
COOKIE_WSCALE = 7
# A cookie SYN-ACK's TSval carries the options the SYN offered in its low
# bits (the peer echoes it in TSecr): the peer's window shift (15: none,
# shifts never exceed MAX_WSCALE = 14) and SACK-permitted.
_TS_OPTION_BITS = 5
_TS_OPTION_MASK = (1 << _TS_OPTION_BITS) - 1
_TS_NO_WSCALE = 0xF
_TS_SACK = 0x10
# Stale timer entries tolerated beyond two per connection before the heap
# is rebuilt without them (see _schedule).
_STALE_TIMERS_KEPT = 64
# A cookie answered this recently is a connection that may complete any
# moment: room is kept for it, so that a burst of clients larger than the
# room left does not complete handshakes nobody would serve.  Longer than a
# handshake's round trip on the links a stack like this serves (a LAN's is
# well under a millisecond; a slower client's ACK may find no room and wait
# for its retransmission, as on Linux), short enough that a SYN flood's
# cookies, which never complete, hold little room: 10k SYNs a second, 100.
# A stack that stalled (a collection, a JIT compilation) has its peers'
# ACKs waiting unread, so a cookie sent at or after the previous batch of
# input is kept too, however long ago that was, up to COOKIE_STALL_SECONDS:
# its ACK may be in this batch.
COOKIE_RESERVE_SECONDS = 0.01
COOKIE_STALL_SECONDS = 0.1


class Listener:
    """A passive socket.  `accept_buffers(remote_ip, remote_port)` returns
    (send_buf, recv_buf, owner) for a new connection or None to refuse it;
    `owner` is the caller's handle, kept on the connection as `conn.owner`.
    It is called when a SYN is taken into the backlog, or, for a SYN that
    was answered with a cookie, when the ACK carrying the cookie arrives.
    `has_room(n)` says whether n more connections completed now could be
    served (their owner has sockets and accept queue entries for them);
    while it says no, SYNs go unanswered, cookies included, as Linux leaves
    them when its accept queue is full: the client retries, and no handshake
    completes that nobody would serve.  Cookies answered in the last
    COOKIE_RESERVE_SECONDS count as connections about to complete."""

    __slots__ = ("port", "backlog", "accept_buffers", "has_room", "pending", "cookies_sent_at",
                 "recent_cookies", "reuse_address")

    def __init__(self, port, backlog, accept_buffers, has_room=lambda wanted: True, reuse_address=False):
        self.port = port
        self.reuse_address = reuse_address  # SO_REUSEADDR, which its connections inherit
        self.backlog = backlog
        self.accept_buffers = accept_buffers
        self.has_room = has_room
        self.recent_cookies = collections.deque()  # when each recent cookie went out
        self.pending = 0  # connections in SYN_RECEIVED
        self.cookies_sent_at = None  # last time the backlog overflowed into cookies


class TcpHost:
    """`secret` keys the host's hashes (isn.py); `rng` draws one if it is
    None, and random port starts; pass a seeded random.Random for
    reproducible tests.  `max_connections` (None: no
    limit) bounds the connection table: beyond it connect() raises
    OSError(ENOBUFS) and SYNs are dropped.  With `fast_path` (and the C
    module), the connections are in a FlowTable too, for the receive fast
    path (stack/fastpath.py) that a Node runs in front of the host.
    `steering` (worker, workers): this host is one of several stack workers
    on an interface and receives only the flows io.steer.worker_of_ports
    gives it (None: the only one)."""

    def __init__(self, ip: int, config: TcpConfig | None = None,
                 rng: random.Random | None = None, max_connections: int | None = None,
                 fast_path: bool = True, secret: bytes | None = None,
                 steering: tuple[int, int] | None = None):
        if steering is not None and not 0 <= steering[0] < steering[1]:
            raise ValueError(f"steering {steering}: the worker is not one of the workers")
        self.ip = ip
        self.steering = steering
        self.config = config or TcpConfig()
        self.rng = rng or random.SystemRandom()
        self.secrets = TcpSecrets(secret or self.rng.getrandbits(256).to_bytes(32, "big"))
        self.challenge_acks = ChallengeAckLimiter(self.config.challenge_ack_limit, self.rng)
        self._spread_key = self.rng.getrandbits(64)
        self.max_connections = max_connections
        self._port_counter = 0  # RFC 6056 algorithm 3's next_ephemeral
        self.listeners: dict[int, list[Listener]] = {}   # more than one: SO_REUSEPORT
        self.bound_ports: dict[int, list[int]] = {}      # port -> [sockets, of them with SO_REUSEPORT]
        self.connections: dict[tuple[int, int, int], TcpConnection] = {}  # (local_port, remote_ip, remote_port)
        # local port -> [connections, connections without SO_REUSEADDR]
        self._ports_in_use: dict[int, list[int]] = {}
        self.flows = FlowTable() if fast_path and native.ACCELERATED else None  # the same, for C
        self.time_waits = TimeWaitTable(self.config.time_wait, self.config.max_time_wait)  # same keys
        self.touched: set[TcpConnection] = set()  # connections with events for the caller
        self.counters: dict[str, int] = {}
        self.recovery_counts = collections.Counter()  # every connection's loss recovery events
        self._timers: list[tuple[float, int, TcpConnection]] = []
        self._timer_seq = 0
        self._output: list[tuple[int, bytes, int]] = []
        self._batch_at = self._read_until = 0.0   # this batch's time, and the one before (cookies)

    # -- ports -----------------------------------------------------------

    def bind(self, port: int, reuse_address: bool = False, reuse_port: bool = False) -> int:
        """Reserves `port` (0: an ephemeral one).  Raises OSError(EADDRINUSE)
        while another socket has bound it, unless all of them and the caller
        set SO_REUSEPORT; or while a connection or a TIME_WAIT record still
        uses it, unless both that one and the caller set SO_REUSEADDR
        (Linux's inet_csk_bind_conflict): a server restarted with
        SO_REUSEADDR gets its port back at once, one without it waits out
        TIME_WAIT."""
        if port == 0:
            return self._ephemeral_port(lambda p: p not in self.bound_ports and not self._port_held(p, False),
                                        reuse_port=reuse_port)
        bound = self.bound_ports.get(port)
        if bound is not None and not (reuse_port and bound[1] == bound[0]):
            raise OSError(errno.EADDRINUSE, "port in use")
        if self._port_held(port, reuse_address):
            raise OSError(errno.EADDRINUSE, "port in use")
        self._hold(port, reuse_port)
        return port

    def _hold(self, port: int, reuse_port: bool) -> None:
        bound = self.bound_ports.setdefault(port, [0, 0])
        bound[0] += 1
        bound[1] += reuse_port

    def _port_held(self, port: int, reuse_address: bool) -> bool:
        if self.time_waits.holds_port(port, reuse_address):
            return True
        in_use = self._ports_in_use.get(port)
        return in_use is not None and (not reuse_address or in_use[1] > 0)

    def unbind(self, port: int, reuse_port: bool = False) -> None:
        """Releases a port a socket reserved (with `reuse_port` as it bound
        it).  Connections still using it (TIME_WAIT) keep their 4-tuples,
        which connect_ephemeral avoids."""
        bound = self.bound_ports.get(port)
        if bound is None:
            return
        bound[0] -= 1
        bound[1] -= reuse_port
        if not bound[0]:
            del self.bound_ports[port]

    def steers_here(self, local_port: int, remote_port: int) -> bool:
        """Whether this worker receives the frames of a flow between these ports."""
        if self.steering is None:
            return True
        worker, workers = self.steering
        return worker_of_ports(local_port, remote_port, workers) == worker

    def _ephemeral_port(self, usable, start=None, reuse_port: bool = False) -> int:
        """The first usable port from `start` on (RFC 6056 algorithm 1, a
        random start, when None: bind() knows no destination yet)."""
        span = len(EPHEMERAL_PORTS)
        if start is None:
            start = self.rng.randrange(span)
        for i in range(span):
            port = EPHEMERAL_PORTS[(start + i) % span]
            if usable(port):
                self._hold(port, reuse_port)
                self._port_counter += i + 1
                return port
        raise OSError(errno.EADDRNOTAVAIL, "no free local port")

    # -- opening ---------------------------------------------------------

    def listen(self, port: int, backlog: int, accept_buffers, has_room=lambda wanted: True,
               reuse_address: bool = False) -> Listener:
        """A listener on a bound port.  Listeners that share a port (each
        bound with SO_REUSEPORT) split its new connections by a hash of the
        peer's address and port, as Linux's reuseport groups do."""
        listener = Listener(port, max(1, backlog), accept_buffers, has_room, reuse_address)
        self.listeners.setdefault(port, []).append(listener)
        return listener

    def _spread(self, src_ip: int, src_port: int) -> int:
        """Which listener of a shared port a peer's segments go to: the same
        for all of them (the ACK that returns a cookie included), by a hash
        keyed with a secret of this host."""
        return hash((self._spread_key, src_ip, src_port)) & 0xFFFFFFFF

    def unlisten(self, listener: Listener) -> None:
        group = self.listeners.get(listener.port, [])
        if listener in group:
            group.remove(listener)
            if not group:
                del self.listeners[listener.port]

    def connect(self, local_port, remote_ip, remote_port, send_buf, recv_buf, owner, now,
                reuse_address: bool = False) -> TcpConnection:
        """Active open.  Raises OSError: EADDRINUSE if the 4-tuple is taken,
        ENOBUFS at max_connections."""
        key = (local_port, remote_ip, remote_port)
        if key in self.connections or key in self.time_waits:
            raise OSError(errno.EADDRINUSE, "connection exists")
        if self._full():
            self.count("tcp_connection_limit")
            raise OSError(errno.ENOBUFS, "connection table full")
        secrets = self.secrets
        conn = TcpConnection.connect(
            self.config, self.ip, local_port, remote_ip, remote_port, send_buf, recv_buf,
            secrets.isn(self.ip, local_port, remote_ip, remote_port, now), now,
            secrets.timestamp_offset(self.ip, local_port, remote_ip, remote_port))
        conn.owner = owner
        conn.reuse_address = reuse_address
        conn.challenge_acks = self.challenge_acks
        conn.recovery_counts = self.recovery_counts
        self._add_connection(key, conn)
        self.count("tcp_active_opens")             # Linux's ActiveOpens: SYNs sent to open a connection
        self.collect(conn, now)
        return conn

    def connect_ephemeral(self, remote_ip, remote_port, send_buf, recv_buf, owner, now,
                          reuse_address: bool = False) -> TcpConnection:
        """Active open from a port chosen by RFC 6056 algorithm 3: a keyed
        hash of the destination picks where the search starts, so ports are
        unpredictable off-path yet successive connections to one
        destination do not collide with its TIME_WAIT 4-tuples.  Under
        steering the search passes over the ports whose replies would reach
        another worker."""
        if self._full():
            self.count("tcp_connection_limit")
            raise OSError(errno.ENOBUFS, "connection table full")
        offset = self.secrets.port_offset(self.ip, remote_ip, remote_port)
        port = self._ephemeral_port(
            lambda p: p not in self.bound_ports and (p, remote_ip, remote_port) not in self.connections
            and (p, remote_ip, remote_port) not in self.time_waits and self.steers_here(p, remote_port),
            (offset + self._port_counter) % len(EPHEMERAL_PORTS))
        return self.connect(port, remote_ip, remote_port, send_buf, recv_buf, owner, now, reuse_address)

    def _full(self) -> bool:
        return self.max_connections is not None and len(self.connections) >= self.max_connections

    # -- input -----------------------------------------------------------

    def receive(self, src_ip: int, dst_ip: int, data, now: float) -> None:
        """A TCP segment whose checksum the interface has verified."""
        if now != self._batch_at:
            self._read_until, self._batch_at = self._batch_at, now
        try:
            seg = TcpSegment.parse(data, src_ip, dst_ip, verify_checksum=False)
        except WireError as err:
            self.count(err.reason)
            return
        key = (seg.dst_port, src_ip, seg.src_port)
        conn = self.connections.get(key)
        if conn is not None:
            if conn.state != TIME_WAIT or not self._reincarnates(conn, seg):
                conn.on_segment(seg, now)
                self.collect(conn, now)
                return
            self._forget(conn)
        elif key in self.time_waits:
            reply = self.time_waits.receive(key, seg, now)
            if reply is not REINCARNATE:
                if reply is not None:
                    self._output.append((src_ip, reply.header(), b"", 0))
                return
        if self.steering is not None and not self.steers_here(seg.dst_port, seg.src_port):
            # Another worker's flow, which the packet sockets' filter should
            # have kept from us: counted, and never answered with a reset.
            self.count("tcp_rx_other_worker")
            return
        group = self.listeners.get(seg.dst_port)
        if group is not None:
            listener = group[0] if len(group) == 1 else group[self._spread(src_ip, seg.src_port) % len(group)]
            flags = seg.flags & (SYN | ACK | RST)
            if flags == SYN:
                self._passive_open(listener, src_ip, seg, now)
                return
            if (flags == ACK and listener.cookies_sent_at is not None
                    and now - listener.cookies_sent_at < COOKIE_MAX_AGE * COOKIE_PERIOD
                    and self._open_from_cookie(listener, src_ip, seg, now)):
                return
        self.count("tcp_no_socket")
        reply = reset_for(seg)
        if reply is not None:
            self._output.append((src_ip, reply.header(), b"", 0))

    def finish_predicted(self, conn: TcpConnection, seg: TcpSegment, payload_len: int, taken: int,
                         now: float) -> None:
        """A segment of `conn` that the fast path took (stack/fastpath.py)."""
        conn.on_predicted_segment(seg, payload_len, taken, now)
        self.collect(conn, now)

    def receive_icmp_error(self, error: FragmentationNeeded, now: float) -> None:
        """An ICMP "fragmentation needed" quoting a segment from our address."""
        conn = self.connections.get((error.src_port, error.dst_ip, error.dst_port))
        if conn is None:
            self.count("icmp_frag_needed_no_connection")
            return
        # RFC 5927 section 4.1: a router on the path saw the segment, so it
        # quotes a sequence number still in flight; a blind attacker rarely
        # guesses one (Linux counts these as OutOfWindowIcmps).
        snd_una = conn.snd_una
        if (error.seq - snd_una) & SEQ_MASK > (conn.snd_max - snd_una) & SEQ_MASK:
            self.count("icmp_frag_needed_out_of_window")
            return
        # MTU 0, from routers older than RFC 1191, falls under the floor as
        # well: Linux takes min_pmtu then rather than guess from RFC 1191's
        # plateau table, and so do we.
        mtu = max(error.mtu, MIN_PATH_MTU)
        if not conn.on_path_mtu(mtu, now):
            self.count("icmp_frag_needed_not_lower")
            return
        self.count("tcp_pmtu_lowered")
        self.collect(conn, now)

    @staticmethod
    def _reincarnates(conn: TcpConnection, seg: TcpSegment) -> bool:
        """A SYN above the old sequence space may reuse a TIME_WAIT 4-tuple
        (RFC 9293 3.6.1, as Linux does): clients recycle ports quickly."""
        return (conn.state == TIME_WAIT and seg.flags & (SYN | ACK | RST) == SYN
                and seq_gt(seg.seq, conn.rcv_nxt))

    def _passive_open(self, listener: Listener, src_ip: int, syn: TcpSegment, now: float) -> None:
        recent = listener.recent_cookies
        expired_before = max(min(now - COOKIE_RESERVE_SECONDS, self._read_until), now - COOKIE_STALL_SECONDS)
        while recent and recent[0] < expired_before:
            recent.popleft()
        if not listener.has_room(1 + len(recent)):
            self.count("tcp_syn_dropped_no_room")
            return
        if listener.pending >= listener.backlog:
            if self.config.syn_cookies:
                self._send_cookie(listener, src_ip, syn, now)
            else:
                self.count("tcp_syn_backlog_full")
            return
        if self._full():
            self.count("tcp_connection_limit")
            return
        accepted = listener.accept_buffers(src_ip, syn.src_port)
        if accepted is None:
            self.count("tcp_syn_dropped_no_room")
            return
        send_buf, recv_buf, owner = accepted
        secrets = self.secrets
        local_port, remote_port = syn.dst_port, syn.src_port
        conn = TcpConnection.accept(
            self.config, self.ip, local_port, src_ip, remote_port, syn, send_buf, recv_buf,
            secrets.isn(self.ip, local_port, src_ip, remote_port, now), now,
            secrets.timestamp_offset(self.ip, local_port, src_ip, remote_port))
        self._adopt(conn, listener, owner, now)

    def _adopt(self, conn: TcpConnection, listener: Listener, owner, now: float) -> None:
        conn.owner = owner
        conn.listener = listener
        conn.reuse_address = listener.reuse_address
        conn.challenge_acks = self.challenge_acks
        conn.recovery_counts = self.recovery_counts
        listener.pending += 1
        self._add_connection((conn.local_port, conn.remote_ip, conn.remote_port), conn)
        self.collect(conn, now)
        self.touched.add(conn)  # its owner meets it at the next publish, before any event

    # -- SYN cookies -------------------------------------------------------

    def _cookie_wscale(self) -> int:
        config = self.config
        return config.recv_wscale if config.recv_wscale is not None else COOKIE_WSCALE

    def _send_cookie(self, listener: Listener, src_ip: int, syn: TcpSegment, now: float) -> None:
        """Answer `syn` with a SYN-ACK whose ISN is a cookie, keeping nothing."""
        config = self.config
        local_port, remote_port = syn.dst_port, syn.src_port
        secrets = self.secrets
        cookie = secrets.syn_cookie(self.ip, local_port, src_ip, remote_port, syn.seq,
                                    mss_index_for(syn.mss), now)
        reply = TcpSegment(local_port, remote_port, cookie, seq_add(syn.seq, 1), SYN | ACK,
                           COOKIE_WINDOW, mss=config.mss)
        # Without timestamps there is nowhere to keep the other options:
        # such a connection goes without window scaling and SACK (as Linux).
        if config.timestamps and syn.timestamp is not None:
            options = _TS_NO_WSCALE
            if config.window_scaling and syn.wscale is not None:
                options = syn.wscale
                reply.wscale = self._cookie_wscale()
            if config.sack and syn.sack_permitted:
                options |= _TS_SACK
                reply.sack_permitted = True
            clock = (int(now * 1000) + secrets.timestamp_offset(
                self.ip, local_port, src_ip, remote_port)) & 0xFFFFFFFF
            tsval = (clock & ~_TS_OPTION_MASK) | options
            if tsval > clock:              # never ahead of the clock the connection will use
                tsval = (tsval - (1 << _TS_OPTION_BITS)) & 0xFFFFFFFF
            reply.timestamp = (tsval, syn.timestamp[0])
        listener.cookies_sent_at = now
        listener.recent_cookies.append(now)
        self.count("tcp_syncookies_sent")
        self._output.append((src_ip, reply.header(), b"", 0))

    def _open_from_cookie(self, listener: Listener, src_ip: int, ack: TcpSegment,
                          now: float) -> bool:
        """The handshake's ACK for a cookie SYN-ACK: rebuild the SYN from
        the cookie, then create the connection and its buffers.  False if
        the cookie is not valid (the caller answers with a RST)."""
        local_port, remote_port = ack.dst_port, ack.src_port
        peer_isn = seq_add(ack.seq, -1)
        iss = seq_add(ack.ack, -1)
        mss_index = self.secrets.check_syn_cookie(self.ip, local_port, src_ip, remote_port,
                                                  peer_isn, iss, now)
        if mss_index is None:
            self.count("tcp_syncookies_failed")
            return False
        if self._full():
            self.count("tcp_connection_limit")
            return True                    # valid: let the peer retry rather than reset
        accepted = listener.accept_buffers(src_ip, remote_port)
        if accepted is None:
            self.count("tcp_accept_refused")
            return True
        send_buf, recv_buf, owner = accepted
        syn = TcpSegment(remote_port, local_port, peer_isn, 0, SYN, ack.window,
                         mss=MSS_TABLE[mss_index])
        if ack.timestamp is not None and self.config.timestamps:
            options = ack.timestamp[1] & _TS_OPTION_MASK
            syn.timestamp = (ack.timestamp[0], 0)
            peer_wscale = options & _TS_NO_WSCALE
            if peer_wscale <= MAX_WSCALE:
                syn.wscale = peer_wscale
            syn.sack_permitted = bool(options & _TS_SACK)
        conn = TcpConnection.accept_cookie(
            self.config, self.ip, local_port, src_ip, remote_port, syn,
            self._cookie_wscale(), COOKIE_WINDOW, send_buf, recv_buf, iss, now,
            self.secrets.timestamp_offset(self.ip, local_port, src_ip, remote_port))
        self.count("tcp_syncookies_accepted")
        if listener.recent_cookies:
            listener.recent_cookies.popleft()      # one of them completed
        self._adopt(conn, listener, owner, now)
        conn.on_segment(ack, now)
        self.collect(conn, now)
        return True

    # -- bookkeeping after every call into a connection -------------------

    def collect(self, conn: TcpConnection, now: float) -> None:
        """Collects a connection's output, timer and events; the runtime
        calls it after driving a connection directly (send_ready, close...)."""
        out = conn.take_output()
        if out:
            remote = conn.remote_ip
            mss = conn.send_mss
            emit = self._output.append
            for seg in out:
                # The interface fills the checksum while framing (C, one
                # pass); a segment longer than the MSS is cut into MSS
                # pieces by the device (see TcpConfig.gso_max_size).
                payload = seg.payload
                emit((remote, seg.header(), payload, mss if len(payload) > mss else 0))
        conn.tcb.fp_predict = conn.predictable()
        if conn.state == TIME_WAIT:
            self._retire(conn, now)
        else:
            deadline = conn.deadline()
            if deadline is not None:
                scheduled = conn.timer_at
                if scheduled is None or deadline < scheduled:
                    self._schedule(conn, deadline)
        events = conn.events
        if events:
            if events & EV_ESTABLISHED and conn.listener is not None:
                conn.listener.pending -= 1
                conn.listener = None
                self.count("tcp_passive_opens")    # Linux's PassiveOpens: handshakes a listener completed
            if events & EV_CLOSED:
                self._forget(conn)
            self.touched.add(conn)

    def _retire(self, conn: TcpConnection, now: float) -> None:
        """A connection entering TIME_WAIT leaves the table for a compact
        record; its owner may still hold the object until it closes.  With
        the records at their limit it leaves without one, as Linux's does
        past tcp_max_tw_buckets: a late segment of it is answered by a RST."""
        key = (conn.local_port, conn.remote_ip, conn.remote_port)
        if self.connections.get(key) is conn:
            if not self.time_waits.add(conn, now):
                self.count("tcp_time_wait_overflow")
            self._forget(conn)

    def _add_connection(self, key: tuple[int, int, int], conn: TcpConnection) -> None:
        self.connections[key] = conn
        if self.flows is not None:
            self.flows.add(key, conn)
        in_use = self._ports_in_use.setdefault(key[0], [0, 0])
        in_use[0] += 1
        in_use[1] += not conn.reuse_address

    def _forget(self, conn: TcpConnection) -> None:
        conn.timer_at = None  # its heap entries are now stale
        key = (conn.local_port, conn.remote_ip, conn.remote_port)
        if self.connections.get(key) is conn:
            del self.connections[key]
            if self.flows is not None:
                self.flows.remove(key)
            in_use = self._ports_in_use[key[0]]
            in_use[0] -= 1
            in_use[1] -= not conn.reuse_address
            if not in_use[0]:
                del self._ports_in_use[key[0]]
        conn.tcb.fp_predict = 0
        if conn.listener is not None:
            conn.listener.pending -= 1
            conn.listener = None

    # Timers are lazy: a connection's heap entry (conn.timer_at) is only
    # replaced when its deadline moves earlier.  When it moves later, as it
    # does on most ACKs (the retransmission timer restarts), the entry stays
    # and, once due, is pushed again for the real deadline; so a busy
    # connection costs a heap push per timeout period, not per segment.
    # Superseded entries, and those of connections gone, are dropped when
    # they come due, or all at once when they outnumber the live ones:
    # short connections leave one behind each (the SYN-ACK's 1 s timeout),
    # and 64 clients closing 13k connections a second kept 14k in the heap.

    def _schedule(self, conn: TcpConnection, deadline: float) -> None:
        conn.timer_at = deadline
        self._timer_seq += 1
        timers = self._timers
        heapq.heappush(timers, (deadline, self._timer_seq, conn))
        if len(timers) > 2 * len(self.connections) + _STALE_TIMERS_KEPT:
            timers[:] = [entry for entry in timers if entry[2].timer_at == entry[0]]
            heapq.heapify(timers)

    def _reschedule_head(self) -> bool:
        """Pops the earliest entry if it is stale: superseded by an earlier
        one, or early for its connection's real deadline (pushed again
        then).  False if the head entry is due as it stands."""
        scheduled, _, conn = self._timers[0]
        if conn.timer_at != scheduled:
            heapq.heappop(self._timers)
            return True
        deadline = conn.deadline()
        if deadline is not None and deadline <= scheduled:
            return False
        heapq.heappop(self._timers)
        conn.timer_at = None
        if deadline is not None:
            self._schedule(conn, deadline)
        return True

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers and self._reschedule_head():
            pass
        deadline = timers[0][0] if timers else None
        time_wait = self.time_waits.next_deadline()
        if deadline is None or (time_wait is not None and time_wait < deadline):
            return time_wait
        return deadline

    def on_timers(self, now: float) -> None:
        self.time_waits.expire(now)
        timers = self._timers
        while timers and timers[0][0] <= now:
            if self._reschedule_head():
                continue
            _, _, conn = heapq.heappop(timers)
            conn.timer_at = None
            conn.on_timer(now)
            self.collect(conn, now)

    def take_output(self) -> list[tuple[int, bytes, object, int]]:
        out, self._output = self._output, []
        return out

    def count(self, reason: str, times: int = 1) -> None:
        self.counters[reason] = self.counters.get(reason, 0) + times
