"""The shared-memory region: created by the launcher, mapped by the stack and
by every wrapped process.  Layout and operations come from preload/ (the ABI
header and mts_shm.h) through the cffi module mtcpshim._shm."""
import mmap
import os
from dataclasses import dataclass

from mtcpshim._shm import ffi, lib


@dataclass(frozen=True)
class RegionSize:
    nslots: int = 1024
    nwaiters: int = 256
    cmd_capacity: int = 8192
    rx_size: int = 256 * 1024
    tx_size: int = 256 * 1024

    def bytes(self) -> int:
        return lib.mts_region_size(self.nslots, self.nwaiters, self.cmd_capacity, self.rx_size, self.tx_size)


class Region:
    """A mapping of the region; `header` is the cffi `struct mts_header *`."""

    def __init__(self, fd: int):
        self.fd = fd
        size = os.fstat(fd).st_size
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.base = ffi.from_buffer(self._map)
        self.header = ffi.cast("struct mts_header *", self.base)
        if not lib.mts_region_valid(self.header, size):
            raise ValueError("shared region has a bad magic, version or size")

    @classmethod
    def create(cls, size: RegionSize, ip: int, prefix_len: int, gateway: int = 0) -> "Region":
        """A fresh memfd laid out for `size`, inheritable by children."""
        fd = os.memfd_create("mtcpshim", 0)
        os.ftruncate(fd, size.bytes())
        with mmap.mmap(fd, size.bytes(), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            base = ffi.from_buffer(m)
            lib.mts_region_init(base, size.nslots, size.nwaiters, size.cmd_capacity, size.rx_size, size.tx_size)
            header = ffi.cast("struct mts_header *", base)
            header.ip, header.prefix_len, header.gateway = ip, prefix_len, gateway
            del base, header
        os.set_inheritable(fd, True)
        return cls(fd)

    def slot(self, slot_id: int):
        return lib.mts_slot_at(self.header, slot_id)

    def set_fault(self, reason: str) -> None:
        """Records why the stack died, for the interposer and the launcher."""
        data = reason.encode()[: ffi.sizeof(self.header.fault) - 1]
        ffi.memmove(self.header.fault, data + b"\0", len(data) + 1)
        self.header.stack_state = lib.MTS_STACK_DEAD

    def fault(self) -> str:
        return ffi.string(self.header.fault).decode(errors="replace")

    def close(self) -> None:
        del self.header, self.base
        self._map.close()
