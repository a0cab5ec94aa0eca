"""ARP for IPv4 over Ethernet (RFC 826): requests and replies."""
import ipaddress
import struct
from dataclasses import dataclass

from mtcpshim.stack.wire import SLOTS
from mtcpshim.stack.wire.errors import WireError
from mtcpshim.stack.wire.ethernet import mac_to_str

PACKET_LEN = 28
OP_REQUEST = 1
OP_REPLY = 2
UNKNOWN_MAC = b"\0" * 6

_HARDWARE_ETHERNET = 1
_PROTOCOL_IPV4 = 0x0800
# hardware type, protocol type, address lengths (6, 4), operation,
# sender MAC, sender IP, target MAC, target IP
_PACKET = struct.Struct("!HHBBH6sI6sI")


@dataclass(**SLOTS)
class ArpPacket:
    operation: int
    sender_mac: bytes
    sender_ip: int
    target_mac: bytes
    target_ip: int

    @classmethod
    def parse(cls, data) -> "ArpPacket":
        """Validates an ARP packet; trailing bytes (Ethernet padding) are ignored."""
        if len(data) < PACKET_LEN:
            raise WireError("arp_truncated", f"{len(data)} bytes")
        (hardware, protocol, hardware_len, protocol_len, operation, sender_mac,
         sender_ip, target_mac, target_ip) = _PACKET.unpack_from(data)
        if (hardware, protocol, hardware_len, protocol_len) != (
                _HARDWARE_ETHERNET, _PROTOCOL_IPV4, 6, 4):
            raise WireError("arp_unsupported",
                            f"hardware {hardware} protocol 0x{protocol:04x}")
        if operation not in (OP_REQUEST, OP_REPLY):
            raise WireError("arp_bad_operation", str(operation))
        return cls(operation, sender_mac, sender_ip, target_mac, target_ip)

    def emit(self) -> bytes:
        return _PACKET.pack(_HARDWARE_ETHERNET, _PROTOCOL_IPV4, 6, 4, self.operation,
                            self.sender_mac, self.sender_ip, self.target_mac, self.target_ip)

    def __repr__(self) -> str:
        target = ipaddress.IPv4Address(self.target_ip)
        sender = ipaddress.IPv4Address(self.sender_ip)
        if self.operation == OP_REQUEST:
            return f"ArpPacket(who-has {target} tell {sender} {mac_to_str(self.sender_mac)})"
        return f"ArpPacket({sender} is-at {mac_to_str(self.sender_mac)} to {target})"
