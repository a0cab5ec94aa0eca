"""SipHash-2-4 (Aumasson and Bernstein, 2012): a keyed 64-bit hash, fast on
short inputs, that is a pseudorandom function while the 128-bit key stays
secret.  Linux keys its initial sequence numbers, timestamp offsets, port
offsets and SYN cookies with it; so does stack/isn.py.

This is the reference; `mtcpshim.stack.native.siphash24` is the C version
with the same signature when the cffi module is built.
"""
import struct

_M64 = (1 << 64) - 1
_WORDS = struct.Struct("<QQ")


def _rotl(x: int, bits: int) -> int:
    return ((x << bits) | (x >> (64 - bits))) & _M64


def _rounds(v0: int, v1: int, v2: int, v3: int, count: int):
    for _ in range(count):
        v0 = (v0 + v1) & _M64
        v1 = _rotl(v1, 13) ^ v0
        v0 = _rotl(v0, 32)
        v2 = (v2 + v3) & _M64
        v3 = _rotl(v3, 16) ^ v2
        v0 = (v0 + v3) & _M64
        v3 = _rotl(v3, 21) ^ v0
        v2 = (v2 + v1) & _M64
        v1 = _rotl(v1, 17) ^ v2
        v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def siphash24(key: bytes, data: bytes) -> int:
    """The 64-bit SipHash-2-4 of `data` under the 16-byte `key`."""
    if len(key) != 16:
        raise ValueError("SipHash takes a 128-bit key")
    k0, k1 = _WORDS.unpack(key)
    v0, v1 = k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D
    v2, v3 = k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573
    whole = len(data) & ~7
    for start in range(0, whole, 8):
        word = int.from_bytes(data[start:start + 8], "little")
        v3 ^= word
        v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 2)
        v0 ^= word
    # The last word: the leftover bytes, the length's low byte on top.
    word = int.from_bytes(data[whole:], "little") | (len(data) & 0xFF) << 56
    v3 ^= word
    v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 2)
    v0 ^= word
    v2 ^= 0xFF
    v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 4)
    return v0 ^ v1 ^ v2 ^ v3
