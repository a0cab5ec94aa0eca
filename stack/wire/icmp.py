"""ICMP (RFC 792): echo request and reply, the only messages the stack
answers, and "fragmentation needed" (RFC 1191), the one error it acts on."""
import struct
from dataclasses import dataclass

from mtcpshim.stack.native import internet_checksum
from mtcpshim.stack.wire import SLOTS
from mtcpshim.stack.wire.errors import WireError
from mtcpshim.stack.wire.ipv4 import PROTO_TCP

HEADER_LEN = 8
TYPE_ECHO_REPLY = 0
TYPE_DEST_UNREACHABLE = 3
TYPE_ECHO_REQUEST = 8
CODE_FRAGMENTATION_NEEDED = 4

# type, code, checksum, identifier, sequence number; in "fragmentation
# needed" the last two are unused and the next-hop MTU (RFC 1191 section 4)
_HEADER = struct.Struct("!BBHHH")
# The quoted datagram's IPv4 header: version/IHL, flags/fragment offset,
# protocol, source, destination (the rest skipped).
_QUOTED_IPV4 = struct.Struct("!B5xH1xB2xII")
_QUOTED_IPV4_LEN = 20
_QUOTED_FRAGMENT_OFFSET = 0x1FFF
# The first 8 bytes of the quoted TCP header, all RFC 792 promises.
_QUOTED_TCP = struct.Struct("!HHI")


@dataclass(**SLOTS)
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


@dataclass(**SLOTS)
class FragmentationNeeded:
    """Destination unreachable, fragmentation needed and DF set (type 3
    code 4): a router dropped one of our datagrams, larger than `mtu`, the
    next hop's MTU (0 from routers older than RFC 1191).  The other fields
    come from the quoted datagram (its IPv4 header and the first 8 bytes of
    its TCP header) and name the segment it carried.  Whether that segment
    was ours is for the caller to decide: anyone can send this message."""

    mtu: int
    src_ip: int
    dst_ip: int
    src_port: int
    dst_port: int
    seq: int

    @classmethod
    def parse(cls, message) -> "FragmentationNeeded":
        length = len(message)
        if length < HEADER_LEN:
            raise WireError("icmp_truncated", f"{length} bytes")
        if internet_checksum(message):
            raise WireError("icmp_bad_checksum")
        icmp_type, code, _, _, mtu = _HEADER.unpack_from(message)
        if icmp_type != TYPE_DEST_UNREACHABLE:
            raise WireError("icmp_unsupported_type", str(icmp_type))
        if code != CODE_FRAGMENTATION_NEEDED:
            raise WireError("icmp_bad_code", str(code))
        if length < HEADER_LEN + _QUOTED_IPV4_LEN:
            raise WireError("icmp_quote_truncated", f"{length - HEADER_LEN} quoted bytes")
        version_ihl, flags_offset, protocol, src, dst = _QUOTED_IPV4.unpack_from(message, HEADER_LEN)
        quoted_header_len = (version_ihl & 0x0F) * 4
        if version_ihl >> 4 != 4 or quoted_header_len < _QUOTED_IPV4_LEN:
            raise WireError("icmp_quote_bad_ipv4", f"version/IHL {version_ihl:#04x}")
        if protocol != PROTO_TCP:
            raise WireError("icmp_quote_not_tcp", str(protocol))
        # A later fragment's first bytes are not a TCP header.
        if flags_offset & _QUOTED_FRAGMENT_OFFSET:
            raise WireError("icmp_quote_fragment")
        tcp_at = HEADER_LEN + quoted_header_len
        if length < tcp_at + _QUOTED_TCP.size:
            raise WireError("icmp_quote_truncated", f"{length - HEADER_LEN} quoted bytes")
        src_port, dst_port, seq = _QUOTED_TCP.unpack_from(message, tcp_at)
        return cls(mtu, src, dst, src_port, dst_port, seq)
