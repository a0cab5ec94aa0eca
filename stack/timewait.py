"""TIME_WAIT without the connection: a compact record per 4-tuple.

A server that closes first (HTTP with `Connection: close`) keeps every
connection in TIME_WAIT for 2*MSL: tens of thousands of them.  Like Linux's
inet_timewait_sock, the host then keeps only what answering the peer needs,
as a tuple of ints the garbage collector does not track, and lets the full
TcpConnection go.  All records live for the same time, so expiry is a FIFO.
"""
from __future__ import annotations

import collections

from mtcpshim.stack.seq import seq_gt
from mtcpshim.stack.wire.tcp import ACK, RST, SYN, TcpSegment

_MASK = 0xFFFFFFFF

# TimeWaitTable.receive's answer when a new SYN may reuse the 4-tuple.
REINCARNATE = object()

_HOST_LIMIT = "/proc/sys/net/ipv4/tcp_max_tw_buckets"
_STALE_SLACK = 1024  # stale expiry entries tolerated beyond the records' count


def host_limit(default: int, path: str = _HOST_LIMIT) -> int:
    """The kernel's limit on TIME_WAIT sockets in this network namespace,
    which a server's operator tunes for the kernel's stack; `default` if
    it cannot be read."""
    try:
        with open(path) as sysctl:
            return max(int(sysctl.read()), 0)
    except (OSError, ValueError):
        return default


class TimeWaitTable:
    """Records keyed by (local_port, remote_ip, remote_port).  A record
    holds its local port against bind() as Linux's do (`holds_port`)."""

    def __init__(self, duration: float, limit: int):
        self.duration = duration
        self.limit = limit
        # Insertion order is expiry order: every record lives `duration`.
        self._records: dict[tuple[int, int, int], tuple] = {}
        # local port -> [records, records whose socket lacked SO_REUSEADDR]
        self._ports: dict[int, list[int]] = {}
        self._expiry: collections.deque = collections.deque()  # (expires, key), oldest first
        self._stale = 0  # entries of _expiry whose record went early (a reincarnated 4-tuple)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key) -> bool:
        return key in self._records

    def holds_port(self, port: int, reuse_address: bool) -> bool:
        """Whether a record keeps a socket from binding `port`: any record
        does, unless both that socket and the record's had SO_REUSEADDR
        (Linux's inet_csk_bind_conflict)."""
        held = self._ports.get(port)
        return held is not None and (not reuse_address or held[1] > 0)

    def add(self, conn, now: float) -> bool:
        """Takes over `conn`, which has just entered TIME_WAIT; False if the
        table is full (the caller lets the connection close at once)."""
        if len(self._records) >= self.limit:
            return False
        key = (conn.local_port, conn.remote_ip, conn.remote_port)
        snd_nxt, rcv_nxt, window, ts_recent, ts_offset = conn.time_wait_fields()
        expires = now + self.duration
        if key in self._records:           # keep insertion order = expiry order
            self._drop(key)
        strict = not conn.reuse_address
        self._records[key] = (expires, snd_nxt, rcv_nxt, window, ts_recent, ts_offset, strict)
        self._expiry.append((expires, key))
        held = self._ports.setdefault(key[0], [0, 0])
        held[0] += 1
        held[1] += strict
        return True

    def receive(self, key, seg: TcpSegment, now: float):
        """A segment for a TIME_WAIT 4-tuple.  Returns None to drop it, the
        ACK to send, or REINCARNATE when a new SYN may reuse the 4-tuple (the
        record is gone; the caller opens a connection as for any SYN)."""
        expires, snd_nxt, rcv_nxt, window, ts_recent, ts_offset, _ = self._records[key]
        flags = seg.flags
        if flags & RST:
            return None                    # RFC 1337: no assassination
        if flags & (SYN | ACK) == SYN and seq_gt(seg.seq, rcv_nxt):
            self._drop(key)                # RFC 9293 3.6.1, as Linux does
            return REINCARNATE
        # Anything else, the peer's retransmitted FIN above all, gets the
        # final ACK again.
        ack = TcpSegment(key[0], key[2], snd_nxt, rcv_nxt, ACK, window)
        if ts_recent is not None:
            ack.timestamp = ((int(now * 1000) + ts_offset) & _MASK, ts_recent)
        return ack

    def next_deadline(self) -> float | None:
        return self._expiry[0][0] if self._expiry else None

    def expire(self, now: float) -> None:
        expiry, records = self._expiry, self._records
        while expiry and expiry[0][0] <= now:
            expires, key = expiry.popleft()
            record = records.get(key)
            if record is not None and record[0] == expires:
                del records[key]
                self._release_port(key[0], record)
            else:
                self._stale -= 1

    def _drop(self, key) -> None:
        """Forgets a record before its time.  Its expiry entry stays behind;
        a client that reuses its ports at once (wrk: every second or so)
        would leave a minute of such entries, hundreds of MB at 20,000
        connections a second, so once they outnumber the records the queue
        is rebuilt from the records, which are in expiry order."""
        self._release_port(key[0], self._records.pop(key))
        self._stale += 1
        if self._stale > len(self._records) + _STALE_SLACK:
            self._expiry = collections.deque((record[0], key) for key, record in self._records.items())
            self._stale = 0

    def _release_port(self, port: int, record: tuple) -> None:
        held = self._ports[port]
        held[0] -= 1
        held[1] -= record[6]
        if not held[0]:
            del self._ports[port]
