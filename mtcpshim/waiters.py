"""Waiters: how a program's blocked thread gets woken.  A thread about to
block registers an eventfd once, over the control socket (a datagram with
the fd as SCM_RIGHTS), for a waiter cell in the region, with every stack
worker; before each sleep it marks its interest in the slots it waits for,
arms its cell, re-checks, and sleeps on the eventfd.  A worker wakes, once
per loop, after publishing readiness, the armed waiters interested in a
slot it published: a connection's change wakes the process that waits for
it, not every process of a server.

The interposer counts each message it sends in the worker's words
(`ctl_posted`), so the busy loop reads the socket only when the count
moved: a recvmsg() per loop pass cost about 14 us.  A message sent without
being counted (a hostile program, or one that died in between) is read
anyway when poll() finds the socket readable or at housekeeping.

The same socket carries the files a program sends from with sendfile
(MTS_CTL_SEND_FILE): each is held here until the MTS_OP_FILE command that
names it takes it (`take_file`); and each process's registration
(MTS_CTL_REGISTER_PROCESS), which goes to `processes` (mtcpshim/processes.py).

The control socket is a trust boundary like the region: a message that is
not a registration for a waiter the geometry has, or a file for a slot it
has, or a process's fd table and pidfd, is refused and counted (`ctl_bad`),
and so is a file no command came for while _FILES_HELD others arrived."""
from __future__ import annotations

import os
import socket
import sys

from mtcpshim._shm import ffi, lib

_MESSAGE_SIZE = ffi.sizeof("struct mts_ctl_msg")
_EVENTFD_ONE = (1).to_bytes(8, sys.byteorder)  # what eventfd_write(fd, 1) writes
_FILES_HELD = 64


class Waiters:
    def __init__(self, geom, ctl_fd: int, shm_counters, processes, worker: int = 0):
        self.geom = geom
        self.worker = worker  # each worker has a control socket of its own, and a copy of every waiter's eventfd
        self.processes = processes
        self.ctl = socket.socket(fileno=ctl_fd)
        self.ctl.setblocking(False)
        self._fds: dict[int, int] = {}  # waiter id -> its eventfd
        self._files: dict[tuple, int] = {}  # (slot id, file number) -> a file sent ahead of MTS_OP_FILE
        self._shm_counters = shm_counters
        self.wakeups = 0
        self._posted_seen = lib.mts_ctl_posted(geom, worker)
        self._look = True             # whatever came before the count was read

    def fileno(self) -> int:
        return self.ctl.fileno()

    def look(self) -> None:
        """Read the socket at the next receive(), whatever the count says."""
        self._look = True

    def __len__(self) -> int:
        return len(self._fds)

    def receive(self) -> bool:
        """Takes every registration waiting on the control socket; True if any."""
        posted = lib.mts_ctl_posted(self.geom, self.worker)
        if posted == self._posted_seen and not self._look:
            return False
        self._posted_seen = posted
        self._look = False
        busy = False
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.ctl, _MESSAGE_SIZE, 4)
            except BlockingIOError:
                return busy
            busy = True
            msg = ffi.from_buffer("struct mts_ctl_msg *", data) if len(data) == _MESSAGE_SIZE else None
            if msg is not None and len(fds) == 1 and msg.op == lib.MTS_CTL_SEND_FILE and msg.id < self.geom.nslots:
                self._hold_file((msg.id, msg.arg), fds[0])
                continue
            if (msg is not None and len(fds) == 2 and msg.op == lib.MTS_CTL_REGISTER_PROCESS
                    and self.processes.register(fds[0], fds[1], msg.arg)):
                continue
            waiter = lib.mts_waiter_at(self.geom, msg.id) if msg is not None else ffi.NULL
            if msg is None or msg.op != lib.MTS_CTL_REGISTER_WAITER or len(fds) != 1 or waiter == ffi.NULL:
                self._shm_counters["ctl_bad"] += 1
                for fd in fds:
                    os.close(fd)
                continue
            old = self._fds.pop(msg.id, None)
            if old is not None:
                os.close(old)
            self._fds[msg.id] = fds[0]
            lib.mts_waiter_registered(waiter, self.worker)

    def _hold_file(self, key: tuple, fd: int) -> None:
        old = self._files.pop(key, None)
        if old is None and len(self._files) >= _FILES_HELD:
            old = self._files.pop(next(iter(self._files)))
        if old is not None:
            self._shm_counters["ctl_bad"] += 1
            os.close(old)
        self._files[key] = fd

    def take_file(self, slot_id: int, number: int) -> int | None:
        """The file sent for MTS_OP_FILE `number` on `slot_id`, now the
        caller's to close; None if none came."""
        self._look = True       # it was sent before the command: read what is there
        self.receive()
        return self._files.pop((slot_id, number), None)

    def free_owned_by(self, pid: int) -> None:
        """A process ended: the waiters its threads claimed go (each says
        whose it is; a wrong owner only costs that waiter)."""
        for waiter_id in [w for w in self._fds if lib.mts_waiter_at(self.geom, w).owner_pid == pid]:
            self.free(waiter_id)

    def free(self, waiter_id: int) -> None:
        """MTS_OP_WAITER_FREE: the thread is gone; its eventfd goes too."""
        fd = self._fds.pop(waiter_id, None)
        if fd is not None:
            os.close(fd)
            lib.mts_waiter_free(self.geom, waiter_id, self.worker)

    def close(self) -> None:
        for fd in (*self._fds.values(), *self._files.values()):
            os.close(fd)
        self._fds.clear()
        self._files.clear()
        self.ctl.close()

    def wake_armed(self, interest) -> None:
        """Wakes the armed waiters among those `interest` names (a bit per
        waiter id modulo MTS_INTEREST_BITS: see mtcpshim_abi.h)."""
        bits = lib.MTS_INTEREST_BITS
        for waiter_id, fd in self._fds.items():
            bit = waiter_id % bits
            if interest[bit >> 6] >> (bit & 63) & 1 and lib.mts_waiter_disarm(lib.mts_waiter_at(self.geom, waiter_id)):
                self.wakeups += 1
                os.write(fd, _EVENTFD_ONE)
