"""The shared-memory region: created by the launcher, mapped by the stack and
by every wrapped process.  Layout and operations come from preload/ (the ABI
header and mts_shm.h) through the cffi module mtcpshim._shm.

The memfd is sealed against resizing, so no process holding it can shrink
the mapping under the stack (SIGBUS); the stack refuses a region without
the seals.  `geom` is this process's own copy of the layout, read once at
attach: the stack attaches before the program runs, and never reads the
header's geometry again.
"""
import fcntl
import mmap
import os
import re
import resource
from dataclasses import dataclass

from mtcpshim._shm import ffi, lib
from mtcpshim.stack import cc
from mtcpshim.stack.tcp import TcpConfig

assert (len(" ".join(cc.ALGORITHMS)) < lib.MTS_CONGESTION_LIST_MAX
        and all(len(name) < lib.MTS_CONGESTION_NAME_MAX for name in cc.ALGORITHMS)), "names outgrew the ABI"


# Each socket's receive and send buffer is a ring of this many bytes in the
# region (`mtcpshim run --buffer-size`).  A megabyte each way keeps a path of
# a few milliseconds busy through a loss (the peer waits for the hole while
# the rest of the window is in flight, the ring full); Linux autotunes up to
# 6 and 4 MiB.  Memory is spent only where data passed: the region is a
# sparse memfd, and a ring's pages exist once written.
DEFAULT_BUFFER_SIZE = 1 << 20
MIN_BUFFER_SIZE, MAX_BUFFER_SIZE = 64 << 10, 64 << 20
_SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20}


def parse_buffer_size(text: str) -> int:
    """A buffer size such as 4M, 256K or 1048576; ValueError with one line
    for the user unless a power of two between the limits."""
    match = re.fullmatch(r"(\d+)([kKmM]?)(?:i?[bB])?", text.strip())
    if match is None:
        raise ValueError(f"buffer size {text!r}: want bytes, or a number with K or M, such as 4M")
    size = int(match.group(1)) * _SIZE_SUFFIXES[match.group(2).lower()]
    if size & (size - 1) or not MIN_BUFFER_SIZE <= size <= MAX_BUFFER_SIZE:
        raise ValueError(f"buffer size {text}: want a power of two from {MIN_BUFFER_SIZE >> 10}K "
                         f"to {MAX_BUFFER_SIZE >> 20}M (the rings wrap with a mask)")
    return size


# Sockets a region holds (`mtcpshim run --sockets`): every process's stack
# sockets and the connections waiting to be accepted.  Each costs a slot's
# rings of address space (sparse: memory only where data passed), so the
# default is generous, as the kernel's limits are: at least 65536, more if
# the program may open more files than that.
MIN_SOCKETS, MAX_SOCKETS = 16, 1 << 20
_DEFAULT_SOCKETS_FLOOR = 65536


def default_sockets() -> int:
    """The program's RLIMIT_NOFILE (it inherits ours), at least 65536."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_SOCKETS
    return min(max(soft, _DEFAULT_SOCKETS_FLOOR), MAX_SOCKETS)


def parse_sockets(text: str) -> int:
    """A socket count; ValueError with one line for the user unless a whole
    number between the limits."""
    if not text.strip().isdigit() or not MIN_SOCKETS <= int(text) <= MAX_SOCKETS:
        raise ValueError(f"sockets {text!r}: want a whole number from {MIN_SOCKETS} to {MAX_SOCKETS}")
    return int(text)


@dataclass(frozen=True)
class RegionSize:
    nslots: int
    nworkers: int = 1          # stack workers; nslots is a multiple of it
    nwaiters: int = 256
    cmd_capacity: int = 8192
    # Slots the change log remembers: an epoll that falls further behind
    # than this looks at every fd it holds once (256 KiB of region).
    changes_capacity: int = 65536
    rx_size: int = DEFAULT_BUFFER_SIZE
    tx_size: int = DEFAULT_BUFFER_SIZE

    def bytes(self) -> int:
        return lib.mts_region_size(self.nslots, self.nworkers, self.nwaiters, self.cmd_capacity, self.changes_capacity,
                                   self.rx_size, self.tx_size)


# Linux's values, for Pythons whose fcntl lacks the names (PyPy 3.9 runs the stack).
_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_SIZE_SEALS = (getattr(fcntl, "F_SEAL_SHRINK", 0x2) | getattr(fcntl, "F_SEAL_GROW", 0x4)
               | getattr(fcntl, "F_SEAL_SEAL", 0x1))


class Region:
    """A mapping of the region; `header` is the cffi `struct mts_header *`,
    `geom` the private `struct mts_geom *` every operation takes."""

    def __init__(self, fd: int):
        if fcntl.fcntl(fd, _F_GET_SEALS) & _SIZE_SEALS != _SIZE_SEALS:
            raise ValueError("shared region is not sealed against resizing")
        self.fd = fd
        size = os.fstat(fd).st_size
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.base = ffi.from_buffer(self._map)
        self.header = ffi.cast("struct mts_header *", self.base)
        self.geom = ffi.new("struct mts_geom *")
        if lib.mts_geom_attach(self.geom, self.base, size) != 0:
            raise ValueError("shared region has a bad magic, version or geometry")

    @classmethod
    def create(cls, size: RegionSize, ip: int, prefix_len: int, gateway: int = 0) -> "Region":
        """A fresh sealed memfd laid out for `size`, inheritable by children."""
        total = size.bytes()
        if not total:
            raise ValueError(f"region geometry out of bounds: {size}")
        fd = os.memfd_create("mtcpshim", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, total)
        fcntl.fcntl(fd, _F_ADD_SEALS, _SIZE_SEALS)
        with mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            base = ffi.from_buffer(m)
            lib.mts_region_init(base, total, size.nslots, size.nworkers, size.nwaiters, size.cmd_capacity,
                                size.changes_capacity, size.rx_size, size.tx_size)
            header = ffi.cast("struct mts_header *", base)
            header.ip, header.prefix_len, header.gateway = ip, prefix_len, gateway
            del base, header
        os.set_inheritable(fd, True)
        region = cls(fd)
        region.publish_congestion(TcpConfig.congestion)
        return region

    def publish_congestion(self, default: str) -> None:
        """What TCP_CONGESTION may name, for the interposer: stack/cc.py's
        list, `default` (the stack's, which it sets before the program
        starts) first, NUL-terminated within the header's field."""
        names = " ".join(sorted(cc.ALGORITHMS, key=lambda name: name != default)).encode()
        ffi.memmove(self.header.congestion, names + b"\0", len(names) + 1)

    def slot(self, slot_id: int):
        return lib.mts_slot_at(self.geom, slot_id)

    def release_rings(self, slot_id: int) -> None:
        """Gives the pages of a freed slot's rings back to the kernel
        (MADV_REMOVE punches them out of the memfd): the slot costs no
        memory until it carries data again, when they come back zeroed."""
        geom = self.geom
        ring_bytes = geom.rx_size + geom.tx_size
        self._map.madvise(mmap.MADV_REMOVE, geom.data_off + slot_id * ring_bytes, ring_bytes)

    def set_fault(self, reason: str) -> None:
        """Records why the stack died, for the interposer and the launcher."""
        data = reason.encode()[: ffi.sizeof(self.header.fault) - 1]
        ffi.memmove(self.header.fault, data + b"\0", len(data) + 1)
        self.header.stack_state = lib.MTS_STACK_DEAD

    def fault(self) -> str:
        return ffi.string(self.header.fault).decode(errors="replace")

    def close(self) -> None:
        del self.header, self.base, self.geom
        self._map.close()
