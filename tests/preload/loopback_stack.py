"""A stand-in for the stack process, for testing the interposer alone.

It serves the shared region exactly as the real runtime must (commands,
waiter registration, readiness, wakeups, sleeping), but instead of speaking
TCP on a wire it joins its own sockets to each other: a CONNECT to one of its
listeners creates the accepted slot, and bytes written to one side's TX ring
are copied into the other side's RX ring.  No packets, no timers.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from mtcpshim import abi_source
from mtcpshim._shm import ffi, lib
from mtcpshim.region import Region, RegionSize

STACK_IP = "198.18.0.2"
PROGRAM_TIMEOUT = 30  # seconds a probe program may take
EPHEMERAL_FIRST = 40000


def ip_int(text: str) -> int:
    return int.from_bytes(socket.inet_aton(text), "big")


@dataclass(eq=False)
class LoopSocket:
    slot_id: int
    slot: object
    port: int = 0
    listening: bool = False
    peer: "LoopSocket | None" = None
    events: int = 0
    state: int = lib.MTS_ST_FRESH
    so_error: int = 0
    fin_pending: bool = False  # the app shut down writing; FIN follows its TX
    app_closed: bool = False
    options_changed: list = field(default_factory=list)
    accept_head: int = 0       # a listener's accept queue: the stack keeps its own head


class LoopbackStack:
    """Create, then pass `fds` and `env` to programs; serve with start()."""

    def __init__(self, ip: str = STACK_IP, prefix_len: int = 24, size: RegionSize | None = None):
        size = size or RegionSize(nslots=64, nwaiters=32, cmd_capacity=256, rx_size=1 << 16, tx_size=1 << 16)
        self.ip = ip_int(ip)
        self.region = Region.create(size, self.ip, prefix_len)
        self.header = self.region.header
        self.geom = self.region.geom
        self._cmd_pos = ffi.new("uint64_t *")
        self.ctl, self.ctl_app = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.ctl.setblocking(False)
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.death_r, self.death_w = os.pipe()
        self.sockets: dict[int, LoopSocket] = {}
        self.ports: dict[int, LoopSocket] = {}
        self.waiters: dict[int, int] = {}
        self.log: list[str] = []
        self._changed: set[LoopSocket] = set()
        self._cmd = ffi.new("struct mts_cmd *")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._iterations = 0
        self.header.stack_state = lib.MTS_STACK_RUNNING

    # -- what programs inherit ------------------------------------------

    @property
    def fds(self) -> tuple[int, int, int, int]:
        return (self.region.fd, self.ctl_app.fileno(), self.wake_fd, self.death_r)

    @property
    def env(self) -> dict[str, str]:
        name = abi_source.string_constants()["MTS_ENV_FDS"]
        return {name: ",".join(map(str, self.fds))}

    # -- lifetime --------------------------------------------------------

    def start(self) -> "LoopbackStack":
        self._thread = threading.Thread(target=self._serve, name="loopback-stack", daemon=True)
        self._thread.start()
        return self

    def settle(self, timeout: float = 5.0) -> None:
        """Returns once every command queued so far has been served."""
        deadline = time.monotonic() + timeout
        start = self._iterations
        while time.monotonic() < deadline:
            if self._iterations >= start + 2 and not lib.mts_cmd_pending(self.geom, self._cmd_pos[0]):
                return
            os.eventfd_write(self.wake_fd, 1)
            time.sleep(0.001)
        raise TimeoutError("the loopback stack did not drain its command queue")

    def die(self) -> None:
        """Stops serving without a word, as a crashed stack would: only the
        death pipe tells the programs."""
        self._halt()
        os.close(self.death_w)
        self.death_w = -1

    def close(self) -> None:
        self._halt()
        for fd in list(self.waiters.values()) + [self.wake_fd, self.death_r, self.death_w]:
            if fd >= 0:
                os.close(fd)
        self.waiters.clear()
        self.ctl.close()
        self.ctl_app.close()

    def _halt(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    # -- the loop --------------------------------------------------------

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self.wake_fd, select.POLLIN)
        poller.register(self.ctl.fileno(), select.POLLIN)
        while not self._stop.is_set():
            self._iterations += 1
            self._control()
            busy = self._commands()
            self._publish()
            if busy or not lib.mts_stack_try_sleep(self.geom, self._cmd_pos[0]):
                continue
            for fd, _ in poller.poll(20):
                if fd == self.wake_fd:
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
            lib.mts_stack_awake(self.geom)

    def _control(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.ctl, ffi.sizeof("struct mts_ctl_msg"), 1)
            except BlockingIOError:
                return
            msg = ffi.from_buffer("struct mts_ctl_msg *", data)
            assert msg.op == lib.MTS_CTL_REGISTER_WAITER and len(fds) == 1
            old = self.waiters.pop(msg.waiter, None)
            if old is not None:
                os.close(old)
            self.waiters[msg.waiter] = fds[0]
            waiter = lib.mts_waiter_at(self.geom, msg.waiter)
            waiter.registered = 1
            lib.mts_futex_wake(ffi.addressof(waiter, "registered"))
            self.log.append(f"register_waiter {msg.waiter}")

    def _commands(self) -> bool:
        busy = False
        while lib.mts_cmd_pop(self.geom, self._cmd_pos, self._cmd):
            busy = True
            op, slot_id, arg = self._cmd.op, self._cmd.slot, self._cmd.arg
            self._HANDLERS[op](self, slot_id, arg)
        return busy

    def _publish(self) -> None:
        if not self._changed:
            return
        for sock in self._changed:
            if not sock.app_closed:  # a closed socket's slot may belong to someone else now
                lib.mts_publish(sock.slot, sock.state, sock.events, sock.so_error)
                sock.so_error = 0
        self._changed.clear()
        for waiter_id, fd in self.waiters.items():
            if lib.mts_waiter_disarm(lib.mts_waiter_at(self.geom, waiter_id)):
                os.eventfd_write(fd, 1)

    # -- commands ----------------------------------------------------------

    def _socket(self, slot_id: int) -> LoopSocket:
        sock = self.sockets.get(slot_id)
        if sock is None:
            sock = self.sockets[slot_id] = LoopSocket(slot_id, lib.mts_slot_at(self.geom, slot_id))
        return sock

    def _ephemeral_port(self) -> int:
        port = EPHEMERAL_FIRST
        while port in self.ports:
            port += 1
        return port

    def _bind(self, slot_id, arg):
        sock = self._socket(slot_id)
        ip, port = arg >> 16, arg & 0xFFFF
        self.log.append(f"bind {slot_id} port {port}")
        if ip not in (0, self.ip):
            return lib.mts_complete(sock.slot, -errno.EADDRNOTAVAIL)
        if sock.port:
            return lib.mts_complete(sock.slot, -errno.EINVAL)
        if port in self.ports:
            return lib.mts_complete(sock.slot, -errno.EADDRINUSE)
        sock.port = port or self._ephemeral_port()
        self.ports[sock.port] = sock
        sock.slot.local_ip, sock.slot.local_port = ip, sock.port
        sock.state = lib.MTS_ST_BOUND
        lib.mts_publish(sock.slot, sock.state, 0, 0)
        lib.mts_complete(sock.slot, 0)

    def _listen(self, slot_id, arg):
        sock = self._socket(slot_id)
        self.log.append(f"listen {slot_id} backlog {arg}")
        if not sock.port:
            return lib.mts_complete(sock.slot, -errno.EINVAL)
        sock.listening = True
        sock.state = lib.MTS_ST_LISTENING
        lib.mts_publish(sock.slot, sock.state, 0, 0)
        lib.mts_complete(sock.slot, 0)

    def _connect(self, slot_id, arg):
        sock = self._socket(slot_id)
        ip, port = arg >> 16, arg & 0xFFFF
        self.log.append(f"connect {slot_id} port {port}")
        if ip != self.ip:
            return lib.mts_complete(sock.slot, -errno.ENETUNREACH)
        if not sock.port:
            sock.port = self._ephemeral_port()
            self.ports[sock.port] = sock
        slot = sock.slot
        slot.local_ip, slot.local_port = self.ip, sock.port
        slot.remote_ip, slot.remote_port = ip, port
        sock.state = lib.MTS_ST_CONNECTING
        lib.mts_publish(slot, sock.state, 0, 0)
        lib.mts_complete(slot, 0)
        listener = self.ports.get(port)
        if listener is None or not listener.listening:
            sock.state, sock.so_error, sock.events = lib.MTS_ST_CLOSED, errno.ECONNREFUSED, lib.MTS_EV_HUP
            self._changed.add(sock)
            return
        child_id = lib.mts_slot_alloc(self.geom, ffi.NULL)
        assert child_id >= 0
        child = self._socket(child_id)
        child.slot.local_ip, child.slot.local_port = self.ip, port
        child.slot.remote_ip, child.slot.remote_port = self.ip, sock.port
        child.peer, sock.peer = sock, child
        for end in (sock, child):
            end.state, end.events = lib.MTS_ST_CONNECTED, lib.MTS_EV_CONNECTED
            self._changed.add(end)
        lib.mts_publish(child.slot, child.state, child.events, 0)
        lib.mts_accept_put(self.geom, listener.slot_id, listener.accept_head, child_id)
        listener.accept_head += 1
        lib.mts_index_store(ffi.addressof(listener.slot.rx, "head"), listener.accept_head)
        self._changed.add(listener)

    def _tx(self, slot_id, arg):
        sock = self.sockets.get(slot_id)
        if sock is not None:
            sock.slot.tx_pending = 0
            self._transfer(sock)

    def _rxwin(self, slot_id, arg):
        sock = self.sockets.get(slot_id)
        if sock is not None and sock.peer is not None:
            self._transfer(sock.peer)

    def _shutdown(self, slot_id, arg):
        sock = self.sockets.get(slot_id)
        self.log.append(f"shutdown {slot_id} how {arg}")
        if sock is not None and arg in (socket.SHUT_WR, socket.SHUT_RDWR):
            sock.fin_pending = True
            self._transfer(sock)

    def _close(self, slot_id, arg):
        sock = self.sockets.pop(slot_id, None)
        self.log.append(f"close {slot_id}{' abort' if arg else ''}")
        if sock is None:
            return lib.mts_slot_free(self.geom, slot_id)
        sock.app_closed = True
        if self.ports.get(sock.port) is sock:
            del self.ports[sock.port]
        if sock.listening:
            while (child_id := lib.mts_accept_pop(self.geom, slot_id)) >= 0:
                self._reset(self.sockets[child_id].peer)
                self._forget(self.sockets.pop(child_id))
        elif sock.peer is not None:
            if arg:
                self._reset(sock.peer)
            else:
                sock.fin_pending = True
                self._transfer(sock)
        self._forget(sock)

    def _setopt(self, slot_id, arg):
        self._socket(slot_id).options_changed.append(arg)
        self.log.append(f"setopt {slot_id} {arg}")

    def _waiter_free(self, waiter_id, arg):
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

    # -- the "network" -------------------------------------------------------

    def _transfer(self, sock: LoopSocket) -> None:
        """Moves sock's TX bytes into its peer's RX ring as far as they fit,
        then its FIN once TX is empty."""
        peer = sock.peer
        tx = ffi.addressof(sock.slot.tx)
        if peer is None or peer.app_closed:
            lib.mts_ring_consume(tx, lib.mts_ring_used(tx))  # nobody to deliver to
        else:
            rx = ffi.addressof(peer.slot.rx)
            while lib.mts_ring_used(tx):
                n = min(self.geom.rx_size - lib.mts_ring_used(rx), lib.mts_ring_used(tx))
                if n == 0:
                    # Ask for a word once the peer reads, then look again:
                    # it may have read everything before the flag was up.
                    lib.mts_rx_arm_notify(peer.slot)
                    if lib.mts_ring_used(rx) < self.geom.rx_size:
                        continue
                    return
                chunk = ffi.new("uint8_t[]", n)
                lib.mts_ring_peek(tx, lib.mts_tx_data(self.geom, sock.slot_id), self.geom.tx_size, 0, chunk, n)
                lib.mts_ring_write(rx, lib.mts_rx_data(self.geom, peer.slot_id), self.geom.rx_size, chunk, n)
                lib.mts_ring_consume(tx, n)
                self._changed.update((sock, peer))
        if sock.fin_pending and not sock.events & lib.MTS_EV_HUP:
            sock.fin_pending = False
            if peer is not None:
                peer.events |= lib.MTS_EV_RDHUP
                if sock.events & lib.MTS_EV_RDHUP:
                    peer.events |= lib.MTS_EV_HUP
                    sock.events |= lib.MTS_EV_HUP
                self._changed.update((sock, peer))

    def _reset(self, sock: LoopSocket | None) -> None:
        if sock is None or sock.app_closed:
            return
        sock.state, sock.so_error = lib.MTS_ST_CLOSED, errno.ECONNRESET
        sock.events |= lib.MTS_EV_HUP
        sock.peer = None
        self._changed.add(sock)

    def _forget(self, sock: LoopSocket) -> None:
        lib.mts_slot_free(self.geom, sock.slot_id)
