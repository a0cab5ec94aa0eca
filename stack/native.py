"""C versions of the stack's per-byte work, with pure-Python fallbacks.

`ACCELERATED` says which is active: True when the cffi module `mtcpshim.stack._netfast`
is built (pip install -e .), False when this module fell back
to `mtcpshim.stack.checksum`.  `ones_complement_sum` and `internet_checksum` have the
signatures of their `mtcpshim.stack.checksum` counterparts in both cases.

`match_tcp_frame` and `build_tcp_frame` exist only when ACCELERATED; the
Interface uses them for its per-segment paths and has a Python route for
everything they do.
"""
from mtcpshim.stack import checksum

try:
    from mtcpshim.stack._netfast import ffi, lib
except ImportError:
    ffi = lib = None

ACCELERATED = lib is not None

#: Bytes of Ethernet + IPv4 header that build_tcp_frame puts before a segment.
TCP_FRAME_HEADROOM = 34

if ACCELERATED:
    _from_buffer = ffi.from_buffer
    _sum = lib.nf_ones_complement_sum
    _match = lib.nf_match_tcp_frame
    _build = lib.nf_build_tcp_frame

    def ones_complement_sum(data, initial: int = 0) -> int:
        # cffi passes bytes without a copy; other buffers need a view first.
        if type(data) is not bytes:
            data = _from_buffer(data)
        return _sum(data, len(data), initial)

    def internet_checksum(data, initial: int = 0) -> int:
        if type(data) is not bytes:
            data = _from_buffer(data)
        return ~_sum(data, len(data), initial) & 0xFFFF

    def match_tcp_frame(frame, our_mac: bytes, our_ip: int) -> int:
        """`src_ip << 32 | tcp_offset << 16 | tcp_len` for a valid TCP frame
        to us (checksums included), else 0.  See netfast.h."""
        if type(frame) is not bytes:
            frame = _from_buffer(frame)
        return _match(frame, len(frame), our_mac, our_ip)

    def build_tcp_frame(dst_mac: bytes, src_mac: bytes, src_ip: int, dst_ip: int,
                        ident: int, segment, frame_type=bytearray,
                        partial_checksum: bool = False) -> bytearray:
        """Ethernet + IPv4 + `segment` in one new `frame_type` buffer, both
        checksums computed (the segment's own checksum field is ignored).
        The segment is copied once, into the frame.  `partial_checksum`
        leaves the TCP checksum for the device to complete."""
        if not 20 <= len(segment) <= 65515:
            raise ValueError(f"TCP segment of {len(segment)} bytes")
        if type(segment) is not bytes:
            segment = _from_buffer(segment)
        frame = frame_type(TCP_FRAME_HEADROOM + len(segment))
        _build(_from_buffer(frame), dst_mac, src_mac, src_ip, dst_ip, ident,
               segment, len(segment), partial_checksum)
        return frame
else:
    ones_complement_sum = checksum.ones_complement_sum
    internet_checksum = checksum.internet_checksum
