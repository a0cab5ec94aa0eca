"""TAP backend: frames through /dev/net/tun (IFF_TAP | IFF_NO_PI).

The tap device is the kernel's end of a virtual wire and this object the
other end, so the stack needs a MAC of its own: pass one, or a random
locally administered address is chosen.  The device exists while this object
is open; the caller brings it up and configures its addresses and routes.
TAP has no batch call: `send_batch` writes one frame per write().

Offloads: the TAP carries a virtio_net_hdr per frame (IFF_VNET_HDR) and
takes checksum offload and TSO (TUNSETOFFLOAD), so the kernel hands over
merged frames of up to 64 KB with their checksums left partial, and takes
SegmentedFrames to cut.  Each received header is checked
(mtcpshim.stack.wire.vnet.received_frame); a bad one drops its frame, counted under
the WireError's reason.
"""
from __future__ import annotations

import errno
import fcntl
import os
import secrets
import struct

from mtcpshim.stack.io.base import GSO_MAX_SIZE, PacketIOError
from mtcpshim.stack.wire import vnet
from mtcpshim.stack.wire.errors import WireError

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_TUNSETOFFLOAD = 0x400454D0
_TUN_F_CSUM = 0x01
_TUN_F_TSO4 = 0x02
# A vnet header and the largest frame the kernel merges: an IPv4 packet of
# 64 KB behind an Ethernet header and one VLAN tag.
_READ_SIZE = vnet.HEADER.size + 14 + 4 + 65535
_IFNAMSIZ = 16


def random_local_mac() -> bytes:
    """A random unicast, locally administered MAC (02:xx:xx:xx:xx:xx family)."""
    first = (secrets.randbits(8) & 0xFC) | 0x02
    return bytes([first]) + secrets.token_bytes(5)


class TapIO:
    gso_max_size = GSO_MAX_SIZE
    # Frames go on through the kernel's bridge, which may cut them: count
    # them as cut (base.device_segments).
    device_segments = False
    gathers_payload = False

    def __init__(self, name: str, mac: bytes | None = None):
        if len(name.encode()) >= _IFNAMSIZ:
            raise PacketIOError(f"interface name too long: {name}")
        try:
            self._fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PacketIOError("/dev/net/tun is missing (no tun module?)") from None
        except PermissionError:
            raise PacketIOError("opening /dev/net/tun needs CAP_NET_ADMIN") from None
        try:
            ifreq = fcntl.ioctl(self._fd, _TUNSETIFF,
                                struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
            fcntl.ioctl(self._fd, _TUNSETOFFLOAD, _TUN_F_CSUM | _TUN_F_TSO4)
        except OSError as error:
            os.close(self._fd)
            if error.errno == errno.EPERM:
                raise PacketIOError(f"creating tap {name} needs CAP_NET_ADMIN") from None
            if error.errno == errno.EBUSY:
                raise PacketIOError(f"tap {name} is in use (or not a tap)") from None
            raise
        self.name = ifreq[:_IFNAMSIZ].rstrip(b"\0").decode()
        self.mac = random_local_mac() if mac is None else bytes(mac)
        self._tx_dropped = 0
        self._tx_segmented = 0
        self._rx_dropped: dict[str, int] = {}

    def filenos(self) -> tuple[int]:
        return (self._fd,)

    #: vnet.received_frame completes every partial checksum.
    rx_vouched = None

    def recv_batch(self, max_frames: int) -> list[bytes]:
        frames = []
        for _ in range(max_frames):
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                break
            try:
                frames.append(vnet.received_frame(data))
            except WireError as error:
                self._rx_dropped[error.reason] = self._rx_dropped.get(error.reason, 0) + 1
        return frames

    def send_batch(self, frames: list) -> int:
        for sent, frame in enumerate(frames):
            segmented = type(frame) is vnet.SegmentedFrame
            parts = ((frame.vnet_header(), frame.headers, frame.payload) if segmented
                     else (vnet.NO_OFFLOAD, frame))
            try:
                _write_frame(self._fd, parts)
            except BlockingIOError:
                self._tx_dropped += len(frames) - sent
                return sent
            self._tx_segmented += segmented
        return len(frames)

    def device_error(self) -> str | None:
        return f"TAP device {self.name} was removed"  # a TAP fd reports errors only once detached

    def counters(self) -> dict[str, int]:
        return {"tx_dropped": self._tx_dropped, "tx_segmented": self._tx_segmented, **self._rx_dropped}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "TapIO":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _write_frame(fd: int, parts) -> None:
    """One frame, virtio_net_hdr first, in one write: a TAP device takes a
    packet per write.  PyPy 3.9, which may run the stack, has no writev."""
    if _writev is not None:
        _writev(fd, parts)
    else:
        os.write(fd, b"".join(parts))


_writev = getattr(os, "writev", None)
