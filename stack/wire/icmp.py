"""ICMP echo request and reply (RFC 792), the only ICMP messages the stack
answers."""
import struct
from dataclasses import dataclass

from stack.fastpath import internet_checksum
from stack.wire.errors import WireError

HEADER_LEN = 8
TYPE_ECHO_REPLY = 0
TYPE_ECHO_REQUEST = 8

# type, code, checksum, identifier, sequence number
_HEADER = struct.Struct("!BBHHH")


@dataclass(slots=True)
class IcmpEcho:
    type: int
    ident: int
    seq: int
    data: bytes = b""

    @classmethod
    def parse(cls, message) -> "IcmpEcho":
        if len(message) < HEADER_LEN:
            raise WireError("icmp_truncated", f"{len(message)} bytes")
        if internet_checksum(message):
            raise WireError("icmp_bad_checksum")
        icmp_type, code, _, ident, seq = _HEADER.unpack_from(message)
        if icmp_type not in (TYPE_ECHO_REQUEST, TYPE_ECHO_REPLY):
            raise WireError("icmp_unsupported_type", str(icmp_type))
        if code != 0:
            raise WireError("icmp_bad_code", str(code))
        return cls(icmp_type, ident, seq, bytes(message[HEADER_LEN:]))

    def reply(self) -> "IcmpEcho":
        return IcmpEcho(TYPE_ECHO_REPLY, self.ident, self.seq, self.data)

    def emit(self) -> bytes:
        message = bytearray(_HEADER.pack(self.type, 0, 0, self.ident, self.seq) + self.data)
        message[2:4] = internet_checksum(message).to_bytes(2, "big")
        return bytes(message)
