"""The program's processes, as each registered itself over the control
socket (MTS_CTL_REGISTER_PROCESS: its fd table, a memfd, and a pidfd).

When a pidfd turns readable its process has ended.  Whatever its fd table
still names, it held to the end without closing (it was killed, or called
_exit): those references go here, as the kernel closes a dead process's
files, and the sockets that lost their last holder are the caller's to
close.  A normal exit lets go of everything itself (the interposer's
destructor), so by then its table is empty.

The table is the program's to write.  It must be shared memory (a memfd,
whose reads never block: no pipe, socket or file on a FUSE mount that
could stall the stack), it is read with pread, so a table that was shrunk
or never written costs only the read, and each word is checked against its
slot's own generation before a reference goes (mts_release_fd_table)."""
from __future__ import annotations

import fcntl
import os
import select

from mtcpshim._shm import ffi, lib

_CHUNK_WORDS = 8192  # words read from a table at a time (64 KiB)
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)  # answers on shared memory (memfd, tmpfs) only


class Processes:
    def __init__(self, geom, worker: int = 0):
        self.geom = geom
        self.worker = worker  # whose slots' references a dead process's table lets go here
        self._ended = select.epoll()     # every pidfd: readable once its process has ended
        self._members: dict[int, tuple[int, int, int]] = {}  # pidfd -> (pid, table fd, words)
        self.ended = 0                   # processes seen to end since the stack started
        self._closed = ffi.new("uint32_t[]", _CHUNK_WORDS)

    def fileno(self) -> int:
        """Readable while a registered process has ended and is not yet reaped:
        the stack's sleep wakes for it."""
        return self._ended.fileno()

    def __len__(self) -> int:
        return len(self._members)

    def pids(self) -> list[int]:
        return sorted(pid for pid, _, _ in self._members.values())

    def holdings(self) -> dict[int, list[int]]:
        """Each live process's stack sockets, by slot id, as its table says
        (for `mtcpshim stat`: who holds what)."""
        held = {}
        for pid, table_fd, words in self._members.values():
            slots = held.setdefault(pid, [])
            for chunk in _chunks(table_fd, words):
                if chunk.count(0) == len(chunk):
                    continue               # most of a table: numbers never used
                for word in memoryview(chunk).cast("Q"):
                    if word >> lib.MTS_FD_KIND_SHIFT & 0xFF == lib.MTS_FD_STACK:
                        slot_id = word & lib.MTS_FD_PAYLOAD_MASK
                        if (slot_id < self.geom.nslots
                                and lib.mts_slot_at(self.geom, slot_id).generation == word >> 32):
                            slots.append(slot_id)
        return {pid: sorted(slots) for pid, slots in sorted(held.items())}

    def register(self, table_fd: int, pidfd: int, words: int) -> bool:
        """Holds a process's table and pidfd (both now ours to close); False,
        holding nothing, if they are not what a registration sends."""
        pid = _pid_of(pidfd)
        if pid is None or not 0 < words <= lib.MTS_FD_TABLE_MAX or not _is_shared_memory(table_fd):
            return False
        self._members[pidfd] = (pid, table_fd, words)
        self._ended.register(pidfd, select.EPOLLIN)
        return True

    def reap(self) -> tuple[list[int], list[int]]:
        """(pids of the processes that ended since the last call, the slots
        whose last reference one of them held)."""
        if not self._members:
            return [], []
        ended, closed = [], []
        for pidfd, _ in self._ended.poll(0):
            pid, table_fd, words = self._members.pop(pidfd)
            self._ended.unregister(pidfd)
            closed += self._release(table_fd, words)
            os.close(pidfd)
            os.close(table_fd)
            ended.append(pid)
        self.ended += len(ended)
        return ended, closed

    def _release(self, table_fd: int, words: int) -> list[int]:
        closed = []
        slots = self._closed
        for chunk in _chunks(table_fd, words):
            table = ffi.from_buffer("uint64_t[]", chunk)
            count = lib.mts_release_fd_table(self.geom, self.worker, table, len(chunk) // 8, slots, _CHUNK_WORDS)
            closed += ffi.unpack(slots, count)
        return closed

    def close(self) -> None:
        for pidfd, (_, table_fd, _) in self._members.items():
            os.close(pidfd)
            os.close(table_fd)
        self._members.clear()
        self._ended.close()


def _chunks(table_fd: int, words: int):
    """A table's words, _CHUNK_WORDS at a time, as bytes; it ends early
    where the file does (a program may have shrunk it)."""
    for first in range(0, words, _CHUNK_WORDS):
        try:
            chunk = os.pread(table_fd, min(_CHUNK_WORDS, words - first) * 8, first * 8)
        except OSError:
            return
        if len(chunk) < 8:
            return
        yield chunk[:len(chunk) // 8 * 8]


def _is_shared_memory(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError:
        return False
    return True


def _pid_of(pidfd: int) -> int | None:
    """The pid a pidfd refers to (its fdinfo says), None if fd is no pidfd."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as info:
            for line in info:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None
