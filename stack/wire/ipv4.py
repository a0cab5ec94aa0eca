"""IPv4 header (RFC 791).

`parse` validates version, header length, total length and the header
checksum, and returns the header with a view of the payload (Ethernet padding
cut off).  Fragments parse fine and say so in `is_fragment`: the stack does
not reassemble, the interface drops them.  `emit` writes the checksum; the
defaults are what the stack sends: TTL 64, DF set, no options.
"""
import ipaddress
import struct
from dataclasses import dataclass

from mtcpshim.stack.native import internet_checksum
from mtcpshim.stack.wire import SLOTS
from mtcpshim.stack.wire.errors import WireError

HEADER_LEN = 20
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
DEFAULT_TTL = 64

_FLAG_DF = 0x4000
_FLAG_MF = 0x2000
_OFFSET_MASK = 0x1FFF
# version/IHL, TOS, total length, identification, flags/fragment offset,
# TTL, protocol, checksum, source, destination
_HEADER = struct.Struct("!BBHHHBBHII")
_HEADER_CHECKSUM = struct.Struct("!H")


@dataclass(**SLOTS)
class Ipv4Header:
    src: int
    dst: int
    protocol: int
    ident: int = 0
    ttl: int = DEFAULT_TTL
    dont_fragment: bool = True
    more_fragments: bool = False
    fragment_offset: int = 0    # in 8-byte units, as on the wire
    tos: int = 0
    options: bytes = b""

    @property
    def is_fragment(self) -> bool:
        return self.more_fragments or self.fragment_offset != 0

    @classmethod
    def parse(cls, packet) -> tuple["Ipv4Header", memoryview]:
        length = len(packet)
        if length < HEADER_LEN:
            raise WireError("ipv4_truncated", f"{length} bytes")
        (version_ihl, tos, total_len, ident, flags_offset, ttl, protocol, _,
         src, dst) = _HEADER.unpack_from(packet)
        if version_ihl >> 4 != 4:
            raise WireError("ipv4_bad_version", str(version_ihl >> 4))
        header_len = (version_ihl & 0x0F) * 4
        if header_len < HEADER_LEN:
            raise WireError("ipv4_bad_header_len", str(header_len))
        if header_len > length:
            raise WireError("ipv4_truncated", f"header {header_len} of {length} bytes")
        if not header_len <= total_len <= length:
            raise WireError("ipv4_bad_total_len", f"{total_len} in {length} bytes")
        view = memoryview(packet)
        if internet_checksum(view[:header_len]):
            raise WireError("ipv4_bad_checksum")
        header = cls(src, dst, protocol, ident, ttl, bool(flags_offset & _FLAG_DF),
                     bool(flags_offset & _FLAG_MF), flags_offset & _OFFSET_MASK, tos,
                     bytes(view[HEADER_LEN:header_len]))
        return header, view[header_len:total_len]

    def emit(self, payload=b"") -> bytes:
        """Header (checksum filled in) followed by `payload`."""
        if len(self.options) % 4 or len(self.options) > 40:
            raise ValueError(f"IPv4 options of {len(self.options)} bytes")
        header_len = HEADER_LEN + len(self.options)
        flags_offset = ((_FLAG_DF if self.dont_fragment else 0)
                        | (_FLAG_MF if self.more_fragments else 0) | self.fragment_offset)
        header = bytearray(header_len)
        _HEADER.pack_into(header, 0, 0x40 | header_len // 4, self.tos,
                          header_len + len(payload), self.ident, flags_offset, self.ttl,
                          self.protocol, 0, self.src, self.dst)
        header[HEADER_LEN:] = self.options
        _HEADER_CHECKSUM.pack_into(header, 10, internet_checksum(header))
        return bytes(header) + payload

    def __repr__(self) -> str:
        fragment = (f", fragment offset {self.fragment_offset * 8}"
                    f"{' MF' if self.more_fragments else ''}") if self.is_fragment else ""
        return (f"Ipv4Header({ipaddress.IPv4Address(self.src)} > "
                f"{ipaddress.IPv4Address(self.dst)}, proto {self.protocol}, "
                f"id {self.ident}, ttl {self.ttl}{fragment})")

