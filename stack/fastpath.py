"""The receive fast path's Python side: the flow table it demultiplexes
with, and the batch loop that offers it each received batch first.

Header prediction runs in C (stack/csrc/fastpath.h): one call takes every
segment of a batch that the common case covers (in order, on an
ESTABLISHED connection, timestamps the only option), appends its payload
to the connection's receive ring and advances rcv_nxt in the TCB that C
and TcpConnection share.  The TCP core then finishes each such segment
(`TcpConnection.on_predicted_segment`: the ACK field through the core's
own ACK processing, the receive bookkeeping, output) in frame order with
the segments left to it, so that everything behaves as if the core had
taken each segment itself (tests/unit/test_fastpath.py holds it to that).
"""
from __future__ import annotations

import os

from mtcpshim.stack.wire.tcp import TcpSegment

try:
    from mtcpshim.stack._netfast import ffi, lib
except ImportError:   # no C module: no fast path (TcpHost(fast_path=...) falls back)
    ffi = lib = None

_MIN_ENTRIES = 1024
_BYTES = ffi.typeof("uint8_t[]") if ffi is not None else None


class FlowTable:
    """Connections by (local_port, remote_ip, remote_port), in C for the
    fast path, each under a number that names it in the fast path's
    records."""

    __slots__ = ("conns", "table", "_entries", "_free", "_seed")

    def __init__(self):
        self.conns: list = []              # number -> TcpConnection, None when free
        self.table = None                  # the struct nf_flows that nf_fast_rx searches
        self._free: list[int] = []
        self._seed = int.from_bytes(os.urandom(8), "little")
        self._entries = None
        self._resize(_MIN_ENTRIES)

    def __len__(self) -> int:
        return self.table.live

    def add(self, key: tuple[int, int, int], conn) -> None:
        table = self.table
        if 4 * (table.live + table.tombstones + 1) > 3 * (table.mask + 1):
            self._resize(4 * (table.live + 1))
        number = self._free.pop() if self._free else len(self.conns)
        if lib.nf_flows_add(self.table, _flow_key(key), conn.tcb, number):
            raise KeyError(f"flow {key} is in the table already")
        if number == len(self.conns):
            self.conns.append(conn)
        else:
            self.conns[number] = conn

    def remove(self, key: tuple[int, int, int]) -> None:
        number = lib.nf_flows_remove(self.table, _flow_key(key))
        if number < 0:
            raise KeyError(f"flow {key} is not in the table")
        self.conns[number] = None
        self._free.append(number)

    def _resize(self, entries: int) -> None:
        size = _MIN_ENTRIES
        while size < entries:
            size <<= 1
        new_entries = ffi.new("struct nf_flow[]", size)
        table = ffi.new("struct nf_flows *", {"entries": new_entries, "mask": size - 1, "seed": self._seed})
        if self.table is not None:
            lib.nf_flows_move(table, self.table)
        self.table, self._entries = table, new_entries


def _flow_key(key: tuple[int, int, int]) -> int:
    local_port, remote_ip, remote_port = key
    return local_port << 48 | remote_ip << 16 | remote_port


class FastPath:
    """Header prediction over received batches, for one address and the
    connections of one FlowTable."""

    __slots__ = ("_flows", "_mac", "_ip", "_batch", "_size", "_frames", "_lengths", "_vouched",
                 "_records", "_slow")

    def __init__(self, flows: FlowTable, mac: bytes, ip: int):
        self._flows = flows
        self._mac = mac
        self._ip = ip
        self._batch = 0
        self._size = 0
        self._grow(64)

    def _grow(self, size: int) -> None:
        self._size = size
        self._frames = ffi.new("uint8_t *[]", size)
        self._lengths = ffi.new("uint32_t[]", size)
        self._vouched = ffi.new("uint8_t[]", size)
        self._records = ffi.new("struct nf_fast_record[]", size)
        self._slow = ffi.new("uint8_t[]", size)

    def ingest(self, frames, now: float, vouched: bytes | None, to_core, finish) -> int:
        """Runs `frames` (with the backend's checksum `vouched` flags, if
        any) through header prediction.  Then, in frame order, calls
        `to_core(frame, checksum_vouched, now)` for each frame it left and
        `finish(conn, seg, payload_len, taken, now)` for each it took: `seg`
        has its header, `taken` payload bytes went into the receive buffer.
        Returns how many it took."""
        count = len(frames)
        if count > self._size:
            self._grow(count)
        pointers, lengths = self._frames, self._lengths
        keep = []        # the frames' buffers, for as long as C reads them
        for index, frame in enumerate(frames):
            buffer = ffi.from_buffer(_BYTES, frame)
            keep.append(buffer)
            pointers[index] = buffer
            lengths[index] = len(frame)
        if vouched is None:
            vouched = bytes(count)
        ffi.memmove(self._vouched, vouched, count)
        self._batch = self._batch % 0xFFFFFFFF + 1      # never 0, a fresh TCB's
        taken = lib.nf_fast_rx(self._flows.table, self._mac, self._ip, pointers, lengths, self._vouched,
                               count, self._batch, now, self._records, self._slow)
        del keep
        conns, slow, records, next_record = self._flows.conns, self._slow, self._records, 0
        for index in range(count):
            if slow[index]:
                to_core(frames[index], vouched[index], now)
                continue
            record = records[next_record]
            next_record += 1
            conn = conns[record.conn]
            seg = TcpSegment(conn.remote_port, conn.local_port, record.seq, record.ack, record.flags,
                             record.window)
            if record.has_timestamp:
                seg.timestamp = (record.tsval, record.tsecr)
            finish(conn, seg, record.payload_len, record.taken, now)
        return taken
