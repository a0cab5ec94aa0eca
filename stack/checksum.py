"""RFC 1071 Internet checksum.

`ones_complement_sum(data, initial)` adds `data`'s 16-bit big-endian words to
the partial sum `initial` and folds the carries; `internet_checksum` returns
the complement of that, ready to store in a header.  Use `pseudo_header_sum`
to seed a TCP/UDP checksum.  `mtcpshim.stack.native` replaces these with C versions
of the same signatures when the cffi module is built.
"""
import sys


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ones_complement_sum(data, initial: int = 0) -> int:
    data = bytes(data)
    if len(data) & 1:
        data += b"\0"
    # One's-complement sums do not depend on byte order (RFC 1071 2(B)):
    # sum native-order words, then swap the folded result if native is little.
    total = _fold(sum(memoryview(data).cast("H")))
    if sys.byteorder == "little":
        total = ((total & 0xFF) << 8) | (total >> 8)
    return _fold(total + initial)


def internet_checksum(data, initial: int = 0) -> int:
    return ~ones_complement_sum(data, initial) & 0xFFFF


def pseudo_header_sum(src_ip: int, dst_ip: int, protocol: int, length: int) -> int:
    """Partial sum of the IPv4 pseudo-header (addresses as host-order ints)."""
    return _fold((src_ip >> 16) + (src_ip & 0xFFFF) + (dst_ip >> 16)
                 + (dst_ip & 0xFFFF) + protocol + length)
