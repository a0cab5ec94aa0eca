"""The stack thread's loop: shared-memory commands and packets in, segments
and readiness out.

One iteration: control messages -> commands -> a batch of received frames ->
timers -> one flush of transmitted frames -> readiness published once per
touched socket (mTCP's flow-level event aggregation) -> armed waiters woken
once.  When nothing is left to do the thread announces it is sleeping,
re-checks the command queue, and sleeps in poll() on the NIC, the wake
eventfd and the control socket until the next timer.

The region is a trust boundary: any process of the program can write any
value anywhere in it.  Addresses come from the stack's private geometry
(region.geom); every slot id, waiter id, command and accept-queue entry read
there is checked against the stack's own state before use; an impossible
ring index or queue resets that socket (`_reset_corrupt`), counted under
"shm" in the statistics and logged with the program's pid.
"""
import collections
import errno
import json
import os
import select
import socket
import sys
import time
import traceback

from mtcpshim._shm import ffi, lib
from mtcpshim.shmbuf import DETACHED, ShmRecvBuffer, ShmSendBuffer
from stack.node import Node
from stack.tcp import (EV_CLOSED, EV_ESTABLISHED, EV_PEER_FIN, EV_RESET, TcpState)

RX_BATCH = 64

_SLOT_STATE = {
    TcpState.SYN_SENT: lib.MTS_ST_CONNECTING,
    TcpState.SYN_RECEIVED: lib.MTS_ST_CONNECTING,
    TcpState.CLOSED: lib.MTS_ST_CLOSED,
}
_OPTIONS_OFFSET = ffi.offsetof("struct mts_slot", "opt_nodelay")
_ST_CONNECTED = lib.MTS_ST_CONNECTED  # every state not listed: past the handshake
_AFTER_OUR_FIN = (TcpState.FIN_WAIT_2, TcpState.TIME_WAIT, TcpState.CLOSED)
_CLOSED = TcpState.CLOSED
_EV_RDHUP = lib.MTS_EV_RDHUP
_SLOT_USED = lib.MTS_SLOT_USED
_ADDRESS_ARG_LIMIT = 1 << 48  # ip << 16 | port
_U64 = (1 << 64) - 1
_POLL_TROUBLE = select.POLLERR | select.POLLHUP | select.POLLNVAL
_MAX_KEEPALIVE_SECONDS, _MAX_KEEPCNT, _MAX_USER_TIMEOUT_MS = 32767, 127, (1 << 31) - 1
_MAX_SLEEP_MS = 60_000  # a far deadline is re-read after this long anyway
_IDLE_LOOK_MS = 1000


class _NotAllocated(Exception):
    """A command named a slot no process of the program allocated."""


class StackSocket:
    """What the stack knows of one slot."""

    __slots__ = ("slot_id", "slot", "port", "conn", "listener", "parent", "events", "app_closed",
                 "accept_head", "queued", "queued_on", "quarantined")

    def __init__(self, slot_id, slot):
        self.slot_id = slot_id
        self.slot = slot
        self.port = 0           # a port this socket reserved (bind, ephemeral)
        self.conn = None
        self.listener = None
        self.parent = None      # the listening StackSocket of a connection in its handshake
        self.events = 0         # MTS_EV_* published so far
        self.app_closed = False
        # A listener's accept queue, as the stack knows it: its own head, and
        # the live connections it queued (accepted since, or not).
        self.accept_head = 0
        self.queued = set()
        self.queued_on = None   # the listener whose `queued` holds this connection
        self.quarantined = False  # reset for corruption: its rings are never read again


class Runtime:
    def __init__(self, region, packet_io, node: Node, ctl_fd: int, wake_fd: int,
                 pcap=None, spin_seconds: float = 0.0, stats_listener: socket.socket | None = None,
                 launcher_fd: int | None = None):
        self.region = region
        self.header = region.header
        self.geom = geom = region.geom
        self._cmd_pos = ffi.new("uint64_t *")   # the queue's dequeue position is ours alone
        self._owned = bytearray(geom.nslots)    # slots the stack knows live, whatever in_use says
        self._owned_view = ffi.from_buffer(self._owned)
        self._corrupt: dict[StackSocket, str] = {}
        self.shm_counters = collections.Counter()
        self.program_pid = None                 # told by the launcher, for log lines
        self._log_second, self._log_lines, self._log_suppressed = 0, 0, 0
        self.io = packet_io
        self.node = node
        self.iface, self.host = node.iface, node.host
        self.pcap = pcap
        self.spin_seconds = spin_seconds
        self.ctl = socket.socket(fileno=ctl_fd)
        self.ctl.setblocking(False)
        self.wake_fd = wake_fd
        self.sockets: dict[int, StackSocket] = {}
        self.waiters: dict[int, int] = {}  # waiter id -> its eventfd
        self.stopping = False
        self.counters = {"loops": 0, "sleeps": 0, "commands": 0, "waiter_wakeups": 0}
        self.stats_listener = stats_listener
        self._next_housekeeping = 0.0
        self._cmd = ffi.new("struct mts_cmd *")
        self._signal_r, signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signal_w = signal_w
        self._poller = select.poll()
        self._io_fd = packet_io.fileno()
        self.fault = None  # why the stack stopped on its own, if it did
        self._truncation_reported = False
        for fd in (packet_io.fileno(), wake_fd, ctl_fd, self._signal_r):
            self._poller.register(fd, select.POLLIN)
        self.launcher_fd = launcher_fd
        if launcher_fd is not None:
            os.set_blocking(launcher_fd, False)
            self._poller.register(launcher_fd, select.POLLIN)
        if stats_listener is not None:
            stats_listener.setblocking(False)
            self._poller.register(stats_listener.fileno(), select.POLLIN)
        node.iface.announce()  # neighbours may remember another MAC for our address

    @property
    def signal_fd(self) -> int:
        """Write end for signal.set_wakeup_fd: a signal ends the sleep."""
        return self._signal_w

    # -- the loop ----------------------------------------------------------

    def run(self, until=None) -> None:
        """Serves until stopped (SIGTERM) or until `until()` turns true."""
        clock = time.monotonic
        idle_since = None
        while not self.stopping and not (until is not None and until()):
            now = clock()
            if self.step(now):
                idle_since = None
                continue
            if idle_since is None:
                idle_since = now
            if now - idle_since < self.spin_seconds:
                continue
            self._sleep(clock(), max_ms=-1 if until is None else 50)
            idle_since = None

    def step(self, now: float) -> bool:
        """One iteration of the loop; True if there was input to handle."""
        self.counters["loops"] += 1
        busy = self._control() | self._commands(now) | self._receive(now)
        self.node.on_timers(now)
        if now >= self._next_housekeeping:
            self._housekeeping(now)
        self._output(now)
        if self._corrupt:  # found while publishing: the resets go out now
            self._output(now)
        return busy

    HOUSEKEEPING_INTERVAL = 0.1  # seconds between looks at the stats socket, the launcher, lost commands

    def _housekeeping(self, now: float) -> None:
        self._next_housekeeping = now + self.HOUSEKEEPING_INTERVAL
        self._answer_stats()
        self._hear_launcher()
        self._recover_lost_tx(now)
        if not self._truncation_reported:
            self._report_truncation()

    def _report_truncation(self) -> None:
        """Frames too large for the packet I/O's slots are lost: say so once
        (`mtcpshim stat` counts every one)."""
        if hasattr(self.io, "counters") and self.io.counters().get("rx_truncated"):
            self._truncation_reported = True
            _log("received frames larger than the packet ring's slots are dropped (rx_truncated): "
                 "lower the sender's gso_max_size or the interface's GRO size")

    def _output(self, now: float) -> None:
        if self._corrupt:
            self._reset_corrupt(now)
        self._transmit(now)
        self._publish()

    def close_all(self, deadline: float) -> None:
        """The program is gone: close what it left open, as the kernel does
        at exit, and serve until those connections finish or `deadline`."""
        self.header.stack_state = lib.MTS_STACK_STOPPED
        now = time.monotonic()
        for sock in list(self.sockets.values()):
            if not sock.app_closed:
                self._close(sock.slot_id, 0, now)
        self._publish()
        self.stopping = False
        finished = (TcpState.TIME_WAIT, TcpState.CLOSED)
        self.run(until=lambda: time.monotonic() > deadline or all(
            conn.state in finished for conn in self.host.connections.values()))

    def _sleep(self, now: float, max_ms: int) -> None:
        if not lib.mts_stack_try_sleep(self.geom, self._cmd_pos[0]):
            return
        deadline = self._next_deadline()
        timeout = -1 if deadline is None else min(max(0, int((deadline - now) * 1000) + 1), _MAX_SLEEP_MS)
        if self.sockets and (timeout < 0 or timeout > _IDLE_LOOK_MS):
            timeout = _IDLE_LOOK_MS  # housekeeping finds lost commands even when all is quiet
        if max_ms >= 0 and (timeout < 0 or timeout > max_ms):
            timeout = max_ms
        self.counters["sleeps"] += 1
        for fd, events in self._poller.poll(timeout):
            if fd == self._io_fd and events & _POLL_TROUBLE:
                self._device_trouble()
            elif fd == self.wake_fd:
                _drain_eventfd(fd)
            elif fd == self._signal_r:
                os.read(fd, 64)
            elif self.stats_listener is not None and fd == self.stats_listener.fileno():
                self._next_housekeeping = 0.0
            elif fd == self.launcher_fd:
                self._hear_launcher()
        lib.mts_stack_awake(self.geom)

    def _next_deadline(self):
        io_deadline = getattr(self.io, "deadline", None)  # a fault injector's held frames
        deadlines = [d for d in (self.node.poll_at(), io_deadline() if io_deadline else None)
                     if d is not None]
        return min(deadlines) if deadlines else None

    def _device_trouble(self) -> None:
        reason = self.io.device_error()
        if reason is not None:
            _log(f"{reason}: stopping")
            self.fault = reason
            self.stopping = True

    # -- control socket: waiter registration ------------------------------

    def _control(self) -> bool:
        busy = False
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.ctl, ffi.sizeof("struct mts_ctl_msg"), 4)
            except BlockingIOError:
                return busy
            busy = True
            msg = ffi.from_buffer("struct mts_ctl_msg *", data) if len(data) == ffi.sizeof(
                "struct mts_ctl_msg") else None
            waiter = lib.mts_waiter_at(self.geom, msg.waiter) if msg is not None else ffi.NULL
            if msg is None or msg.op != lib.MTS_CTL_REGISTER_WAITER or len(fds) != 1 or waiter == ffi.NULL:
                self.shm_counters["ctl_bad"] += 1
                for fd in fds:
                    os.close(fd)
                continue
            old = self.waiters.pop(msg.waiter, None)
            if old is not None:
                os.close(old)
            self.waiters[msg.waiter] = fds[0]
            waiter.registered = 1
            lib.mts_futex_wake(ffi.addressof(waiter, "registered"))

    # -- commands from the applications -----------------------------------

    def _commands(self, now: float) -> bool:
        cmd, geom, pos, handlers, pop = self._cmd, self.geom, self._cmd_pos, self._HANDLERS, lib.mts_cmd_pop
        nslots = geom.nslots
        popped = 0
        # At most one queue's worth per loop: a program that keeps refilling
        # cells cannot starve the network.
        while popped < geom.cmd_capacity and pop(geom, pos, cmd):
            popped += 1
            op, slot_id = cmd.op, cmd.slot
            handler = handlers.get(op)
            if handler is None or slot_id >= nslots and op != lib.MTS_OP_WAITER_FREE:
                self.shm_counters["cmd_bad"] += 1
                continue
            try:
                handler(self, slot_id, cmd.arg, now)
            except _NotAllocated:
                self.shm_counters["cmd_bad"] += 1
            except Exception:  # a bug reached through program-controlled input: contain it
                self.shm_counters["handler_faults"] += 1
                _log(f"command {op} on slot {slot_id} failed:\n{traceback.format_exc()}")
                sock = self.sockets.get(slot_id) if op != lib.MTS_OP_WAITER_FREE else None
                if sock is not None:
                    self._corrupted(sock, f"command {op} failed")
        if popped:
            self.counters["commands"] += popped
        return popped > 0

    def _socket(self, slot_id: int) -> StackSocket:
        """The stack's socket for a slot; a slot the stack does not know yet
        must be one a process of the program allocated."""
        sock = self.sockets.get(slot_id)
        if sock is None:
            slot = lib.mts_slot_at(self.geom, slot_id)
            if slot.in_use != _SLOT_USED:
                raise _NotAllocated(slot_id)
            sock = self.sockets[slot_id] = StackSocket(slot_id, slot)
            self._owned[slot_id] = 1
        return sock

    def _recover_lost_tx(self, now: float) -> None:
        """A program that overwrote its own command cells can lose an
        MTS_OP_TX; its tx_pending flag then stays set and it never sends
        another.  Serve such flags as if the command had come."""
        for sock in self.sockets.values():
            if sock.conn is not None and not sock.quarantined and sock.slot.tx_pending:
                self._tx(sock.slot_id, 0, now)

    def _buffers(self, sock: StackSocket):
        """The TCP core's view of the socket's rings."""
        report = lambda reason: self._corrupted(sock, reason)  # noqa: E731
        return ShmSendBuffer(self.geom, sock.slot_id, report), ShmRecvBuffer(self.geom, sock.slot_id, report)

    def _bind(self, slot_id, arg, now):
        sock = self._socket(slot_id)
        ip, port = arg >> 16, arg & 0xFFFF
        if arg >= _ADDRESS_ARG_LIMIT:
            return lib.mts_complete(sock.slot, -errno.EINVAL)
        if ip not in (0, self.host.ip):
            return lib.mts_complete(sock.slot, -errno.EADDRNOTAVAIL)
        if sock.port or sock.conn is not None:
            return lib.mts_complete(sock.slot, -errno.EINVAL)
        try:
            sock.port = self.host.bind(port)
        except OSError as err:
            return lib.mts_complete(sock.slot, -err.errno)
        sock.slot.local_ip, sock.slot.local_port = ip, sock.port
        lib.mts_publish(sock.slot, lib.MTS_ST_BOUND, 0, 0)
        lib.mts_complete(sock.slot, 0)

    def _listen(self, slot_id, arg, now):
        sock = self._socket(slot_id)
        if not sock.port or sock.conn is not None:
            return lib.mts_complete(sock.slot, -errno.EINVAL)
        backlog = min(max(int(arg), 1), self.geom.accept_capacity)
        # Each half-open connection holds a slot: past a quarter of them, SYNs
        # get cookies, so a flood cannot take every slot (and every listener).
        syn_backlog = min(backlog, self.geom.nslots // 4)
        if sock.listener is None:
            sock.listener = self.host.listen(sock.port, syn_backlog,
                                             lambda ip, port: self._accept_slot(sock, ip, port))
        sock.listener.backlog = syn_backlog
        sock.slot.backlog = backlog
        lib.mts_publish(sock.slot, lib.MTS_ST_LISTENING, 0, 0)
        lib.mts_complete(sock.slot, 0)

    def _accept_slot(self, listening: StackSocket, remote_ip: int, remote_port: int):
        """A SYN arrived for `listening`: a slot for the new connection."""
        child_id = lib.mts_slot_alloc(self.geom, self._owned_view)
        if child_id < 0:
            return None
        child = self._socket(child_id)
        child.parent = listening
        slot = child.slot
        slot.local_ip, slot.local_port = self.host.ip, listening.port
        slot.remote_ip, slot.remote_port = remote_ip, remote_port
        # Accepted sockets inherit the listener's options, as in the kernel.
        options_size = ffi.offsetof("struct mts_slot", "pad1") - _OPTIONS_OFFSET
        ffi.memmove(ffi.cast("char *", slot) + _OPTIONS_OFFSET,
                    ffi.cast("char *", listening.slot) + _OPTIONS_OFFSET, options_size)
        return (*self._buffers(child), child)

    def _connect(self, slot_id, arg, now):
        sock = self._socket(slot_id)
        if sock.conn is not None:
            established = sock.events & lib.MTS_EV_CONNECTED
            return lib.mts_complete(sock.slot, -(errno.EISCONN if established else errno.EALREADY))
        if sock.listener is not None:
            return lib.mts_complete(sock.slot, -errno.EISCONN)
        ip, port = arg >> 16, arg & 0xFFFF
        if arg >= _ADDRESS_ARG_LIMIT:
            return lib.mts_complete(sock.slot, -errno.EINVAL)
        if not self.iface.routes(ip):
            return lib.mts_complete(sock.slot, -errno.ENETUNREACH)
        buffers = self._buffers(sock)
        try:
            if sock.port:
                conn = self.host.connect(sock.port, ip, port, *buffers, sock, now)
            else:
                conn = self.host.connect_ephemeral(ip, port, *buffers, sock, now)
                sock.port = conn.local_port
        except OSError as err:
            return lib.mts_complete(sock.slot, -err.errno)
        sock.conn = conn
        slot = sock.slot
        slot.local_ip, slot.local_port = self.host.ip, conn.local_port
        slot.remote_ip, slot.remote_port = ip, port
        self._apply_options(sock)
        lib.mts_publish(slot, lib.MTS_ST_CONNECTING, 0, 0)
        lib.mts_complete(slot, 0)

    def _tx(self, slot_id, arg, now):
        sock = self.sockets.get(slot_id)
        if sock is not None and (conn := sock.conn) is not None:
            lib.mts_tx_clear_pending(sock.slot)  # before the core looks at the ring
            conn.send_ready(now)
            self.host.collect(conn, now)

    def _rxwin(self, slot_id, arg, now):
        sock = self.sockets.get(slot_id)
        if sock is not None and sock.conn is not None:
            sock.conn.recv_consumed(now)
            self.host.collect(sock.conn, now)

    def _shutdown(self, slot_id, arg, now):
        sock = self.sockets.get(slot_id)
        if sock is not None and sock.conn is not None and arg in (socket.SHUT_WR, socket.SHUT_RDWR):
            sock.conn.shutdown_write(now)
            self.host.collect(sock.conn, now)

    def _close(self, slot_id, arg, now):
        sock = self.sockets.get(slot_id)
        if sock is None:  # never reached the stack: nothing but the slot
            return lib.mts_slot_free(self.geom, slot_id)
        if sock.app_closed:
            return
        sock.app_closed = True
        if sock.listener is not None:
            self._stop_listening(sock, now)
            # What the program did not accept is ours to abort; each entry
            # must be one we queued, and we stop at our own head.
            while (child_id := lib.mts_accept_take(self.geom, slot_id, sock.accept_head)) != -1:
                child = self.sockets.get(child_id)
                if child_id < 0 or child is None or child not in sock.queued:
                    self.shm_counters["accept_entry_bad"] += 1
                    self._abort_unclaimed(sock, now)
                    break
                self._abort_unaccepted(child, now)
        elif sock.conn is not None:
            if arg:
                sock.conn.abort(now)
            else:
                sock.conn.close(now)
            self.host.collect(sock.conn, now)
        self._maybe_release(sock)

    def _stop_listening(self, sock: StackSocket, now):
        self.host.unlisten(sock.port)
        sock.listener = None
        for child in [s for s in self.sockets.values() if s.parent is sock]:
            self._abort_unaccepted(child, now)

    def _abort_unclaimed(self, listener: StackSocket, now):
        """The accept queue cannot be believed: what the listener queued and
        no process of the program holds a descriptor for goes."""
        for child in [c for c in listener.queued if c.slot is not None and not c.slot.refcnt]:
            self._abort_unaccepted(child, now)

    def _abort_unaccepted(self, child: StackSocket, now):
        if child.queued_on is not None:
            child.queued_on.queued.discard(child)
            child.queued_on = None
        child.app_closed = True
        child.parent = None
        if child.conn is not None:
            child.conn.abort(now)
            self.host.collect(child.conn, now)
        self._maybe_release(child)

    def _setopt(self, slot_id, arg, now):
        sock = self.sockets.get(slot_id)
        if sock is not None and sock.conn is not None:
            self._apply_options(sock)
            if arg in (lib.MTS_OPT_NODELAY, lib.MTS_OPT_CORK):
                sock.conn.send_ready(now)  # uncorking may release a small segment
            self.host.collect(sock.conn, now)

    def _apply_options(self, sock: StackSocket):
        slot, conn = sock.slot, sock.conn
        conn.nodelay = bool(slot.opt_nodelay) and not slot.opt_cork
        conn.keepalive = bool(slot.opt_keepalive)
        # The kernel's own bounds (MAX_TCP_KEEPIDLE/KEEPINTVL/KEEPCNT, an int
        # of milliseconds): the interposer checks them, a program may not.
        if slot.opt_keepidle:
            conn.keepidle = float(min(slot.opt_keepidle, _MAX_KEEPALIVE_SECONDS))
        if slot.opt_keepintvl:
            conn.keepintvl = float(min(slot.opt_keepintvl, _MAX_KEEPALIVE_SECONDS))
        if slot.opt_keepcnt:
            conn.keepcnt = min(slot.opt_keepcnt, _MAX_KEEPCNT)
        conn.user_timeout = min(slot.opt_user_timeout_ms, _MAX_USER_TIMEOUT_MS) / 1000.0
        congestion = ffi.string(slot.opt_congestion).decode(errors="replace")
        if congestion and congestion != conn.congestion:
            try:
                conn.congestion = congestion
            except ValueError:  # the interposer checked the name: a drift between the two lists
                self.host.count("setopt_unknown_congestion")

    def _waiter_free(self, waiter_id, arg, now):
        fd = self.waiters.pop(waiter_id, None)
        if fd is not None:
            os.close(fd)
            lib.mts_waiter_free(self.geom, waiter_id)

    _HANDLERS = {
        lib.MTS_OP_BIND: _bind,
        lib.MTS_OP_LISTEN: _listen,
        lib.MTS_OP_CONNECT: _connect,
        lib.MTS_OP_TX: _tx,
        lib.MTS_OP_RXWIN: _rxwin,
        lib.MTS_OP_SHUTDOWN: _shutdown,
        lib.MTS_OP_CLOSE: _close,
        lib.MTS_OP_SETOPT: _setopt,
        lib.MTS_OP_WAITER_FREE: _waiter_free,
    }

    # -- packets ------------------------------------------------------------

    def _receive(self, now: float) -> bool:
        frames = self.io.recv_batch(RX_BATCH)
        if not frames:
            return False
        if self.pcap is not None:
            stamp = time.time()
            for frame in frames:
                self.pcap.write(frame, stamp)
        self.node.ingest(frames, now)
        return True

    def _transmit(self, now: float) -> None:
        frames = self.node.egress(now)
        if frames:
            if self.pcap is not None:
                stamp = time.time()
                for frame in frames:
                    self.pcap.write(frame, stamp)
            self.io.send_batch(frames)

    # -- statistics -----------------------------------------------------------

    def _answer_stats(self) -> None:
        """Serves `mtcpshim stat`: one JSON snapshot per connection."""
        if self.stats_listener is None:
            return
        while True:
            try:
                client, _ = self.stats_listener.accept()
            except BlockingIOError:
                return
            with client:
                client.settimeout(1.0)
                try:
                    client.sendall(json.dumps(self.stats()).encode())
                except OSError:
                    pass

    def stats(self) -> dict:
        states = collections.Counter(conn.state.name for conn in self.host.connections.values())
        if self.host.time_waits:
            states["TIME_WAIT"] += len(self.host.time_waits)
        io_counters = self.io.counters() if hasattr(self.io, "counters") else {}
        return {
            "pid": os.getpid(),
            "runtime": dict(self.counters),
            "interface": dict(self.iface.counters),
            "packet_io": dict(io_counters),
            "tcp": dict(self.host.counters),
            "connections": dict(states),
            "shm": dict(self.shm_counters),
            "slots_in_use": len(self.sockets),
            "waiters": len(self.waiters),
        }

    # -- readiness ----------------------------------------------------------

    def _publish(self) -> None:
        if not self.host.touched:
            return
        touched = list(self.host.touched)
        self.host.touched.clear()  # publishing may touch more: those go next loop
        for conn in touched:
            self._publish_connection(conn.owner, conn)
        for waiter_id, fd in self.waiters.items():
            if lib.mts_waiter_disarm(lib.mts_waiter_at(self.geom, waiter_id)):
                self.counters["waiter_wakeups"] += 1
                os.eventfd_write(fd, 1)

    def _publish_connection(self, sock: StackSocket, conn) -> None:
        happened = conn.events
        conn.events = 0
        if sock.slot is None:
            return  # released: the application is gone, the connection finishes alone
        if sock.slot.in_use != _SLOT_USED:
            # Marked free behind our back: take it back so that nobody else
            # allocates it, and reset the connection it carried.
            sock.slot.in_use = _SLOT_USED
            self._corrupted(sock, "slot marked free while in use")
        sock.conn = conn  # a passive connection meets its socket here
        so_error = 0
        if happened & EV_ESTABLISHED:
            sock.events |= lib.MTS_EV_CONNECTED
        if happened & EV_PEER_FIN:
            sock.events |= lib.MTS_EV_RDHUP
        if happened & EV_RESET:
            so_error = conn.error or errno.ECONNRESET
            sock.events |= lib.MTS_EV_HUP
        state = conn.state
        if state == _CLOSED or (sock.events & _EV_RDHUP and state in _AFTER_OUR_FIN):
            sock.events |= lib.MTS_EV_HUP
        lib.mts_publish(sock.slot, _SLOT_STATE.get(state, _ST_CONNECTED), sock.events, so_error)
        if sock.parent is not None:
            if happened & EV_CLOSED:
                sock.parent = None  # died during the handshake: nobody will accept it
                sock.app_closed = True
            elif happened & EV_ESTABLISHED:
                # Only now that its state is published may anyone accept it.
                self._queue_for_accept(sock)
        if sock.app_closed:
            self._maybe_release(sock)

    def _queue_for_accept(self, child: StackSocket) -> None:
        parent = child.parent
        child.parent = None
        pushed = parent.listener is not None and self._accept_push(parent, child)
        if not pushed:
            self.host.count("tcp_listener_closed" if parent.listener is None else "tcp_accept_queue_full")
            child.app_closed = True
            now = time.monotonic()
            child.conn.abort(now)
            self.host.collect(child.conn, now)
            return
        self._apply_options(child)  # inherited from the listener
        lib.mts_publish(parent.slot, lib.MTS_ST_LISTENING, 0, 0)

    def _accept_push(self, listener: StackSocket, child: StackSocket) -> bool:
        """Queues `child` at the stack's own head; False if the queue is full.
        The program's tail must lie within capacity below that head."""
        head = listener.accept_head
        waiting = (head - lib.mts_index_load(ffi.addressof(listener.slot.rx, "tail"))) & _U64
        if waiting > self.geom.accept_capacity:
            self._corrupted(listener, "accept queue tail impossible")
            return False
        if waiting == self.geom.accept_capacity:
            return False
        lib.mts_accept_put(self.geom, listener.slot_id, head, child.slot_id)
        listener.accept_head = (head + 1) & _U64
        lib.mts_index_store(ffi.addressof(listener.slot.rx, "head"), listener.accept_head)
        listener.queued.add(child)
        child.queued_on = listener
        return True

    def _maybe_release(self, sock: StackSocket) -> None:
        """Frees the slot of a socket the application has closed once the
        connection no longer needs its rings (everything sent was acked)."""
        if not sock.app_closed or sock.slot is None:
            return
        conn = sock.conn
        if conn is not None and conn.state not in _AFTER_OUR_FIN:
            return
        if conn is not None:
            conn.send_buf = conn.recv_buf = DETACHED
            sock.conn = None  # no reference cycle: both go as soon as the host forgets the connection
        if sock.port:
            self.host.unbind(sock.port)
        if sock.queued_on is not None:
            sock.queued_on.queued.discard(sock)
            sock.queued_on = None
        self._corrupt.pop(sock, None)
        del self.sockets[sock.slot_id]
        self._owned[sock.slot_id] = 0
        lib.mts_slot_free(self.geom, sock.slot_id)
        sock.slot = None

    # -- containment ----------------------------------------------------------

    def _corrupted(self, sock: StackSocket, reason: str) -> None:
        """The program wrote something impossible for `sock`: reset it at the
        end of this stage (never from inside the TCP core's call)."""
        if sock.slot is not None and not sock.quarantined:
            self._corrupt.setdefault(sock, reason)

    def _reset_corrupt(self, now: float) -> None:
        corrupt, self._corrupt = self._corrupt, {}
        for sock, reason in corrupt.items():
            if sock.slot is None:
                continue
            sock.quarantined = True
            self.shm_counters["sockets_reset"] += 1
            slot = sock.slot
            self._log_limited(now, f"the program{'' if self.program_pid is None else f' (pid {self.program_pid})'} "
                              f"corrupted socket {sock.slot_id} ({_endpoints(slot)}): {reason}; socket reset")
            if sock.listener is not None:
                self._stop_listening(sock, now)
                self._abort_unclaimed(sock, now)
            conn = sock.conn
            if conn is not None:
                conn.send_buf = conn.recv_buf = DETACHED  # its rings are never read again
                conn.abort(now)
                self.host.collect(conn, now)
            sock.events |= lib.MTS_EV_HUP
            lib.mts_publish(slot, lib.MTS_ST_CLOSED, sock.events, errno.ECONNRESET)
            self._maybe_release(sock)

    LOG_LINES_PER_SECOND = 10  # a program corrupting in a loop must not flood the log

    def _log_limited(self, now: float, message: str) -> None:
        second = int(now)
        if second != self._log_second:
            if self._log_suppressed:
                _log(f"({self._log_suppressed} more such lines suppressed)")
            self._log_second, self._log_lines, self._log_suppressed = second, 0, 0
        if self._log_lines < self.LOG_LINES_PER_SECOND:
            self._log_lines += 1
            _log(message)
        else:
            self._log_suppressed += 1

    # -- the launcher ---------------------------------------------------------

    def _hear_launcher(self) -> None:
        """The launcher says `program PID` once; its end of the pipe closing
        means it is gone, and so is the reason to serve."""
        if self.launcher_fd is None:
            return
        try:
            data = os.read(self.launcher_fd, 256)
        except BlockingIOError:
            return
        for line in data.decode(errors="replace").splitlines():
            word, _, pid = line.partition(" ")
            if word == "program" and pid.isdigit():
                self.program_pid = int(pid)
        if not data:
            _log("the launcher is gone: stopping")
            self._poller.unregister(self.launcher_fd)
            os.close(self.launcher_fd)
            self.launcher_fd = None
            self.stopping = True


def _endpoints(slot) -> str:
    def address(ip, port):
        return f"{ip >> 24}.{ip >> 16 & 255}.{ip >> 8 & 255}.{ip & 255}:{port}"
    local = address(slot.local_ip, slot.local_port)
    return local if not slot.remote_port else f"{local} <-> {address(slot.remote_ip, slot.remote_port)}"


def _log(message: str) -> None:
    print(f"mtcpshim stack: {message}", file=sys.stderr, flush=True)


def _drain_eventfd(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
