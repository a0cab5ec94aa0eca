"""struct virtio_net_hdr: the segmentation and checksum metadata that a
packet socket with PACKET_VNET_HDR (or a TAP with IFF_VNET_HDR) carries in
front of each frame, 10 bytes in the host's byte order (little-endian on
every machine this runs on: the kernel's legacy virtio rule).

The stack sends a TCP segment longer than the MSS as one `SegmentedFrame`:
the device (or the kernel in software, or nobody on a veth, where the frame
crosses whole) cuts it into `gso_size`-byte pieces and completes their
checksums, as TSO does for the kernel's own TCP.
"""
import struct

F_NEEDS_CSUM = 1               # checksum from csum_start, stored at csum_start + csum_offset
GSO_NONE = 0
GSO_TCPV4 = 1

HEADER = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
NO_OFFLOAD = HEADER.pack(0, GSO_NONE, 0, 0, 0, 0)

_ETH_IPV4_HEADER_LEN = 34      # where the TCP header starts in the stack's frames
_TCP_CHECKSUM_AT = 16
_TCP_DATA_OFFSET_AT = _ETH_IPV4_HEADER_LEN + 12


class SegmentedFrame(bytearray):
    """An Ethernet + IPv4 (no options) + TCP frame whose payload is cut into
    `gso_size`-byte segments on the way out.  Its TCP checksum field holds
    only the pseudo-header sum (CHECKSUM_PARTIAL): each cut segment's
    checksum is completed by whoever cuts it."""

    __slots__ = ("gso_size",)

    def vnet_header(self) -> bytes:
        headers = _ETH_IPV4_HEADER_LEN + (self[_TCP_DATA_OFFSET_AT] >> 4) * 4
        return HEADER.pack(F_NEEDS_CSUM, GSO_TCPV4, headers, self.gso_size,
                           _ETH_IPV4_HEADER_LEN, _TCP_CHECKSUM_AT)
