"""A socket slot's shared-memory rings seen through the TCP core's buffer
protocols (stack/storage.py's RingBuffer is the in-process twin).

TX ring: the application appends; the core peeks unacknowledged bytes and
consumes them only once acknowledged, so the ring is also the retransmission
queue and nothing is copied until a segment is built.
RX ring: the core appends in-order bytes; the application reads.
"""
from mtcpshim._shm import ffi, lib


class ShmSendBuffer:
    __slots__ = ("_ring", "_data", "_view", "_cap", "_mask")

    def __init__(self, header, slot_id: int):
        self._ring = ffi.addressof(lib.mts_slot_at(header, slot_id).tx)
        self._data = lib.mts_tx_data(header, slot_id)
        self._view = memoryview(ffi.buffer(self._data, header.tx_size))
        self._cap = header.tx_size
        self._mask = header.tx_size - 1

    def __len__(self) -> int:
        return lib.mts_ring_used(self._ring)

    def peek(self, offset: int, n: int):
        """Up to n bytes at offset past the oldest unacknowledged byte.  The
        application never overwrites them before consume(), so a view into
        the ring is safe when the bytes do not wrap."""
        ring = self._ring
        used = ring.head - ring.tail
        if offset >= used:
            return b""
        if n > used - offset:
            n = used - offset
        start = (ring.tail + offset) & self._mask
        if start + n <= self._cap:
            return self._view[start:start + n]
        out = ffi.new("uint8_t[]", n)
        lib.mts_ring_peek(ring, self._data, self._cap, offset, out, n)
        return ffi.buffer(out, n)

    def consume(self, n: int) -> None:
        lib.mts_ring_consume(self._ring, n)


class ShmRecvBuffer:
    __slots__ = ("_slot", "_ring", "_data", "_cap", "_low_water")

    def __init__(self, header, slot_id: int):
        self._slot = lib.mts_slot_at(header, slot_id)
        self._ring = ffi.addressof(self._slot.rx)
        self._data = lib.mts_rx_data(header, slot_id)
        self._cap = header.rx_size
        # Below this much room the window is worth reopening: ask the
        # application to report its reads (mts_rx_arm_notify).
        self._low_water = header.rx_size // 2

    def __len__(self) -> int:
        """Bytes received and not yet read by the application."""
        return lib.mts_ring_used(self._ring)

    def space(self) -> int:
        room = self._cap - lib.mts_ring_used(self._ring)
        if room < self._low_water:
            lib.mts_rx_arm_notify(self._slot)
            room = self._cap - lib.mts_ring_used(self._ring)
        return room

    def write(self, data) -> int:
        return lib.mts_ring_write(self._ring, self._data, self._cap, ffi.from_buffer(data), len(data))


class DetachedBuffer:
    """Stands in for the rings once the application has closed a socket and
    its slot is freed (TIME_WAIT needs neither data nor window)."""

    __slots__ = ()

    def __len__(self) -> int:
        return 0

    def peek(self, offset: int, n: int):
        return b""

    def consume(self, n: int) -> None:
        pass

    def space(self) -> int:
        return 0

    def write(self, data) -> int:
        return 0


DETACHED = DetachedBuffer()
