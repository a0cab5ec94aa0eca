"""The interface every packet I/O backend implements.

A backend moves whole Ethernet frames.  `recv_batch` never blocks: the
runtime sleeps in poll() on `filenos()` and drains what is there.  The
frames it returns may be views of the device's ring, valid until the next
`recv_batch`: whatever keeps a frame longer copies it.  `rx_vouched` then
says which of them the device vouches for (see PacketIO).
`send_batch` hands a batch to the device with one flush (one system call
where the device allows it) and returns how many frames it accepted; the
rest are dropped and counted by the backend, as a NIC drops on a full ring.
"""
from __future__ import annotations

import ctypes
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


# Legacy ethtool ioctls (linux/ethtool.h), the interface the ethtool tool
# uses; reading a feature needs no privilege.
SIOCETHTOOL = 0x8946
ETHTOOL_GTSO = 0x1E


def ethtool_value(sock: socket.socket, ifname: str, command: int, data: int = 0) -> int:
    """One ETHTOOL_G*/S* command with a struct ethtool_value on `ifname`
    in the namespace `sock` was opened in; OSError if the device refuses."""
    value = (ctypes.c_uint32 * 2)(command, data)  # struct ethtool_value {cmd; data}
    # struct ifreq: name, then ifr_data pointing at the ethtool_value.
    ifreq = struct.pack("16sP", ifname.encode(), ctypes.addressof(value)).ljust(40, b"\0")
    fcntl.ioctl(sock, SIOCETHTOOL, ifreq)
    return value[1]


def device_segments(ifname: str) -> bool:
    """Whether `ifname` (in the current network namespace) takes TCP
    segmentation offload frames as they are: TSO on, so they leave whole
    (a veth carries them across, a NIC cuts them in hardware).  With TSO off
    the kernel cuts each one in software before the wire sees it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            return bool(ethtool_value(sock, ifname, ETHTOOL_GTSO))
        except OSError:
            return False


class PacketIOError(Exception):
    """A backend cannot be opened (missing device, missing privilege, ...)."""


class PacketIO(Protocol):
    mac: bytes
    #: Largest TCP payload of a mtcpshim.stack.wire.vnet.SegmentedFrame that
    #: send_batch takes, for the device to cut into MSS pieces; 0: none.
    gso_max_size: int
    #: Whether such a frame leaves the device whole (base.device_segments).
    device_segments: bool
    #: Whether send_batch hands a SegmentedFrame's payload to the kernel by a
    #: gather send without reading it: then it may be a view of a program's
    #: file (sendfile spans, mtcpshim/shmbuf.py), which only the kernel may read.
    gathers_payload: bool
    #: For the last recv_batch: one flag per frame, set where the device
    #: vouches for the TCP checksum (a local sender's offload frame, or one
    #: the NIC verified), so it is not summed again, as the kernel does not;
    #: that field may then hold only the pseudo-header sum.  None: no frame.
    rx_vouched: bytes | None

    def filenos(self) -> tuple[int, ...]:
        """What the loop polls: readable when frames wait, POLLERR when the
        device is in trouble (then device_error)."""
        ...

    def recv_batch(self, max_frames: int) -> list[bytes]:
        ...

    def send_batch(self, frames: list) -> int:
        ...

    def device_error(self) -> str | None:
        """poll() reported an error on one of filenos(): clear it, and say why the
        device is gone for good, or None if it is still there."""
        ...

    def close(self) -> None:
        ...
