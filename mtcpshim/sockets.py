"""The stack's side of every socket: what each shared slot is (StackSocket),
the commands the program queues (bind, listen, connect, data ready, window
opened, shutdown, close, options, files to send from), readiness published back, accept
queues, and containment of what the program writes that cannot be.

Everything read from the region is untrusted: slot ids, queue entries and
ring indices are checked against the stack's own state; an impossible one
resets that socket only (`reset_corrupt`), counted in `shm_counters` and
logged with the program's pid.

With several stack workers (one per core) each table serves its worker's
range of slots and its own command queue.  A listener is every worker's:
the others each open a sibling in a slot of their own, whose accept queue
takes the connections they receive (`_listen_share`), and close it when the
listener's owner says the listener closed (`_close_share`).
"""
from __future__ import annotations

import collections
import errno
import os
import socket
import time
import traceback

from mtcpshim._shm import ffi, lib
from mtcpshim.shmbuf import DETACHED, ShmRecvBuffer, ShmSendBuffer, SpanFile, index_add, index_distance
from mtcpshim.stacklog import RateLimitedLog, log
from mtcpshim.stack.node import Node
from mtcpshim.stack.tcp import EV_CLOSED, EV_ESTABLISHED, EV_PEER_FIN, EV_RESET, TcpConnection, TcpState

_SLOT_STATE = {
    TcpState.SYN_SENT: lib.MTS_ST_CONNECTING,
    TcpState.SYN_RECEIVED: lib.MTS_ST_CONNECTING,
    TcpState.CLOSED: lib.MTS_ST_CLOSED,
}
_OPTIONS_OFFSET = ffi.offsetof("struct mts_slot", "opt_nodelay")
_ST_CONNECTED = lib.MTS_ST_CONNECTED  # every state not listed: past the handshake
_AFTER_OUR_FIN = (TcpState.FIN_WAIT_2, TcpState.TIME_WAIT, TcpState.CLOSED)
_CLOSED = TcpState.CLOSED
_SENDING_DATA = (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT)
_EV_RDHUP = lib.MTS_EV_RDHUP
_SLOT_USED = lib.MTS_SLOT_USED
_OP_WAITER_FREE = lib.MTS_OP_WAITER_FREE
# Commands a worker runs for a slot of another worker's: a listener's
# sharing and its end.
_SHARE_OPS = (lib.MTS_OP_LISTEN, lib.MTS_OP_CLOSE)
# struct mts_tcp_info, the ABI's one list of TCP_INFO figures.
_TCP_INFO_FIELDS = tuple(name for name, _ in ffi.typeof("struct mts_tcp_info").fields)
_TAKEN_OVER = "its slot was allocated again while the stack held it"  # the generation moved on
_ADDRESS_ARG_LIMIT = 1 << 48  # ip << 16 | port
RELEASE_RINGS_AFTER = 64 << 10  # bytes through a slot's busier ring that make its pages worth a syscall
_MAX_KEEPALIVE_SECONDS, _MAX_KEEPCNT, _MAX_USER_TIMEOUT_MS = 32767, 127, (1 << 31) - 1
_NO_ROOM_EPISODE_GAP = 10.0  # seconds with room between two logged episodes of unanswered SYNs


class _NotAllocated(Exception):
    """A command named a slot no process of the program allocated."""


class StackSocket:
    """What the stack knows of one slot."""

    __slots__ = ("slot_id", "slot", "generation", "port", "reuse_port", "conn", "handshake", "listener", "parent",
                 "events", "app_closed", "share_of",
                 "accept_head", "accept_backlog", "queued", "queued_on", "quarantined")

    def __init__(self, slot_id, slot):
        self.slot_id = slot_id
        self.slot = slot
        self.generation = slot.generation  # the stack's own copy: a new one means the slot changed hands
        self.port = 0           # a port this socket reserved (bind, ephemeral)
        self.reuse_port = False  # ... sharing it with others (SO_REUSEPORT at bind)
        self.conn = None
        self.handshake = None   # an accepted socket's connection key, until it meets its connection
        self.listener = None
        self.parent = None      # the listening StackSocket of a connection in its handshake
        self.events = 0         # MTS_EV_* published so far
        self.app_closed = False
        # A listener's accept queue, as the stack knows it: its own head, and
        # the live connections it queued (accepted since, or not).
        self.accept_head = 0
        self.accept_backlog = 0  # listen()'s backlog: connections its accept queue may hold
        self.queued = set()
        self.queued_on = None   # the listener whose `queued` holds this connection
        self.quarantined = False  # reset for corruption: its rings are never read again
        self.share_of = None    # a sibling listener: (the listener's slot id, its generation then)


class SocketTable:
    """The stack's sockets by slot id (`slot_id in table`, `table[slot_id]`,
    `len(table)`, iteration over slot ids)."""

    def __init__(self, geom, node: Node, waiters, shm_counters: collections.Counter, release_rings=None,
                 gathers: bool = False, worker: int = 0, tell_workers=None):
        self.geom = geom
        # This worker's slots: commands for others' are refused, but for
        # sharing a listener (_SHARE_OPS).  tell_workers(op, slot_id,
        # generation, arg) queues a command to every other worker.
        self.worker = worker
        self._first_slot = worker * geom.slots_per_worker
        self._tell_workers = tell_workers
        self._shares: dict[int, StackSocket] = {}  # a listener of another worker's -> our sibling of it
        # Whether segments longer than the MSS reach the kernel by a gather
        # send, unread in user space: then their payload may be views, of a
        # ring where it wraps and of a file mapping (sendfile spans, which
        # are taken only then: shmbuf.SpanFile).
        self.gathers = gathers
        self._release_rings = release_rings     # Region.release_rings, for slots that carried data
        self.host, self.iface = node.host, node.iface
        self.waiters = waiters
        self._sockets: dict[int, StackSocket] = {}
        self._cmd = ffi.new("struct mts_cmd *")
        self._cmd_pos = ffi.new("uint64_t *")   # the queue's dequeue position is ours alone
        self._changes_logged = ffi.new("uint64_t *")  # the change log's head, ours alone (never read back)
        # The waiters interested in a slot published since the last wakeups
        # (each slot's waiter_interest, ORed): only they are woken.
        self._interest = ffi.new("uint64_t[]", lib.MTS_INTEREST_BITS // 64)
        self._owned = bytearray(geom.nslots)    # slots the stack knows live, whatever in_use says
        self._owned_view = ffi.from_buffer(self._owned)
        self._corrupt: dict[StackSocket, str] = {}
        self.shm_counters = shm_counters
        self.commands = 0                       # commands run, for the statistics
        self.rings_released = 0                 # freed slots whose ring pages went back to the kernel
        self.program_pid = None                 # told by the launcher, for log lines
        self._log_limited = RateLimitedLog()    # a program corrupting in a loop must not flood the log
        self._no_room_at = float("-inf")        # when a SYN last went unanswered for want of room
        # Connections the program wrote to during this batch of commands:
        # they send once the batch is done, so that a write followed by
        # shutdown or close leaves as one segment carrying data and FIN.
        self._writes_pending: dict[TcpConnection, None] = {}

    def __contains__(self, slot_id) -> bool:
        return slot_id in self._sockets

    def __getitem__(self, slot_id) -> StackSocket:
        return self._sockets[slot_id]

    def __iter__(self):
        return iter(self._sockets)

    def __len__(self) -> int:
        return len(self._sockets)

    def census(self) -> dict[str, int]:
        """Sockets by who holds them and their connection's state: a slot
        still in use after its program is done shows here as held by the
        program (it never closed) or by the stack (its connection has not
        finished)."""
        counts: collections.Counter = collections.Counter()
        for sock in self._sockets.values():
            holder = "stack" if sock.app_closed else "program"
            if sock.listener is not None:
                what = "LISTEN"
            elif sock.conn is None:
                what = "no connection"
            else:
                what = sock.conn.state.name
            counts[f"{holder}: {what}"] += 1
        return dict(counts)

    @property
    def cmd_position(self) -> int:
        """Where the stack reads the command queue next (for the sleep protocol)."""
        return self._cmd_pos[0]

    @property
    def corrupt_pending(self) -> bool:
        return bool(self._corrupt)

    def close_all(self, now: float) -> None:
        """The program is gone: close what it left open, as the kernel does at exit."""
        for sock in list(self._sockets.values()):
            if not sock.app_closed:
                self._close(sock.slot_id, 0, now)
        self.publish()

    # -- commands from the program ------------------------------------------

    def execute_commands(self, now: float) -> bool:
        """Runs the commands the program queued: at most one queue's worth."""
        cmd, geom, pos, pop, execute = self._cmd, self.geom, self._cmd_pos, lib.mts_cmd_pop, self.execute
        worker, owns = self.worker, self.owns
        popped = 0
        # At most one queue's worth per loop: a program that keeps refilling
        # cells cannot starve the network.
        while popped < geom.cmd_capacity and pop(geom, worker, pos, cmd):
            popped += 1
            op, slot_id = cmd.op, cmd.slot
            if op != _OP_WAITER_FREE and not owns(slot_id):
                self._shared_listener_command(op, slot_id, cmd.generation, cmd.arg, now)
                continue
            if op != _OP_WAITER_FREE and not self._for_current_holder(slot_id, cmd.generation, now):
                self.shm_counters["cmd_stale"] += 1
                continue
            try:
                execute(op, slot_id, cmd.arg, now)
            except _NotAllocated:
                self.shm_counters["cmd_bad"] += 1
            except Exception:  # a bug reached through program-controlled input: contain it
                sock = self._sockets.get(slot_id) if op != lib.MTS_OP_WAITER_FREE else None
                self._contain(sock, f"command {op} on slot {slot_id}")
        self.commands += popped
        self.send_written(now)
        return popped > 0

    def send_written(self, now: float) -> None:
        """Sends what the program wrote in the commands just run, one
        output pass per connection (mTCP's batching of writes)."""
        pending, self._writes_pending = self._writes_pending, {}
        for conn in pending:
            try:
                conn.send_ready(now)
                self.host.collect(conn, now)
            except Exception:  # the send ring is the program's to write: contain it too
                self._contain(conn.owner, f"sending on {conn}")

    def _contain(self, sock: StackSocket | None, what: str) -> None:
        """A bug reached through program-controlled input: counted, logged,
        and that socket reset; the stack serves on."""
        self.shm_counters["handler_faults"] += 1
        log(f"{what} failed:\n{traceback.format_exc()}")
        if sock is not None:
            self._corrupted(sock, f"{what} failed")

    def execute(self, op: int, slot_id: int, arg: int, now: float) -> None:
        """Runs one command as the program queued it: op and slot are
        checked here, the rest by its handler.  The one call per command a
        test can wrap to see what the interposer sent."""
        handler = self._HANDLERS.get(op)
        if handler is None or slot_id >= self.geom.nslots and op != lib.MTS_OP_WAITER_FREE:
            self.shm_counters["cmd_bad"] += 1
            return
        handler(self, slot_id, arg, now)

    def _for_current_holder(self, slot_id: int, generation: int, now: float) -> bool:
        """False for a command queued for an earlier holder of its slot
        (freed and handed out again since: the slot's generation moved on);
        run, it would act on a socket it was never meant for.  A command
        from a program that allocated anew a slot the stack still held (it
        was marked free behind the stack's back) first resets the stack's
        old socket there, which lets the slot go."""
        if slot_id >= self.geom.nslots:
            return True  # refused as such by execute
        current = lib.mts_slot_at(self.geom, slot_id).generation
        if generation != current:
            return False
        sock = self._sockets.get(slot_id)
        if sock is not None and sock.generation != current:
            self._reset(sock, _TAKEN_OVER, now)
        return True

    def owns(self, slot_id: int) -> bool:
        """Whether the slot is in this worker's range."""
        return 0 <= slot_id - self._first_slot < self.geom.slots_per_worker

    def _socket(self, slot_id: int) -> StackSocket:
        """The stack's socket for a slot; a slot the stack does not know yet
        must be one a process of the program allocated."""
        sock = self._sockets.get(slot_id)
        if sock is None:
            slot = lib.mts_slot_at(self.geom, slot_id)
            if slot.in_use != _SLOT_USED:
                raise _NotAllocated(slot_id)
            sock = self._sockets[slot_id] = StackSocket(slot_id, slot)
            self._owned[slot_id] = 1
        return sock

    def recover_lost_tx(self, now: float) -> None:
        """A program that overwrote its own command cells can lose an
        MTS_OP_TX; its tx_pending flag then stays set and it never sends
        another.  Serve such flags as if the command had come."""
        for sock in self._sockets.values():
            if sock.conn is not None and not sock.quarantined and sock.slot.tx_pending:
                self._tx(sock.slot_id, 0, now)
        self.send_written(now)

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
        reuse_port = bool(sock.slot.opt_reuseport)
        try:
            sock.port = self.host.bind(port, bool(sock.slot.opt_reuseaddr), reuse_port)
        except OSError as err:
            return lib.mts_complete(sock.slot, -err.errno)
        sock.reuse_port = reuse_port
        sock.slot.local_ip, sock.slot.local_port = ip, sock.port
        self._publish(sock, lib.MTS_ST_BOUND, 0)
        lib.mts_complete(sock.slot, 0)

    def _listen(self, slot_id, arg, now):
        sock = self._socket(slot_id)
        if not sock.port or sock.conn is not None:
            return lib.mts_complete(sock.slot, -errno.EINVAL)
        self._listen_on(sock, arg)
        lib.mts_complete(sock.slot, 0)

    def _listen_on(self, sock: StackSocket, arg: int) -> None:
        backlog = min(max(int(arg), 1), self.geom.accept_capacity)
        # Each half-open connection holds a slot: past a quarter of them, SYNs
        # get cookies, so a flood cannot take every slot (and every listener).
        syn_backlog = min(backlog, self.geom.nslots // 4)
        if sock.listener is None:
            sock.listener = self.host.listen(sock.port, syn_backlog,
                                             lambda ip, port: self._accept_slot(sock, ip, port),
                                             lambda wanted: self._has_room(sock, wanted),
                                             bool(sock.slot.opt_reuseaddr))
        sock.listener.backlog = syn_backlog
        sock.accept_backlog = backlog
        sock.slot.backlog = backlog
        self._publish(sock, lib.MTS_ST_LISTENING, 0)

    # -- a listener shared by every worker --------------------------------------

    def _shared_listener_command(self, op: int, listener_id: int, generation: int, arg: int, now: float) -> None:
        """A command for another worker's slot: listen() shared with us, or
        the listener's owner telling us that it closed; anything else was
        queued to the wrong worker."""
        if op not in _SHARE_OPS or listener_id >= self.geom.nslots:
            self.shm_counters["cmd_bad"] += 1
            return
        try:
            if op == lib.MTS_OP_LISTEN:
                self._listen_share(listener_id, generation, arg, now)
            else:
                self._close_share(listener_id, generation, now)
        except Exception:  # reached through program-controlled input: contain it
            self._contain(self._shares.get(listener_id), f"command {op} on shared listener {listener_id}")

    def _listen_share(self, listener_id: int, generation: int, arg: int, now: float) -> None:
        """Opens (or re-sizes) our sibling of another worker's listener, on
        its port, with its options: the SYNs this worker receives for the
        port become connections in our slots, queued on the sibling."""
        slot = lib.mts_slot_at(self.geom, listener_id)
        if slot.generation != generation:
            self.shm_counters["cmd_stale"] += 1
            return
        sibling = self._shares.get(listener_id)
        if sibling is not None and sibling.share_of[1] != generation:
            self._close_share(listener_id, sibling.share_of[1], now)  # an earlier holder's, never closed
            sibling = None
        if sibling is None:
            if not slot.local_port or slot.state != lib.MTS_ST_LISTENING:
                return lib.mts_complete(slot, -errno.EINVAL)
            sibling_id = lib.mts_slot_alloc(self.geom, self.worker, self._owned_view)
            if sibling_id < 0:
                return lib.mts_complete(slot, -errno.ENOBUFS)
            sibling = self._socket(sibling_id)
            _copy_options(slot, sibling.slot)
            try:
                sibling.port = self.host.bind(slot.local_port, reuse_address=True, reuse_port=True)
            except OSError as err:
                self._free_unused(sibling)
                return lib.mts_complete(slot, -err.errno)
            sibling.reuse_port = True
            sibling.share_of = (listener_id, generation)
            sibling.slot.local_ip, sibling.slot.local_port = slot.local_ip, sibling.port
            self._shares[listener_id] = sibling
            slot.siblings[self.worker] = sibling_id + 1
        self._listen_on(sibling, arg)
        lib.mts_complete(slot, 0)

    def _close_share(self, listener_id: int, generation: int, now: float) -> None:
        """The listener's owner closed it: so goes our sibling, and the
        connections it queued that nobody accepted."""
        sibling = self._shares.get(listener_id)
        if sibling is None or sibling.share_of[1] != generation:
            return
        del self._shares[listener_id]
        slot = lib.mts_slot_at(self.geom, listener_id)
        if slot.generation == generation:
            slot.siblings[self.worker] = 0
        if sibling.slot is not None and not sibling.app_closed:
            self._close(sibling.slot_id, 0, now)

    def _free_unused(self, sock: StackSocket) -> None:
        """A slot we allocated and never used."""
        del self._sockets[sock.slot_id]
        self._owned[sock.slot_id] = 0
        lib.mts_slot_free(self.geom, sock.slot_id)

    def _has_room(self, listening: StackSocket, wanted: int) -> bool:
        """Whether `wanted` connections to `listening` completed now could
        be served: slots are free for them and its accept queue has room
        below the backlog.  The first "no" of an episode is logged: room
        comes and goes by the connection under load, the log line once."""
        waiting = self._accept_waiting(listening)
        if waiting is None:
            return False
        if waiting + wanted > listening.accept_backlog:
            full = f"the accept queue of port {listening.port} is full ({listening.accept_backlog})"
        elif not lib.mts_slots_available(self.geom, self.worker, self._owned_view,
                                         min(wanted, self.geom.slots_per_worker + 1)):
            full = f"no socket free for a new connection (of {self.geom.nslots})"
        else:
            return True
        now = time.monotonic()
        if now - self._no_room_at > _NO_ROOM_EPISODE_GAP:
            log(f"{full}: SYNs go unanswered until there is room (clients retry), "
                "as Linux leaves them when its accept queue is full")
        self._no_room_at = now
        return False

    def _accept_slot(self, listening: StackSocket, remote_ip: int, remote_port: int):
        """A SYN arrived for `listening`: a slot for the new connection."""
        child_id = lib.mts_slot_alloc(self.geom, self.worker, self._owned_view)
        if child_id < 0:
            return None
        child = self._socket(child_id)
        child.parent = listening
        child.handshake = (listening.port, remote_ip, remote_port)
        slot = child.slot
        slot.local_ip, slot.local_port = self.host.ip, listening.port
        slot.remote_ip, slot.remote_port = remote_ip, remote_port
        # Accepted sockets inherit the listener's options, as in the kernel.
        _copy_options(listening.slot, slot)
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
        reuse_address = bool(sock.slot.opt_reuseaddr)
        try:
            if sock.port:
                conn = self.host.connect(sock.port, ip, port, *buffers, sock, now, reuse_address)
            else:
                conn = self.host.connect_ephemeral(ip, port, *buffers, sock, now, reuse_address)
                sock.port = conn.local_port
        except OSError as err:
            return lib.mts_complete(sock.slot, -err.errno)
        sock.conn = conn
        slot = sock.slot
        slot.local_ip, slot.local_port = self.host.ip, conn.local_port
        slot.remote_ip, slot.remote_port = ip, port
        self._apply_options(sock)
        self._publish(sock, lib.MTS_ST_CONNECTING, 0)
        lib.mts_complete(slot, 0)

    def _tx(self, slot_id, arg, now):
        sock = self._sockets.get(slot_id)
        if sock is not None and (conn := sock.conn) is not None:
            lib.mts_tx_clear_pending(sock.slot)  # before the core looks at the ring
            self._writes_pending[conn] = None

    def _rxwin(self, slot_id, arg, now):
        sock = self._sockets.get(slot_id)
        if sock is not None and sock.conn is not None:
            sock.conn.recv_consumed(now)
            self.host.collect(sock.conn, now)

    def _shutdown(self, slot_id, arg, now):
        sock = self._sockets.get(slot_id)
        if sock is None or sock.conn is None:
            return
        if arg in (socket.SHUT_WR, socket.SHUT_RDWR):
            sock.conn.shutdown_write(now)
            self.host.collect(sock.conn, now)
        if arg in (socket.SHUT_RD, socket.SHUT_RDWR):
            self.host.touched.add(sock.conn)  # readable now (EOF): epoll hears of it by the change log

    def _close(self, slot_id, arg, now):
        sock = self._sockets.get(slot_id)
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
                child = self._sockets.get(child_id)
                if child_id < 0 or child is None or child not in sock.queued:
                    self.shm_counters["accept_entry_bad"] += 1
                    self._abort_unclaimed(sock, now)
                    break
                self._abort_unaccepted(child, now)
        elif (conn := self._connection(sock)) is not None:
            if arg:
                conn.abort(now)
            else:
                conn.close(now)
            self.host.collect(conn, now)
        self._maybe_release(sock)

    def close_abandoned(self, slot_id: int, now: float) -> None:
        """The last holder of `slot_id` ended without closing it: the close
        it never sent (an abort under SO_LINGER with a zero timeout)."""
        slot = lib.mts_slot_at(self.geom, slot_id)
        if self._for_current_holder(slot_id, slot.generation, now):
            self._close(slot_id, int(bool(slot.opt_linger_on) and not slot.opt_linger_sec), now)

    def _stop_listening(self, sock: StackSocket, now):
        self.host.unlisten(sock.listener)
        sock.listener = None
        if self._tell_workers is not None and sock.share_of is None:
            self._tell_workers(lib.MTS_OP_CLOSE, sock.slot_id, sock.generation, 0)
        for child in [s for s in self._sockets.values() if s.parent is sock]:
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
        conn = self._connection(child)
        if conn is not None:
            conn.abort(now)
            self.host.collect(conn, now)
        self._maybe_release(child)

    def _connection(self, sock: StackSocket):
        """sock's connection.  One accepted in the loop now running meets it
        at the next publish; before that, it is the one the host made for
        it, which must not outlive the socket with views of its slot."""
        if sock.conn is None and sock.handshake is not None:
            conn = self.host.connections.get(sock.handshake)
            if conn is not None and conn.owner is sock:
                sock.conn = conn
        return sock.conn

    def _setopt(self, slot_id, arg, now):
        sock = self._sockets.get(slot_id)
        if sock is not None and sock.conn is not None:
            self._apply_options(sock)
            if arg in (lib.MTS_OPT_NODELAY, lib.MTS_OPT_CORK):
                sock.conn.send_ready(now)  # uncorking may release a small segment
            elif arg == lib.MTS_OPT_BUFFERS:
                self.host.touched.add(sock.conn)  # a larger SO_SNDBUF may make it writable
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
        conn.recv_buf.limit(lib.mts_buffer_limit(self.geom.rx_size, slot.opt_rcvbuf))
        congestion = ffi.string(slot.opt_congestion).decode(errors="replace")
        if congestion and congestion != conn.congestion:
            try:
                conn.congestion = congestion
            except ValueError:  # the interposer checked the name: a drift between the two lists
                self.host.count("setopt_unknown_congestion")

    def _waiter_free(self, waiter_id, arg, now):
        self.waiters.free(waiter_id)

    def _file(self, slot_id, number, now):
        """MTS_OP_FILE: the program will send spans of the file it passed
        ahead on the control socket under `number`."""
        sock = self._socket(slot_id)
        fd = self.waiters.take_file(slot_id, number)
        if fd is None:
            return lib.mts_complete(sock.slot, -errno.EBADF)
        conn = sock.conn
        result = 0
        if not self.gathers:
            result = -errno.EOPNOTSUPP
        elif conn is None or sock.quarantined or not isinstance(conn.send_buf, ShmSendBuffer) \
                or conn.state not in _SENDING_DATA:
            result = -errno.EAGAIN
        if result:
            os.close(fd)
            return lib.mts_complete(sock.slot, result)
        try:
            source = SpanFile(fd)
        except OSError as err:
            return lib.mts_complete(sock.slot, -(err.errno or errno.EBADF))
        conn.send_buf.add_file(number, source)
        self.shm_counters["sendfile_files"] += 1
        lib.mts_complete(sock.slot, 0)

    def _info(self, slot_id, arg, now):
        """MTS_OP_INFO: TCP_INFO's figures of the socket's connection, into
        its slot (zero where there is none: a listener, or closed)."""
        sock = self._socket(slot_id)
        figures = sock.conn.info() if sock.conn is not None else {}
        info = sock.slot.info
        for name in _TCP_INFO_FIELDS:
            setattr(info, name, figures.get(name, 0))
        lib.mts_complete(sock.slot, 0)

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
        lib.MTS_OP_FILE: _file,
        lib.MTS_OP_INFO: _info,
    }

    # -- readiness ----------------------------------------------------------

    def publish(self) -> None:
        """Readiness of every connection touched since the last call, then
        one wakeup per armed waiter (mTCP's flow-level event aggregation)."""
        if not self.host.touched:
            return
        touched = list(self.host.touched)
        self.host.touched.clear()  # publishing may touch more: those go next loop
        for conn in touched:
            self._publish_connection(conn.owner, conn)
        self.waiters.wake_armed(self._interest)
        ffi.memmove(self._interest, bytes(ffi.sizeof(self._interest)), ffi.sizeof(self._interest))

    def _publish_connection(self, sock: StackSocket, conn) -> None:
        happened = conn.events
        conn.events = 0
        if sock.slot is None:
            return  # released: the application is gone, the connection finishes alone
        if sock.slot.generation != sock.generation:
            self._corrupted(sock, _TAKEN_OVER)
            return  # the slot is another socket's now
        if sock.slot.in_use != _SLOT_USED:
            # Marked free behind our back: take it back so that nobody else
            # allocates it, and reset the connection it carried.
            sock.slot.in_use = _SLOT_USED
            self._corrupted(sock, "slot marked free while in use")
        sock.conn = conn  # a passive connection meets its socket here
        so_error = 0
        if happened & EV_ESTABLISHED:
            sock.events |= lib.MTS_EV_CONNECTED
            if self.gathers and type(conn.send_buf) is ShmSendBuffer:   # not reset for corruption meanwhile
                # The MSS only shrinks from here: a longer segment is always
                # a SegmentedFrame, which the kernel gathers.
                conn.send_buf.gather_min = conn.send_mss
        if happened & EV_PEER_FIN:
            sock.events |= lib.MTS_EV_RDHUP
        if happened & EV_RESET:
            so_error = conn.error or errno.ECONNRESET
            sock.events |= lib.MTS_EV_HUP
        state = conn.state
        if state == _CLOSED or (sock.events & _EV_RDHUP and state in _AFTER_OUR_FIN):
            sock.events |= lib.MTS_EV_HUP
        self._publish(sock, _SLOT_STATE.get(state, _ST_CONNECTED), sock.events, so_error)
        if sock.parent is not None:
            if happened & EV_CLOSED:
                sock.parent = None  # died during the handshake: nobody will accept it
                sock.app_closed = True
            elif happened & EV_ESTABLISHED:
                # Only now that its state is published may anyone accept it.
                self._queue_for_accept(sock)
        if sock.app_closed:
            self._maybe_release(sock)

    def _publish(self, sock: StackSocket, state: int, events: int, so_error: int = 0) -> None:
        """A socket's new state for the program, and its id in the change log
        for every epoll that holds it."""
        logged_as = sock.slot_id if sock.share_of is None else sock.share_of[0]
        lib.mts_publish(self.geom, self.worker, self._changes_logged, self._interest, sock.slot_id, logged_as, state,
                        events, so_error)

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
        self._publish(parent, lib.MTS_ST_LISTENING, 0)

    def _accept_waiting(self, listener: StackSocket) -> int | None:
        """Connections queued and not yet accepted; None (and the listener
        reset) if the program's tail lies beyond the queue's capacity below
        the stack's own head."""
        waiting = index_distance(listener.accept_head, lib.mts_index_load(ffi.addressof(listener.slot.rx, "tail")))
        if waiting > self.geom.accept_capacity:
            self._corrupted(listener, "accept queue tail impossible")
            return None
        return waiting

    def _accept_push(self, listener: StackSocket, child: StackSocket) -> bool:
        """Queues `child` at the stack's own head; False if the queue is full.
        The program's tail must lie within capacity below that head."""
        head = listener.accept_head
        waiting = self._accept_waiting(listener)
        if waiting is None or waiting == self.geom.accept_capacity:
            return False
        lib.mts_accept_put(self.geom, listener.slot_id, head, child.slot_id)
        listener.accept_head = index_add(head, 1)
        lib.mts_index_store(ffi.addressof(listener.slot.rx, "head"), listener.accept_head)
        listener.queued.add(child)
        child.queued_on = listener
        return True

    def _maybe_release(self, sock: StackSocket) -> None:
        """Frees the slot of a socket the application has closed once the
        connection no longer needs its rings (everything sent was acked)."""
        if not sock.app_closed or sock.slot is None:
            return
        conn = self._connection(sock)
        if conn is not None and conn.state not in _AFTER_OUR_FIN:
            return
        if conn is not None:
            conn.send_buf.release()
            conn.send_buf = conn.recv_buf = DETACHED
            sock.conn = sock.handshake = None  # no reference cycle: both go once the host forgets it
        if sock.port:
            self.host.unbind(sock.port, sock.reuse_port)
        if sock.queued_on is not None:
            sock.queued_on.queued.discard(sock)
            sock.queued_on = None
        self._corrupt.pop(sock, None)
        del self._sockets[sock.slot_id]
        self._owned[sock.slot_id] = 0
        # Ring positions count from zero in each new slot: what moved says
        # which pages were written.  A short exchange keeps its few pages for
        # the next socket; a transfer gives its buffers back, as Linux's
        # memory for a closed socket goes back.  (The positions are the
        # program's to write: a wrong one costs a syscall, nothing more.)
        if sock.slot.generation == sock.generation:  # not another socket's now
            moved = max(sock.slot.rx.head, sock.slot.tx.head)
            if self._release_rings is not None and moved >= RELEASE_RINGS_AFTER:
                self._release_rings(sock.slot_id)
                self.rings_released += 1
            lib.mts_slot_free(self.geom, sock.slot_id)
        sock.slot = None

    # -- containment ----------------------------------------------------------

    def _corrupted(self, sock: StackSocket, reason: str) -> None:
        """The program wrote something impossible for `sock`: reset it at the
        end of this stage (never from inside the TCP core's call)."""
        if sock.slot is not None and not sock.quarantined:
            self._corrupt.setdefault(sock, reason)

    def reset_corrupt(self, now: float) -> None:
        corrupt, self._corrupt = self._corrupt, {}
        for sock, reason in corrupt.items():
            if sock.slot is not None:
                self._reset(sock, reason, now)

    def _reset(self, sock: StackSocket, reason: str, now: float) -> None:
        """Resets a socket the program corrupted.  If its slot was allocated
        again meanwhile, it belongs to the new socket: nothing is published
        there, the old socket counts as closed, and the slot stays allocated."""
        sock.quarantined = True
        self.shm_counters["sockets_reset"] += 1
        slot = sock.slot
        self._log_limited(now, f"the program{'' if self.program_pid is None else f' (pid {self.program_pid})'} "
                          f"corrupted socket {sock.slot_id} ({_endpoints(slot)}): {reason}; socket reset")
        if sock.listener is not None:
            self._stop_listening(sock, now)
            self._abort_unclaimed(sock, now)
        conn = self._connection(sock)
        if conn is not None:
            conn.send_buf.release()
            conn.send_buf = conn.recv_buf = DETACHED  # its rings are never read again
            conn.abort(now)
            self.host.collect(conn, now)
        if sock.slot.generation != sock.generation:
            sock.app_closed = True  # the program's descriptors name the new socket
        else:
            sock.events |= lib.MTS_EV_HUP
            self._publish(sock, lib.MTS_ST_CLOSED, sock.events, errno.ECONNRESET)
        self._maybe_release(sock)


def _copy_options(source, target) -> None:
    """The socket options of one slot onto another's, as an accepted socket
    inherits its listener's in the kernel."""
    size = ffi.offsetof("struct mts_slot", "info") - _OPTIONS_OFFSET
    ffi.memmove(ffi.cast("char *", target) + _OPTIONS_OFFSET, ffi.cast("char *", source) + _OPTIONS_OFFSET, size)


def _endpoints(slot) -> str:
    def address(ip, port):
        return f"{ip >> 24}.{ip >> 16 & 255}.{ip >> 8 & 255}.{ip & 255}:{port}"
    local = address(slot.local_ip, slot.local_port)
    return local if not slot.remote_port else f"{local} <-> {address(slot.remote_ip, slot.remote_port)}"
