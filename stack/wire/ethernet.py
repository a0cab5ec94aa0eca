"""Ethernet II header: destination, source, EtherType (no 802.1Q tags)."""
import struct
from dataclasses import dataclass

from mtcpshim.stack.wire import SLOTS
from mtcpshim.stack.wire.errors import WireError

HEADER_LEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
BROADCAST = b"\xff" * 6

_HEADER = struct.Struct("!6s6sH")


def mac_to_str(mac: bytes) -> str:
    return ":".join(f"{octet:02x}" for octet in mac)


def mac_from_str(text: str) -> bytes:
    mac = bytes(int(octet, 16) for octet in text.split(":"))
    if len(mac) != 6:
        raise ValueError(f"not a MAC address: {text!r}")
    return mac


@dataclass(**SLOTS)
class EthernetHeader:
    dst: bytes
    src: bytes
    ethertype: int

    @classmethod
    def parse(cls, frame) -> tuple["EthernetHeader", memoryview]:
        """The header and a view of the payload (padding included: the
        layer above knows its own length)."""
        if len(frame) < HEADER_LEN:
            raise WireError("eth_truncated", f"{len(frame)} bytes")
        return cls(*_HEADER.unpack_from(frame)), memoryview(frame)[HEADER_LEN:]

    def emit(self, payload=b"") -> bytes:
        return _HEADER.pack(self.dst, self.src, self.ethertype) + payload

    def __repr__(self) -> str:
        return (f"EthernetHeader({mac_to_str(self.src)} > {mac_to_str(self.dst)}, "
                f"type 0x{self.ethertype:04x})")
