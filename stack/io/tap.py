"""TAP backend: frames through /dev/net/tun (IFF_TAP | IFF_NO_PI).

The tap device is the kernel's end of a virtual wire and this object the
other end, so the stack needs a MAC of its own: pass one, or a random
locally administered address is chosen.  The device exists while this object
is open; the caller brings it up and configures its addresses and routes.
TAP has no batch call: `send_batch` writes one frame per write().
"""
import errno
import fcntl
import os
import secrets
import struct

from stack.io.base import MAX_FRAME_LEN, PacketIOError

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFNAMSIZ = 16


def random_local_mac() -> bytes:
    """A random unicast, locally administered MAC (02:xx:xx:xx:xx:xx family)."""
    first = (secrets.randbits(8) & 0xFC) | 0x02
    return bytes([first]) + secrets.token_bytes(5)


class TapIO:
    gso_max_size = 0
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
                                struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI))
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

    def fileno(self) -> int:
        return self._fd

    def recv_batch(self, max_frames: int) -> list[bytes]:
        frames = []
        for _ in range(max_frames):
            try:
                frames.append(os.read(self._fd, MAX_FRAME_LEN))
            except BlockingIOError:
                break
        return frames

    def send_batch(self, frames: list) -> int:
        for sent, frame in enumerate(frames):
            try:
                os.write(self._fd, frame)
            except BlockingIOError:
                self._tx_dropped += len(frames) - sent
                return sent
        return len(frames)

    def device_error(self) -> str | None:
        return f"TAP device {self.name} was removed"  # a TAP fd reports errors only once detached

    def counters(self) -> dict[str, int]:
        return {"tx_dropped": self._tx_dropped}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "TapIO":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
