"""struct virtio_net_hdr: the segmentation and checksum metadata that a
packet socket with PACKET_VNET_HDR (or a TAP with IFF_VNET_HDR) carries in
front of each frame, 10 bytes in the host's byte order (little-endian on
every machine this runs on: the kernel's legacy virtio rule).

Transmit: the stack sends a TCP segment longer than the MSS as one
`SegmentedFrame`: the device (or the kernel in software, or nobody on a
veth, where the frame crosses whole) cuts it into `gso_size`-byte pieces and
completes their checksums, as TSO does for the kernel's own TCP.

Receive: `received_frame` checks a header the kernel put in front of a frame
(GRO-merged or from a local sender that left its checksum to offload) and
returns the frame as it would look on a wire.  The header is input like any
packet: offsets outside the frame, unknown flags or GSO kinds raise
WireError.
"""
from __future__ import annotations

import struct

from mtcpshim.stack import native
from mtcpshim.stack.wire.errors import WireError
from mtcpshim.stack.wire.tcp import CWR, FIN, PSH

F_NEEDS_CSUM = 1               # checksum from csum_start, stored at csum_start + csum_offset
F_DATA_VALID = 2               # the checksum was verified already
GSO_NONE = 0
GSO_TCPV4 = 1

HEADER = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
NO_OFFLOAD = HEADER.pack(0, GSO_NONE, 0, 0, 0, 0)

_ETH_IPV4_HEADER_LEN = 34      # where the TCP header starts in the stack's frames
_ETH_HEADER_LEN = 14
_GSO_ECN = 0x80                # a flag on gso_type: the segments carry ECN bits
_TCP_CHECKSUM_AT = 16
_TCP_FLAGS_AT = 13
_IDENT = struct.Struct("!H")
_ADDRESSES = struct.Struct("!II")
_SEQ = struct.Struct("!I")


class PayloadParts:
    """A payload in the pieces where its bytes lie (the send ring, a
    program's file: mtcpshim/shmbuf.py), for a gather send; `len` is the
    whole.  Only `joined` reads the pieces in user space, guarded."""

    __slots__ = ("parts", "_length")

    def __init__(self, parts: tuple):
        self.parts = parts
        self._length = sum(map(len, parts))

    def __len__(self) -> int:
        return self._length

    def joined(self) -> bytes | None:
        """The bytes in one piece; None if a piece lies in a file that was
        truncated under it."""
        copies = [native.copy_guarded(part) for part in self.parts]
        return None if None in copies else b"".join(copies)


class SegmentedFrame:
    """An Ethernet + IPv4 (no options) + TCP frame whose payload is cut into
    `gso_size`-byte segments on the way out, kept in two parts for a gather
    send: `headers` (all three, built for it) and `payload` (a view of the
    bytes where they already are, the send ring, or PayloadParts).  The TCP checksum field
    holds only the pseudo-header sum (CHECKSUM_PARTIAL): each cut segment's
    checksum is completed by whoever cuts it.

    The payload view stays valid for as long as the loop that built the
    frame runs: the application refills ring bytes only once the peer has
    acknowledged them.  Whatever keeps a frame longer takes `detached()`."""

    __slots__ = ("headers", "payload", "gso_size")

    def __init__(self, headers: bytearray, payload, gso_size: int):
        self.headers = headers
        self.payload = payload
        self.gso_size = gso_size

    def vnet_header(self) -> bytes:
        return HEADER.pack(F_NEEDS_CSUM, GSO_TCPV4, len(self.headers), self.gso_size,
                           _ETH_IPV4_HEADER_LEN, _TCP_CHECKSUM_AT)

    def detached(self) -> "SegmentedFrame | None":
        """The same frame with its own copy of the payload; None if the
        payload is a view of a file that was truncated under it (a sendfile
        span, mtcpshim/shmbuf.py)."""
        payload = self.payload
        payload = payload.joined() if type(payload) is PayloadParts else native.copy_guarded(payload)
        return None if payload is None else SegmentedFrame(bytearray(self.headers), payload, self.gso_size)

    def cut(self) -> list:
        """The wire frames a device cuts this one into, each complete
        (IPv4 identification counting up from this frame's, as Linux's GSO
        does; PSH and FIN on the last piece only, CWR on the first only):
        what to hand a path that cannot take the frame whole."""
        headers = self.headers
        dst_mac, src_mac = bytes(headers[0:6]), bytes(headers[6:12])
        (ident,) = _IDENT.unpack_from(headers, _ETH_HEADER_LEN + 4)
        src_ip, dst_ip = _ADDRESSES.unpack_from(headers, _ETH_HEADER_LEN + 12)
        tcp = bytearray(headers[_ETH_IPV4_HEADER_LEN:])
        (seq,) = _SEQ.unpack_from(tcp, 4)
        flags = tcp[_TCP_FLAGS_AT]
        payload, size = self._payload_bytes(), self.gso_size
        pieces = []
        for index, offset in enumerate(range(0, len(payload), size)):
            _SEQ.pack_into(tcp, 4, (seq + offset) & 0xFFFFFFFF)
            piece_flags = flags if offset + size >= len(payload) else flags & ~(FIN | PSH)
            tcp[_TCP_FLAGS_AT] = piece_flags & ~CWR if index else piece_flags
            pieces.append(native.build_tcp_frame(dst_mac, src_mac, src_ip, dst_ip, (ident + index) & 0xFFFF,
                                                 bytes(tcp), payload[offset:offset + size]))
        return pieces

    def __len__(self) -> int:
        return len(self.headers) + len(self.payload)

    def __bytes__(self) -> bytes:
        return bytes(self.headers) + self._payload_bytes()

    def _payload_bytes(self):
        payload = self.payload
        return b"".join(map(bytes, payload.parts)) if type(payload) is PayloadParts else bytes(payload)

    def __eq__(self, other):
        if not isinstance(other, SegmentedFrame):
            return NotImplemented
        return self.gso_size == other.gso_size and bytes(self) == bytes(other)

    __hash__ = None


def received_frame(data):
    """The frame after the header in `data` (bytes from the device), with
    its partial checksum completed.  Raises WireError ("vnet_truncated",
    "vnet_bad_flags", "vnet_bad_gso", "vnet_bad_csum_offset")."""
    if len(data) < HEADER.size + _ETH_HEADER_LEN:
        raise WireError("vnet_truncated", f"{len(data)} bytes")
    flags, gso_type, _, gso_size, csum_start, csum_offset = HEADER.unpack_from(data)
    if flags & ~(F_NEEDS_CSUM | F_DATA_VALID):
        raise WireError("vnet_bad_flags", f"flags {flags:#x}")
    frame_len = len(data) - HEADER.size
    kind = gso_type & ~_GSO_ECN
    if kind == GSO_TCPV4:
        # Merged segments: the stack takes the whole, so only the size has to
        # be sane (the kernel would refuse to cut by 0).
        if not gso_size or not flags & F_NEEDS_CSUM and not flags & F_DATA_VALID:
            raise WireError("vnet_bad_gso", f"TCPv4 gso_size {gso_size}, flags {flags:#x}")
    elif kind != GSO_NONE:
        raise WireError("vnet_bad_gso", f"gso_type {gso_type:#x}")
    if not flags & F_NEEDS_CSUM:
        return memoryview(data)[HEADER.size:]
    at = csum_start + csum_offset
    if csum_start < _ETH_HEADER_LEN or at + 2 > frame_len:
        raise WireError("vnet_bad_csum_offset",
                        f"csum_start {csum_start} + offset {csum_offset} in {frame_len} bytes")
    frame = bytearray(memoryview(data)[HEADER.size:])
    # The field holds the pseudo-header sum; the sum from csum_start on,
    # complemented, is the checksum (what a NIC does with CHECKSUM_PARTIAL).
    checksum = native.internet_checksum(memoryview(frame)[csum_start:])
    frame[at:at + 2] = checksum.to_bytes(2, "big")
    return frame
