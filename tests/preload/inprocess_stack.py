"""The real stack for the interposer tests, served by a thread of the test
process: mtcpshim.runtime.Runtime over a real region and a mtcpshim.stack.node.Node,
whose packet I/O is a wire that leads back to the node itself.  The node's
ARP request for its own address comes back and is answered by itself; TCP
to that address then runs end to end through the real TCP core, both ends
in the one host.  Programs attach as the launcher attaches them (`fds`,
`env`).
"""
from __future__ import annotations

import collections
import contextlib
import os
import socket
import threading
import time

from mtcpshim._shm import lib
from mtcpshim.launcher import attach_env
from mtcpshim.region import Region, RegionSize
from mtcpshim.runtime import Runtime
from mtcpshim.sockets import SocketTable
from mtcpshim.stack.host import TcpHost
from mtcpshim.stack.iface import Interface
from mtcpshim.stack.node import Node

STACK_IP = "198.18.0.2"
STACK_MAC = bytes.fromhex("020000000002")
PROGRAM_TIMEOUT = 30  # seconds a probe program may take


class ReflectingLink:
    """Packet I/O whose every sent frame is received again.  fileno() is an
    eventfd, readable while frames wait, so that the runtime's poll() wakes
    for its own output."""

    mac = STACK_MAC

    def __init__(self):
        self._frames = collections.deque()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK)

    def filenos(self) -> tuple[int]:
        return (self._fd,)

    def send_batch(self, frames) -> int:
        self._frames.extend(bytes(frame) for frame in frames)  # the wire's copy
        os.eventfd_write(self._fd, 1)
        return len(frames)

    rx_vouched = None
    gathers_payload = False  # it copies what it is sent

    def recv_batch(self, max_frames: int) -> list:
        frames = self._frames
        batch = [frames.popleft() for _ in range(min(max_frames, len(frames)))]
        if not frames:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._fd)
        return batch

    def close(self) -> None:
        os.close(self._fd)


# The commands worth a line in the log: what the interposer asks of the
# stack's sockets, not the data path (TX, RXWIN) nor waiter bookkeeping.
_DESCRIBE = {
    lib.MTS_OP_BIND: lambda slot, arg: f"bind {slot} port {arg & 0xFFFF}",
    lib.MTS_OP_LISTEN: lambda slot, arg: f"listen {slot} backlog {arg}",
    lib.MTS_OP_CONNECT: lambda slot, arg: f"connect {slot} port {arg & 0xFFFF}",
    lib.MTS_OP_SHUTDOWN: lambda slot, arg: f"shutdown {slot} how {arg}",
    lib.MTS_OP_CLOSE: lambda slot, arg: f"close {slot}{' abort' if arg else ''}",
    lib.MTS_OP_SETOPT: lambda slot, arg: f"setopt {slot} {arg}",
}


class LoggedSocketTable(SocketTable):
    """The runtime's socket table, noting in `log` each command of _DESCRIBE before it runs."""

    def __init__(self, *args):
        super().__init__(*args)
        self.log: list[str] = []

    def execute(self, op, slot_id, arg, now):
        describe = _DESCRIBE.get(op)
        if describe is not None:
            self.log.append(describe(slot_id, arg))
        super().execute(op, slot_id, arg, now)


class InProcessStack:
    """Create, pass `fds` and `env` to programs, serve with start()."""

    def __init__(self, ip: str = STACK_IP, prefix_len: int = 24):
        address = int.from_bytes(socket.inet_aton(ip), "big")
        # A change log of the smallest size: scenarios that change many
        # sockets between two epoll waits overrun it (test_interposer).
        size = RegionSize(nslots=64, nwaiters=32, cmd_capacity=256, changes_capacity=lib.MTS_MIN_CHANGES,
                          rx_size=1 << 16, tx_size=1 << 16)
        self.region = Region.create(size, address, prefix_len)
        ctl_stack, self.ctl_app = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK)
        # death_w is the stack's end: die() closes it, as a crash would.
        self.death_r, self.death_w = os.pipe()
        self.link = ReflectingLink()
        node = Node(Interface(self.link.mac, address, prefix_len), TcpHost(address))
        self.runtime = Runtime(self.region, self.link, node, ctl_stack.detach(), self.wake_fd)
        # Swapped in before the loop first runs: nothing holds the first table yet.
        self.sockets = self.runtime.sockets = LoggedSocketTable(
            self.region.geom, node, self.runtime.waiters, self.runtime.shm_counters)
        self.region.header.stack_pid = os.getpid()
        self.region.header.stack_state = lib.MTS_STACK_RUNNING  # as stackd, once it serves
        self.failure: Exception | None = None
        self._thread: threading.Thread | None = None

    # -- what programs inherit ------------------------------------------

    @property
    def fds(self) -> tuple[int, int, int, int]:
        return (self.region.fd, self.ctl_app.fileno(), self.wake_fd, self.death_r)

    @property
    def env(self) -> dict[str, str]:
        return attach_env(self.region.fd, self.death_r, [(self.ctl_app.fileno(), self.wake_fd)])

    @property
    def log(self) -> list[str]:
        return self.sockets.log

    # -- lifetime --------------------------------------------------------

    def start(self) -> "InProcessStack":
        self._thread = threading.Thread(target=self._serve, name="mtcpshim-stack", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        try:
            self.runtime.run()
        except Exception as err:  # reported by close(), in the test's own thread
            self.failure = err

    def settle(self, timeout: float = 5.0) -> None:
        """Returns once every command queued so far has been served."""
        deadline = time.monotonic() + timeout
        counters, geom = self.runtime.counters, self.region.geom
        # A step that begins after this call has run to its end once the
        # next one begins: an empty queue then means every command ran.
        start = counters["loops"]
        while time.monotonic() < deadline and self.failure is None:
            if counters["loops"] >= start + 2 and not lib.mts_cmd_pending(geom, 0, self.sockets.cmd_position):
                return
            os.eventfd_write(self.wake_fd, 1)
            time.sleep(0.001)
        raise TimeoutError("the stack did not drain its command queue") from self.failure

    def die(self) -> None:
        """Stops serving without a word, as a crashed stack would: only the
        death pipe tells the programs."""
        self._halt()
        os.close(self.death_w)
        self.death_w = -1

    def close(self) -> None:
        self._halt()
        self.runtime.close()
        self.ctl_app.close()
        self.link.close()
        for fd in (self.wake_fd, self.death_r, self.death_w):
            if fd >= 0:
                os.close(fd)
        self.region.close()
        os.close(self.region.fd)
        if self.failure is not None:
            raise RuntimeError("the stack's loop failed") from self.failure

    def _halt(self) -> None:
        if self._thread is None:
            return
        self.runtime.stopping = True
        os.eventfd_write(self.wake_fd, 1)  # out of its sleep
        self._thread.join(5)
        if self._thread.is_alive():
            raise RuntimeError("the stack's loop did not stop")
        self._thread = None
