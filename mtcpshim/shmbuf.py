"""A socket slot's shared-memory rings seen through the TCP core's buffer
protocols (stack/storage.py's RingBuffer is the in-process twin).

TX ring: the application appends; the core peeks unacknowledged bytes and
consumes them only once acknowledged, so the ring is also the retransmission
queue and nothing is copied until a segment is built.
RX ring: the core appends in-order bytes; the application reads.

The program can write anything into the region, so each buffer keeps the
index the stack owns (TX tail, RX head) to itself, takes its addresses from
the stack's private geometry, and reads the program's index as untrusted:
an impossible one (more bytes in use than the ring holds, a TX head that
moved backwards) is reported through `on_corrupt` and read as an empty ring,
so the core never sees it.  The runtime then resets the socket.
"""
from mtcpshim._shm import ffi, lib

_U64 = (1 << 64) - 1


class ShmSendBuffer:
    __slots__ = ("_head_word", "_tail_word", "_head", "_tail", "_data", "_view", "_cap", "_mask",
                 "_on_corrupt")

    def __init__(self, geom, slot_id: int, on_corrupt):
        ring = lib.mts_slot_at(geom, slot_id).tx
        self._head_word = ffi.addressof(ring, "head")
        self._tail_word = ffi.addressof(ring, "tail")
        self._tail = lib.mts_index_load(self._tail_word)
        self._head = self._tail  # the last head seen valid: bytes below it stay put
        self._data = lib.mts_tx_data(geom, slot_id)
        self._cap = geom.tx_size
        self._mask = geom.tx_size - 1
        self._view = memoryview(ffi.buffer(self._data, self._cap))
        self._on_corrupt = on_corrupt

    def __len__(self) -> int:
        head = lib.mts_index_load(self._head_word)
        used = (head - self._tail) & _U64
        if used > self._cap or ((head - self._head) & _U64) > self._cap:
            self._on_corrupt("TX ring head impossible (beyond capacity or moved backwards)")
            return 0
        self._head = head
        return used

    def peek(self, offset: int, n: int):
        """Up to n bytes at offset past the oldest unacknowledged byte, within
        what __len__ last saw.  The application never overwrites them before
        consume(), so a view into the ring is safe when they do not wrap."""
        used = (self._head - self._tail) & _U64
        if offset >= used:
            return b""
        if n > used - offset:
            n = used - offset
        start = (self._tail + offset) & self._mask
        if start + n <= self._cap:
            return self._view[start:start + n]
        out = ffi.new("uint8_t[]", n)
        lib.mts_copy_out(self._data, self._cap, self._tail + offset, out, n)
        return ffi.buffer(out, n)

    def consume(self, n: int) -> None:
        self._tail = (self._tail + n) & _U64
        lib.mts_index_store(self._tail_word, self._tail)


class ShmRecvBuffer:
    """`space()` is the room within the window's limit: the ring, or less
    where the program set SO_RCVBUF (`limit`)."""

    __slots__ = ("_slot", "_ring", "_tail_word", "_head", "_data", "_cap", "_limit", "_low_water",
                 "_on_corrupt")

    def __init__(self, geom, slot_id: int, on_corrupt):
        self._slot = lib.mts_slot_at(geom, slot_id)
        self._ring = ffi.addressof(self._slot.rx)
        self._tail_word = ffi.addressof(self._slot.rx, "tail")
        self._head = lib.mts_index_load(ffi.addressof(self._slot.rx, "head"))
        self._data = lib.mts_rx_data(geom, slot_id)
        self._cap = geom.rx_size
        self._on_corrupt = on_corrupt
        self.limit(lib.mts_buffer_limit(geom.rx_size, self._slot.opt_rcvbuf))

    def limit(self, size: int) -> None:
        """Hold at most `size` bytes (no more than the ring)."""
        self._limit = size
        # Below this much room the window is worth reopening: ask the
        # application to report its reads (mts_rx_arm_notify).
        self._low_water = size // 2

    def __len__(self) -> int:
        """Bytes received and not yet read by the application."""
        used = (self._head - lib.mts_index_load(self._tail_word)) & _U64
        if used > self._cap:
            self._on_corrupt("RX ring tail impossible (ahead of head or beyond capacity)")
            return 0
        return used

    def space(self) -> int:
        room = self._limit - len(self)
        if room < self._low_water:
            lib.mts_rx_arm_notify(self._slot)
            room = self._limit - len(self)
        return max(room, 0)

    def write(self, data) -> int:
        n = lib.mts_ring_produce(self._ring, self._data, self._cap, self._head, ffi.from_buffer(data), len(data))
        if n < 0:
            self._on_corrupt("RX ring tail impossible (ahead of head or beyond capacity)")
            return 0
        self._head = (self._head + n) & _U64
        return n


class DetachedBuffer:
    """Stands in for the rings once the application has closed a socket and
    its slot is freed (TIME_WAIT needs neither data nor window), or once the
    socket was reset for corrupt rings."""

    __slots__ = ()

    def __len__(self) -> int:
        return 0

    def peek(self, offset: int, n: int):
        return b""

    def consume(self, n: int) -> None:
        pass

    def space(self) -> int:
        return 0

    def limit(self, size: int) -> None:
        pass

    def write(self, data) -> int:
        return 0


DETACHED = DetachedBuffer()
