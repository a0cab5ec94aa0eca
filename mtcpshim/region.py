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
from dataclasses import dataclass

from mtcpshim._shm import ffi, lib
from mtcpshim.stack import cc
from mtcpshim.stack.tcp import TcpConfig

assert (len(" ".join(cc.ALGORITHMS)) < lib.MTS_CONGESTION_LIST_MAX
        and all(len(name) < lib.MTS_CONGESTION_NAME_MAX for name in cc.ALGORITHMS)), "names outgrew the ABI"


@dataclass(frozen=True)
class RegionSize:
    nslots: int = 1024
    nwaiters: int = 256
    cmd_capacity: int = 8192
    rx_size: int = 256 * 1024
    tx_size: int = 256 * 1024

    def bytes(self) -> int:
        return lib.mts_region_size(self.nslots, self.nwaiters, self.cmd_capacity, self.rx_size, self.tx_size)


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
            lib.mts_region_init(base, total, size.nslots, size.nwaiters, size.cmd_capacity,
                                size.rx_size, size.tx_size)
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
