"""The interface every packet I/O backend implements.

A backend moves whole Ethernet frames.  `recv_batch` never blocks: the
runtime sleeps in poll() on `fileno()` and drains what is there.  The
frames it returns may be views of the device's ring, valid until the next
`recv_batch`: whatever keeps a frame longer copies it.
`send_batch` hands a batch to the device with one flush (one system call
where the device allows it) and returns how many frames it accepted; the
rest are dropped and counted by the backend, as a NIC drops on a full ring.
"""
from __future__ import annotations

import fcntl
import socket
import struct
from typing import Protocol

#: The interface MTU the backends size their buffers for (IPv4 packet bytes).
MTU = 1500
#: Largest frame that carries an MTU-sized packet: Ethernet header and one
#: 802.1Q tag (no FCS: devices strip it).
MAX_FRAME_LEN = 14 + 4 + MTU
#: Payload bytes of the largest segment a backend hands the device to cut:
#: what fits in one IPv4 packet behind the largest TCP header.
GSO_MAX_SIZE = 65535 - 20 - 60


_SIOCGIFINDEX = 0x8933


def interface_index(name: str) -> int:
    """The index of the interface `name` in the current network namespace;
    OSError if there is none.  socket.if_nametoindex where the Python has it
    (PyPy 3.9, which may run the stack, has not), else the ioctl it wraps."""
    if hasattr(socket, "if_nametoindex"):
        return socket.if_nametoindex(name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = fcntl.ioctl(sock.fileno(), _SIOCGIFINDEX, struct.pack("16si20x", name.encode(), 0))
    return struct.unpack_from("i", ifreq, 16)[0]


class PacketIOError(Exception):
    """A backend cannot be opened (missing device, missing privilege, ...)."""


class PacketIO(Protocol):
    mac: bytes
    #: Largest TCP payload of a mtcpshim.stack.wire.vnet.SegmentedFrame that
    #: send_batch takes, for the device to cut into MSS pieces; 0: none.
    gso_max_size: int

    def fileno(self) -> int:
        ...

    def recv_batch(self, max_frames: int) -> list[bytes]:
        ...

    def send_batch(self, frames: list) -> int:
        ...

    def device_error(self) -> str | None:
        """poll() reported an error on fileno(): clear it, and say why the
        device is gone for good, or None if it is still there."""
        ...

    def close(self) -> None:
        ...
