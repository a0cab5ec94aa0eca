"""C versions of the stack's per-byte work, with pure-Python fallbacks.

`ACCELERATED` says which is active: True when the cffi module `mtcpshim.stack._netfast`
is built (pip install -e .), False when this module fell back
to `mtcpshim.stack.checksum` and `mtcpshim.stack.siphash`.  `ones_complement_sum`,
`internet_checksum` and `siphash24` have the signatures of their counterparts
there in both cases.

`copy_guarded` copies in both cases (only C survives a truncated file).
`new_tcb`, `attach_rx_sink` and `TCB_NUMBERS` exist in both cases (the TCB is
declared from its header even without the module).
`match_tcp_frame`, `complete_checksum`, `build_tcp_frame`, `FrameArena`,
`build_tcp_headers` and `send_parts` exist only when ACCELERATED; the Interface and the packet socket use them for
their per-segment paths, and the Interface has a Python route for everything
the first three do.
"""
from __future__ import annotations

import pathlib

from mtcpshim.stack import checksum, siphash

try:
    from mtcpshim.stack._netfast import ffi, lib
except ImportError:
    ffi = lib = None

ACCELERATED = lib is not None

# The TCB (stack/csrc/fastpath.h) exists without the C module too, declared
# from the same header, so that the core has one layout either way.
if ACCELERATED:
    _tcb_ffi = ffi
else:
    import cffi
    _tcb_ffi = cffi.FFI()
    _tcb_ffi.cdef((pathlib.Path(__file__).resolve().parent / "csrc" / "fastpath.h").read_text())

#: The TCB's fields that TcpConnection keeps as attributes (all but the fast path's own fp_ ones).
TCB_NUMBERS = tuple(name for name, _ in _tcb_ffi.typeof("struct nf_tcb").fields if not name.startswith("fp_"))
_RX_WRITE = "int64_t (*)(void *, const void *, uint64_t)"


def new_tcb():
    """A zeroed struct nf_tcb, freed with the last reference to it."""
    return _tcb_ffi.new("struct nf_tcb *")


def new_bytes(size: int):
    """`size` zeroed bytes that never move (C may keep their address)."""
    return _tcb_ffi.new("uint8_t[]", size)


def buffer_of(data):
    return _tcb_ffi.buffer(data)


def new_byte_ring(data, capacity: int):
    """An empty struct nf_byte_ring over `data` (from new_bytes)."""
    return _tcb_ffi.new("struct nf_byte_ring *", {"data": data, "capacity": capacity})


def address_of(pointer) -> int:
    return int(_tcb_ffi.cast("uintptr_t", pointer))


#: The fp_rx_write of a struct nf_byte_ring; 0 (no fast path) without the C module.
BYTE_RING_WRITE = address_of(_tcb_ffi.addressof(lib, "nf_byte_ring_write")) if ACCELERATED else 0


def attach_rx_sink(tcb, write_address: int, sink_address: int) -> None:
    """Names the function (an address, 0 for none) through which the fast
    path appends to the connection's receive buffer, and its argument."""
    tcb.fp_rx_write = _tcb_ffi.cast(_RX_WRITE, write_address)
    tcb.fp_rx_sink = _tcb_ffi.cast("void *", sink_address)


#: Bytes of Ethernet + IPv4 header the frame builders put before a segment.
TCP_FRAME_HEADROOM = 34

if ACCELERATED:
    _from_buffer = ffi.from_buffer
    _sum = lib.nf_ones_complement_sum
    _match = lib.nf_match_tcp_frame
    _build_frame = lib.nf_build_tcp_frame
    _build_headers = lib.nf_build_tcp_headers
    _send_parts = lib.nf_send_parts
    _siphash = lib.nf_siphash24
    _NULL = ffi.NULL

    def ones_complement_sum(data, initial: int = 0) -> int:
        # cffi passes bytes without a copy; other buffers need a view first.
        if type(data) is not bytes:
            data = _from_buffer(data)
        return _sum(data, len(data), initial)

    def internet_checksum(data, initial: int = 0) -> int:
        if type(data) is not bytes:
            data = _from_buffer(data)
        return ~_sum(data, len(data), initial) & 0xFFFF

    def siphash24(key: bytes, data: bytes) -> int:
        if len(key) != 16:
            raise ValueError("SipHash takes a 128-bit key")
        return _siphash(key, data, len(data))

    def match_tcp_frame(frame, our_mac: bytes, our_ip: int, checksum_vouched: bool = False) -> int:
        """`src_ip << 32 | tcp_offset << 16 | tcp_len` for a valid TCP frame
        to us (checksums included, the TCP one unless the device vouched
        for it), else 0.  See netfast.h."""
        if type(frame) is not bytes:
            frame = _from_buffer(frame)
        return _match(frame, len(frame), our_mac, our_ip, checksum_vouched)

    def complete_checksum(frame: bytearray) -> bool:
        """Fill in the TCP/UDP checksum a sender left to offload, in place."""
        return bool(lib.nf_complete_checksum(_from_buffer(frame), len(frame)))

    def build_tcp_frame(dst_mac: bytes, src_mac: bytes, src_ip: int, dst_ip: int,
                        ident: int, header: bytes, payload) -> bytearray:
        """Ethernet + IPv4 + the TCP `header` + `payload` in one new
        buffer, both checksums computed (the header's own checksum field is
        ignored).  The payload is copied once, into the frame."""
        payload_len = len(payload)
        _check_segment(len(header), payload_len)
        if type(payload) is not bytes:
            payload = _from_buffer(payload)
        frame = bytearray(TCP_FRAME_HEADROOM + len(header) + payload_len)
        _build_frame(_from_buffer(frame), dst_mac, src_mac, src_ip, dst_ip, ident,
                     header, len(header), payload, payload_len)
        return frame

    class FrameArena:
        """Frames built one after another in one buffer that is used again
        from the start after each `reuse()`: a frame costs no allocation,
        and a batch is sent from where it was built.  A frame is a view,
        valid until the next `reuse()`; one that must outlive it (waiting
        for ARP, held by a fault injector) is copied by whoever keeps it.
        Past the end of the buffer, frames get buffers of their own."""

        __slots__ = ("_base", "_view", "_size", "_used")

        def __init__(self, size: int):
            self._base = ffi.new("uint8_t[]", size)
            self._view = memoryview(ffi.buffer(self._base))
            self._size = size
            self._used = 0

        def reuse(self) -> None:
            """Every frame built so far has been sent, copied or dropped."""
            self._used = 0

        def build_tcp_frame(self, dst_mac: bytes, src_mac: bytes, src_ip: int, dst_ip: int,
                            ident: int, header: bytes, payload):
            """`build_tcp_frame`, in the arena."""
            payload_len = len(payload)
            at = self._used
            end = at + TCP_FRAME_HEADROOM + len(header) + payload_len
            if end > self._size:
                return build_tcp_frame(dst_mac, src_mac, src_ip, dst_ip, ident, header, payload)
            _check_segment(len(header), payload_len)
            if type(payload) is not bytes:
                payload = _from_buffer(payload)
            _build_frame(self._base + at, dst_mac, src_mac, src_ip, dst_ip, ident,
                         header, len(header), payload, payload_len)
            self._used = end
            return self._view[at:end]

    def build_tcp_headers(dst_mac: bytes, src_mac: bytes, src_ip: int, dst_ip: int,
                          ident: int, header: bytes, payload_len: int) -> bytearray:
        """The Ethernet, IPv4 and TCP headers of a frame whose `payload_len`
        payload bytes follow them in a gather send; the TCP checksum is left
        partial, for the device to complete."""
        _check_segment(len(header), payload_len)
        headers = bytearray(TCP_FRAME_HEADROOM + len(header))
        _build_headers(_from_buffer(headers), dst_mac, src_mac, src_ip, dst_ip, ident,
                       header, len(header), _NULL, payload_len, True)
        return headers

    MAX_PARTS = lib.NF_MAX_PARTS

    def send_parts(fd: int, address: bytes, parts) -> int:
        """sendmsg of one datagram gathered from the buffers `parts` (at most
        MAX_PARTS), no copy in user space: the bytes sent, or -errno."""
        return _send_parts(fd, address, len(address), [_from_buffer("uint8_t[]", part) for part in parts],
                           [len(part) for part in parts], len(parts))

    def copy_guarded(data) -> bytes | None:
        """bytes(data), or None if `data` lies in a file mapping whose file
        was truncated under it (a read that would raise SIGBUS)."""
        out = bytearray(len(data))
        if lib.nf_copy_guarded(_from_buffer(out), _from_buffer(data), len(data)):
            return None
        return bytes(out)

    def _check_segment(header_len: int, payload_len: int) -> None:
        if not 20 <= header_len <= 60 or header_len + payload_len > 65515:
            raise ValueError(f"TCP segment of {header_len} + {payload_len} bytes")
else:
    def copy_guarded(data) -> bytes | None:
        return bytes(data)   # no file mappings without the C module (no gather sends)

    ones_complement_sum = checksum.ones_complement_sum
    internet_checksum = checksum.internet_checksum
    siphash24 = siphash.siphash24
