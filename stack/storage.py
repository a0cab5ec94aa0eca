"""Byte storage for TCP: a ring buffer and an out-of-order assembler.

`RingBuffer` speaks both buffer protocols of the TCP core.  As a send buffer:
`len(buf)` bytes queued and not yet acknowledged, `peek(offset, n)` to build
a segment, `consume(n)` when an ACK covers bytes; the application appends with
`write`.  As a receive buffer: `space()`, `write(data)` for in-order data; the
application takes bytes with `read(n)`.
"""
from __future__ import annotations

import bisect

from mtcpshim.stack import native


class RingBuffer:
    """Kept in a struct nf_byte_ring (stack/csrc/fastpath.h), so that the
    receive fast path can append to it as `write` does (`rx_write`,
    `rx_sink`)."""

    __slots__ = ("_ring", "_data", "_view", "rx_sink")

    rx_write = native.BYTE_RING_WRITE

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self._data = native.new_bytes(capacity)
        self._view = memoryview(native.buffer_of(self._data))
        self._ring = native.new_byte_ring(self._data, capacity)
        self.rx_sink = native.address_of(self._ring)

    @property
    def capacity(self) -> int:
        return self._ring.capacity

    def __len__(self) -> int:
        return self._ring.length

    def space(self) -> int:
        ring = self._ring
        return ring.capacity - ring.length

    def write(self, data) -> int:
        """Append as much of `data` as fits; return the byte count taken."""
        ring = self._ring
        capacity, length = ring.capacity, ring.length
        count = min(len(data), capacity - length)
        if count <= 0:
            return 0
        tail = (ring.head + length) % capacity
        first = min(count, capacity - tail)
        view = self._view
        view[tail:tail + first] = data[:first]
        if first < count:
            view[:count - first] = data[first:count]
        ring.length = length + count
        return count

    def peek(self, offset: int, n: int) -> bytes:
        """Up to `n` bytes starting `offset` bytes after the oldest one."""
        ring = self._ring
        count = min(n, ring.length - offset)
        if count <= 0:
            return b""
        capacity = ring.capacity
        start = (ring.head + offset) % capacity
        end = start + count
        view = self._view
        if end <= capacity:
            return bytes(view[start:end])
        return bytes(view[start:]) + bytes(view[:end - capacity])

    def consume(self, n: int) -> None:
        """Drop the `n` oldest bytes (at most all of them)."""
        ring = self._ring
        n = min(n, ring.length)
        ring.head = (ring.head + n) % ring.capacity
        ring.length -= n

    def read(self, n: int) -> bytes:
        data = self.peek(0, n)
        self.consume(len(data))
        return data


class Assembler:
    """Out-of-order data waiting for a hole before it.

    Offsets are relative to the next byte the reader expects (rcv_nxt).
    Internally ranges sit at absolute positions counted from an origin that
    `advance` and `pop_contiguous` move, so moving the reader never rewrites
    the stored ranges.  Ranges are disjoint and never adjacent; at most
    `max_ranges` are kept, and data that would need more is dropped (the
    sender retransmits it).
    """

    __slots__ = ("_starts", "_chunks", "_origin", "_max_ranges", "_latest")

    def __init__(self, max_ranges: int = 32):
        self._starts = []       # absolute start of each range, ascending
        self._chunks = []       # bytearray per range
        self._origin = 0        # absolute position of offset 0
        self._max_ranges = max_ranges
        self._latest = None     # start of the range that last received data

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __len__(self) -> int:
        """Number of ranges held."""
        return len(self._starts)

    def add(self, offset: int, data) -> bool:
        """Store `data` found at `offset`; bytes already held win over
        overlapping new ones.  Returns False if nothing could be stored
        because the range limit was reached."""
        if offset < 0:
            data = data[-offset:]
            offset = 0
        if not data:
            return True
        starts, chunks = self._starts, self._chunks
        start = self._origin + offset
        end = start + len(data)
        # Ranges [first, last] touch or overlap [start, end].
        first = bisect.bisect_left(starts, start)
        if first and starts[first - 1] + len(chunks[first - 1]) >= start:
            first -= 1
        last = bisect.bisect_right(starts, end) - 1
        if first > last:
            if len(starts) >= self._max_ranges:
                if first == len(starts):
                    return False
                # Keep the data nearest the reader: evict the farthest range.
                starts.pop()
                chunks.pop()
            starts.insert(first, start)
            chunks.insert(first, bytearray(data))
            self._latest = start
            return True
        merged_start = min(start, starts[first])
        merged = bytearray()
        position = merged_start
        for index in range(first, last + 1):
            range_start = starts[index]
            if position < range_start:
                merged += data[position - start:range_start - start]
            merged += chunks[index]
            position = range_start + len(chunks[index])
        if position < end:
            merged += data[position - start:]
        starts[first:last + 1] = [merged_start]
        chunks[first:last + 1] = [merged]
        self._latest = merged_start
        return True

    def overlap(self, offset: int, end: int) -> tuple | None:
        """The first stretch of [offset, end) already held, as offsets; None
        if none of it is."""
        starts = self._starts
        start, stop = self._origin + offset, self._origin + end
        index = bisect.bisect_right(starts, start) - 1
        if index < 0 or starts[index] + len(self._chunks[index]) <= start:
            index += 1
        if index == len(starts) or starts[index] >= stop:
            return None
        left = max(start, starts[index])
        right = min(stop, starts[index] + len(self._chunks[index]))
        return left - self._origin, right - self._origin

    def pop_contiguous(self, limit: int = -1) -> bytes:
        """Remove and return the bytes at offset 0 onwards (at most `limit`
        if it is not negative); b"" when the next byte is still missing."""
        starts = self._starts
        if not starts or starts[0] != self._origin:
            return b""
        chunk = self._chunks[0]
        if 0 <= limit < len(chunk):
            data = bytes(chunk[:limit])
            del chunk[:limit]
            starts[0] += limit
            if self._latest == self._origin:
                self._latest = starts[0]
        else:
            data = bytes(chunk)
            del starts[0]
            del self._chunks[0]
        self._origin += len(data)
        return data

    def advance(self, n: int) -> None:
        """The reader took `n` bytes from elsewhere: shift offsets, dropping
        anything now behind it."""
        origin = self._origin + n
        self._origin = origin
        starts, chunks = self._starts, self._chunks
        while starts and starts[0] < origin:
            overlap = origin - starts[0]
            if overlap >= len(chunks[0]):
                del starts[0]
                del chunks[0]
            else:
                del chunks[0][:overlap]
                if self._latest == starts[0]:
                    self._latest = origin
                starts[0] = origin

    def sack_blocks(self, limit: int = 4) -> list:
        """Up to `limit` (start, end) offset ranges for SACK: the range that
        most recently received data first (RFC 2018 section 4), then the
        others nearest the reader first."""
        origin = self._origin
        blocks = []
        latest = self._latest
        for start, chunk in zip(self._starts, self._chunks):
            block = (start - origin, start - origin + len(chunk))
            if start == latest:
                blocks.insert(0, block)
            else:
                blocks.append(block)
        return blocks[:limit]

    def clear(self) -> None:
        self._starts.clear()
        self._chunks.clear()
        self._latest = None
