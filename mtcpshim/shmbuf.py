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

Sendfile spans (struct mts_span in the ABI header) put stretches of a file
in the TX stream where ring bytes would be: `peek` hands out a view of the
stack's read-only mapping of the file only for a segment the kernel will
gather (longer than `gather_min`, the MSS: a SegmentedFrame), so no byte of
the mapping is read in user space, where a file truncated under it would
raise SIGBUS; the kernel's copy fails with EFAULT instead, a counted drop.
Smaller pieces come by pread, whose short read says the same.  Either way
the socket is reset: the bytes the program promised are gone.
"""
from __future__ import annotations

import errno
import mmap
import os
import stat
import time

from mtcpshim._shm import ffi, lib
from mtcpshim.stack import native
from mtcpshim.stack.wire.vnet import PayloadParts

_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1
_I64_MAX = (1 << 63) - 1


def index_distance(later: int, earlier: int) -> int:
    """(later - earlier) mod 2**64, for 64-bit ring indices: `& _U64` only
    where the indices wrapped, since it makes PyPy compute with big
    integers (about 15 ns) on every ring operation."""
    distance = later - earlier
    return distance if distance >= 0 else distance & _U64


def index_add(index: int, n: int) -> int:
    """(index + n) mod 2**64, the same way."""
    total = index + n
    return total if total <= _I64_MAX else total & _U64
_OFF_T_MAX = (1 << 63) - 1
_SPAN_SLOTS = lib.MTS_TX_SPANS
FILES_KEPT = lib.MTS_TX_FILES  # file numbers a socket keeps registered (its program may send from them again)
# How long a file's size is believed: a view of bytes a truncation took
# fails in the kernel (a dropped frame); the retransmission looks again.
_SIZE_BELIEVED_SECONDS = 0.01
_GATHER_PARTS = native.MAX_PARTS - 2 if native.ACCELERATED else 0  # after the vnet header and the headers


class SpanFile:
    """A file a program sends from with sendfile, as the stack holds it: its
    own descriptor (passed with SCM_RIGHTS) and a read-only shared mapping
    that only the kernel reads."""

    __slots__ = ("fd", "size", "_map", "_size_until")

    def __init__(self, fd: int):
        """Takes ownership of `fd`; OSError (and fd closed) if it is not a
        regular, readable, non-empty file."""
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
                raise OSError(errno.EBADF, "not a regular non-empty file")
            self._map = mmap.mmap(fd, info.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
        except (OSError, ValueError) as err:
            os.close(fd)
            raise OSError(getattr(err, "errno", None) or errno.EBADF, str(err)) from None
        self.fd = fd
        self.size = info.st_size
        self._size_until = time.monotonic() + _SIZE_BELIEVED_SECONDS

    def _holds(self, end: int) -> bool:
        """Whether the file still reaches `end`, looking again now and then
        (it may have been truncated) and whenever `end` is past what we saw
        (it may have grown: the mapping grows with it)."""
        now = time.monotonic()
        if end <= self.size and now < self._size_until:
            return True
        self._size_until = now + _SIZE_BELIEVED_SECONDS
        size = os.fstat(self.fd).st_size
        if size > len(self._map):
            self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        self.size = size
        return end <= size

    def view(self, offset: int, n: int):
        """The file's bytes [offset, offset + n) in the mapping, for the
        kernel to read; None if the file no longer holds them."""
        if not self._holds(offset + n):
            return None
        return memoryview(self._map)[offset:offset + n]

    def read(self, offset: int, n: int) -> bytes | None:
        data = os.pread(self.fd, n, offset)
        return data if len(data) == n else None

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:   # a frame of this loop still holds a view: the collector unmaps it
            pass
        os.close(self.fd)


class ShmSendBuffer:
    __slots__ = ("_head_word", "_tail_word", "_head", "_tail", "_data", "_view", "_cap", "_mask",
                 "_on_corrupt", "_slot", "_spans_read", "_spans", "_files", "gather_min")

    def __init__(self, geom, slot_id: int, on_corrupt):
        self._slot = lib.mts_slot_at(geom, slot_id)
        ring = self._slot.tx
        self._head_word = ffi.addressof(ring, "head")
        self._tail_word = ffi.addressof(ring, "tail")
        self._tail = lib.mts_index_load(self._tail_word)
        self._head = self._tail  # the last head seen valid: bytes below it stay put
        self._data = lib.mts_tx_data(geom, slot_id)
        self._cap = geom.tx_size
        self._mask = geom.tx_size - 1
        self._view = memoryview(ffi.buffer(self._data, self._cap))
        self._on_corrupt = on_corrupt
        self._spans_read = self._slot.tx_span_head
        self._spans = []          # [pos, end, file number, file offset], validated, in stream order
        self._files = {}          # file number -> SpanFile, oldest first
        # Segments longer than this are gathered by the kernel (the runtime
        # sets the MSS where that holds): they may take views of the ring
        # where it wraps and of span files, never read in user space.
        self.gather_min = _I64_MAX

    def __len__(self) -> int:
        head = lib.mts_index_load(self._head_word)
        used = index_distance(head, self._tail)
        if used > self._cap or index_distance(head, self._head) > self._cap:
            self._on_corrupt("TX ring head impossible (beyond capacity or moved backwards)")
            return 0
        seen, self._head = self._head, head
        # The program counts a span before it moves the head past it: loaded
        # in this order, a head that covers a span comes with its record.
        if self._files and self._slot.tx_span_head != self._spans_read and not self._read_spans(seen, head):
            self._on_corrupt("TX span record impossible (position, length or file)")
            return 0
        return used

    def add_file(self, number: int, source: SpanFile) -> None:
        """The program registered `source` under `number` (MTS_OP_FILE).  An
        interposer never registers a number twice; a program that does sends
        its spans of that number from the new file."""
        old = self._files.pop(number, None)
        if old is not None:
            old.close()
        self._files[number] = source
        self._forget_files()

    def _forget_files(self) -> None:
        """Closes files past the FILES_KEPT newest that no span needs."""
        if len(self._files) <= FILES_KEPT:
            return
        needed = {span[2] for span in self._spans}
        for number in list(self._files)[:-FILES_KEPT]:
            if number not in needed:
                self._files.pop(number).close()

    def _read_spans(self, seen: int, head: int) -> bool:
        """Takes the span records the program wrote for bytes below `head`;
        False if one is impossible: more records than slots, a span that is
        empty, longer than the ring, over bytes already taken from the ring
        (below `seen`) or another span, from a file never registered, or
        past the largest file offset."""
        slot, spans, files = self._slot, self._spans, self._files
        written = slot.tx_span_head
        if (written - self._spans_read) & _U32 > _SPAN_SLOTS:
            return False
        while self._spans_read != written:
            record = slot.tx_spans[self._spans_read % _SPAN_SLOTS]
            pos, length, number, offset = record.pos, record.len, record.file, record.offset
            floor = spans[-1][1] if spans else seen
            if pos < floor or not 0 < length <= self._cap or number not in files or offset + length > _OFF_T_MAX:
                return False
            end = pos + length
            if end > head:
                break                 # counted, head not moved yet
            last = spans[-1] if spans else None
            if last is not None and last[1] == pos and last[2] == number and last[3] + pos - last[0] == offset:
                last[1] = end         # the file read on where the last span ended: one span, so no
            else:                     # segment is pieced together at the seam
                spans.append([pos, end, number, offset])
            self._spans_read = (self._spans_read + 1) & _U32
        return True

    def release(self) -> None:
        """The connection is done with its stream: files go back."""
        for source in self._files.values():
            source.close()
        self._files.clear()
        self._spans.clear()

    def peek(self, offset: int, n: int):
        """Up to n bytes at offset past the oldest unacknowledged byte, within
        what __len__ last saw.  The application never overwrites them before
        consume(), so a view into the ring is safe when they do not wrap."""
        used = index_distance(self._head, self._tail)
        if offset >= used:
            return b""
        if n > used - offset:
            n = used - offset
        if self._spans and self._tail + offset + n > self._spans[0][0]:
            return self._peek_spans(self._tail + offset, n)
        start = (self._tail + offset) & self._mask
        if start + n <= self._cap:
            return self._view[start:start + n]
        if n > self.gather_min:
            return PayloadParts((self._view[start:], self._view[:start + n - self._cap]))
        out = ffi.new("uint8_t[]", n)
        lib.mts_copy_out(self._data, self._cap, self._tail + offset, out, n)
        return ffi.buffer(out, n)

    def _peek_spans(self, pos: int, n: int):
        """Stream bytes [pos, pos + n) where spans lie.  For a segment the
        kernel gathers (longer than gather_min): views of the ring and of
        the file, in PayloadParts where there are several, no byte read.
        Otherwise bytes, the file's by pread.  b"" (and the socket reset)
        if the file no longer holds them."""
        gather = n > self.gather_min
        end = pos + n
        parts = []
        for span_pos, span_end, number, offset in self._spans:
            if span_end <= pos:
                continue
            if span_pos >= end:
                break
            if span_pos > pos:
                parts += self._ring_views(pos, span_pos - pos)
                pos = span_pos
            take = min(end, span_end) - pos
            source, at = self._files[number], offset + pos - span_pos
            part = source.view(at, take) if gather else source.read(at, take)
            if part is None:
                self._on_corrupt("a file sent with sendfile shrank under the stack")
                return b""
            parts.append(part)
            pos += take
        if pos < end:
            parts += self._ring_views(pos, end - pos)
        if len(parts) == 1:
            return parts[0]
        if not gather:
            return b"".join(parts)
        parts = PayloadParts(tuple(parts))
        if len(parts.parts) <= _GATHER_PARTS:
            return parts
        joined = parts.joined()     # more pieces than one send gathers: a program's odd pattern
        if joined is None:
            self._on_corrupt("a file sent with sendfile shrank under the stack")
            return b""
        return joined

    def _ring_views(self, pos: int, n: int) -> list:
        start = pos & self._mask
        if start + n <= self._cap:
            return [self._view[start:start + n]]
        first = self._cap - start
        return [self._view[start:], self._view[:n - first]]

    def consume(self, n: int) -> None:
        self._tail = tail = index_add(self._tail, n)
        lib.mts_index_store(self._tail_word, tail)
        spans = self._spans
        if spans and spans[0][1] <= tail:
            while spans and spans[0][1] <= tail:
                del spans[0]
            self._forget_files()


class ShmRecvBuffer:
    """`space()` is the room within the window's limit: the ring, or less
    where the program set SO_RCVBUF (`limit`).  `rx_write` and `rx_sink`
    let the TCP core's C fast path append as `write` does, through the
    same private view of the ring (struct mts_rx_sink)."""

    __slots__ = ("_slot", "_sink", "_tail_word", "_cap", "_limit", "_low_water", "_on_corrupt",
                 "rx_sink")

    rx_write = int(ffi.cast("uintptr_t", ffi.addressof(lib, "mts_rx_sink_write")))

    def __init__(self, geom, slot_id: int, on_corrupt):
        self._slot = lib.mts_slot_at(geom, slot_id)
        self._tail_word = ffi.addressof(self._slot.rx, "tail")
        head = lib.mts_index_load(ffi.addressof(self._slot.rx, "head"))
        # Our own page bookkeeping (mts_ring_pages_before_write), never the region's.
        self._sink = ffi.new("struct mts_rx_sink *", {
            "ring": ffi.addressof(self._slot.rx), "data": lib.mts_rx_data(geom, slot_id),
            "head": head, "pages": {"released": head}, "cap": geom.rx_size})
        self.rx_sink = int(ffi.cast("uintptr_t", self._sink))
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
        used = index_distance(self._sink.head, lib.mts_index_load(self._tail_word))
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
        n = lib.mts_rx_sink_write(self._sink, ffi.from_buffer(data), len(data))
        if n < 0:
            self._on_corrupt("RX ring tail impossible (ahead of head or beyond capacity)")
            return 0
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

    def release(self) -> None:
        pass


DETACHED = DetachedBuffer()
