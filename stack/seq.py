"""TCP sequence-number arithmetic modulo 2**32 (RFC 9293 section 3.4).

Every sequence number in the stack is a plain int in [0, 2**32).  Comparisons
use the signed 32-bit distance, so they stay correct across the wrap as long
as the two numbers are less than 2**31 apart, which TCP's window rules
guarantee.  Plain functions on ints rather than a wrapper class: the receive
and send paths call these per segment and a class would allocate each time.
"""

SEQ_MASK = 0xFFFFFFFF
_HALF = 0x80000000


def seq_add(a: int, n: int) -> int:
    """`a + n` wrapped into [0, 2**32); `n` may be negative."""
    return (a + n) & SEQ_MASK


def seq_diff(a: int, b: int) -> int:
    """Signed distance `a - b`, in [-2**31, 2**31)."""
    return ((a - b + _HALF) & SEQ_MASK) - _HALF


def seq_lt(a: int, b: int) -> bool:
    return ((a - b) & SEQ_MASK) >= _HALF


def seq_le(a: int, b: int) -> bool:
    return ((b - a) & SEQ_MASK) < _HALF


def seq_gt(a: int, b: int) -> bool:
    return ((b - a) & SEQ_MASK) >= _HALF


def seq_ge(a: int, b: int) -> bool:
    return ((a - b) & SEQ_MASK) < _HALF
