"""The sender's scoreboard and RACK loss detection (RFC 8985).

`Scoreboard` keeps one record per range of sequence space sent and not yet
cumulatively acknowledged, in sequence order and without gaps, so it is
O(ranges in flight): a burst sent at one instant is one record, whatever
its number of segments, and records are split only where a SACK block or a
retransmission cuts them.  A record is a list

    [start, end, xmit_ts, flags, order, snapshot]

(start and end are 32-bit sequence numbers, xmit_ts the time of the last
transmission, flags a set of the bits below, order a count of
transmissions that says which went first: a whole batch of them may share
one xmit_ts, and a retransmission must count as sent after the new data
that went before it; snapshot the delivery state when it went, for the
delivery rate estimator in `rate`, which hears of every byte delivered or
deemed lost).  Byte counters kept alongside
give the pipe (RFC 6675 SetPipe, as Linux's packets in flight) without a
walk:

    pipe = flight - sacked - lost + extra

where `lost` counts bytes deemed lost and not yet retransmitted, and
`extra` bytes retransmitted without being deemed lost (a tail loss probe):
both copies may be in the network.

RACK's state lives here too, since every update comes from records newly
delivered: RACK.xmit_ts, end_seq, rtt and fack, min_RTT, and the
reordering window's multiplier (RFC 8985 section 6.2).  The connection owns
the timers and the congestion response; it asks `detect_loss` what is lost
and for how long the rest may still be reordered.
"""

_MASK = 0xFFFFFFFF
_HALF = 0x80000000

SACKED = 1                 # selectively acknowledged
LOST = 2                   # deemed lost: to be retransmitted
RETRANS = 4                # a retransmission is in flight
EVER_RETRANS = 8           # retransmitted once at least: RTT samples are ambiguous

from mtcpshim.stack.rate import DeliveryRate

_DUPTHRESH = 3
# RFC 8985 section 6.2 step 4: the multiplier falls back to 1 after this
# many recoveries without a D-SACK.
_REO_WND_PERSIST = 16
# Linux tcp_min_rtt_wlen: a min RTT sample stands for five minutes.
_MIN_RTT_WINDOW = 300.0


class Scoreboard:
    __slots__ = (
        "records", "rate", "sacked", "lost", "extra", "tsecr", "ts_offset", "dsack",
        "dsack_retransmitted", "_high_retrans", "_order",
        # RACK (RFC 8985 section 6.1); rack_order stands for RACK.xmit_ts in comparisons
        "rack_xmit_ts", "rack_order", "rack_end", "rack_rtt", "min_rtt", "_min_rtt_at", "fack",
        "reordering_seen", "reo_wnd_mult", "_reo_wnd_persist", "_dsack_round",
    )

    def __init__(self, ts_offset: int = 0):
        self.records = []
        self.rate = DeliveryRate()
        self.sacked = 0            # bytes SACKed
        self.lost = 0              # bytes deemed lost, not yet retransmitted
        self.extra = 0             # bytes retransmitted though not deemed lost
        self.tsecr = None          # TSecr of the ACK being processed, if any
        self.ts_offset = ts_offset # our timestamp clock: int(now * 1000) + offset
        self.dsack = None          # (start, end) of the last ACK's D-SACK block
        self.dsack_retransmitted = False
        self._high_retrans = None  # end of the highest range ever retransmitted
        self._order = 0            # transmissions so far
        self.rack_xmit_ts = None
        self.rack_order = 0
        self.rack_end = 0
        self.rack_rtt = 0.0
        self.min_rtt = None
        self._min_rtt_at = 0.0
        self.fack = None           # highest end delivered (RACK.fack)
        self.reordering_seen = False
        self.reo_wnd_mult = 1
        self._reo_wnd_persist = 0
        self._dsack_round = None

    # ------------------------------------------------------------ queries

    def pipe(self, flight: int) -> int:
        return flight - self.sacked - self.lost + self.extra

    def sacked_ranges(self) -> list:
        """The SACKed ranges, adjacent records merged: [(start, end), ...]."""
        ranges = []
        for start, end, _, flags, *_ in self.records:
            if flags & SACKED:
                if ranges and ranges[-1][1] == start:
                    ranges[-1] = (ranges[-1][0], end)
                else:
                    ranges.append((start, end))
        return ranges

    def next_lost(self, seq: int):
        """(start, end) of the first record at or after `seq` deemed lost and
        not yet retransmitted, or None."""
        records = self.records
        if not self.lost or not records:
            return None
        for index in range(self._index(seq), len(records)):
            record = records[index]
            if record[3] & (LOST | RETRANS | SACKED) == LOST:
                start = record[0]
                if ((seq - start) & _MASK) < _HALF:
                    start = seq
                return start, record[1]
        return None

    def reo_wnd(self, srtt, in_recovery: bool, mss: int) -> float:
        """RFC 8985 section 6.2 step 4: how long a segment may be reordered
        before it counts as lost.  Before any reordering was seen, none
        during recovery or once DupThresh segments are SACKed."""
        if not self.reordering_seen and (in_recovery or self.sacked > (_DUPTHRESH - 1) * mss):
            return 0.0
        min_rtt = self.min_rtt if self.min_rtt is not None else (srtt or 0.0)
        window = self.reo_wnd_mult * min_rtt / 4
        if srtt is not None and window > srtt:
            window = srtt
        return window

    # ------------------------------------------------------------ sending

    def sent(self, start: int, end: int, now: float) -> None:
        """[start, end) went out for the first time at `now`, right after
        everything already recorded."""
        records = self.records
        order = self._order
        snapshot = self.rate.on_send(now, not records)
        if records:
            last = records[-1]
            if (last[4] == order and last[2] == now and not last[3] and last[1] == start
                    and last[5] is snapshot):
                last[1] = end              # same burst: one record
                return
        self._order = order + 1
        records.append([start, end, now, 0, order + 1, snapshot])

    def retransmitted(self, start: int, end: int, now: float, in_flight: bool = True) -> None:
        """[start, end) went out again at `now`.  `in_flight` False: the
        earlier copies are known gone (resent after the path MTU fell), so
        the pipe counts this copy only."""
        records = self.records
        if not records:
            return
        first = self._cut(start)
        last = self._cut(end)
        self._order += 1
        order = self._order
        snapshot = self.rate.on_send(now, False)
        for index in range(first, last):
            record = records[index]
            flags = record[3]
            if in_flight and not flags & (RETRANS | SACKED):
                size = (record[1] - record[0]) & _MASK
                if flags & LOST:
                    self.lost -= size
                else:
                    self.extra += size
                flags |= RETRANS
            record[3] = flags | EVER_RETRANS
            record[2] = now
            record[4] = order
            record[5] = snapshot
        high = self._high_retrans
        if high is None or ((end - high) & _MASK) < _HALF:
            self._high_retrans = end

    # ------------------------------------------------------ acknowledgment

    def acked(self, ack: int, now: float) -> None:
        """A cumulative ACK up to `ack`: forget what it covers; RACK learns
        from the newest of it (RFC 8985 section 6.2 step 2)."""
        records = self.records
        count = len(records)
        index = 0
        while index < count and ((ack - records[index][1]) & _MASK) < _HALF:
            index += 1
        if not (self.sacked or self.lost or self.extra or self._high_retrans is not None):
            # Nothing was ever SACKed, lost or resent: send order is
            # sequence order, and the newest record delivered is the last
            # one reached, its RTT sample unambiguous (step 2, inlined: this
            # runs on every ACK).
            self.fack = None               # all delivered lies below the ACK
            if not count:
                return
            delivered = (ack - records[0][0]) & _MASK
            if index < count and records[index][0] != ack:
                newest = records[index]
                newest[0] = ack
                end = ack
            elif index:
                newest = records[index - 1]
                end = newest[1]
            else:
                return
            if index:
                del records[:index]
            xmit_ts = newest[2]
            self.rate.on_delivered(newest[5], xmit_ts, delivered, now, False)
            rtt = now - xmit_ts
            if self.min_rtt is None or rtt <= self.min_rtt or now - self._min_rtt_at > _MIN_RTT_WINDOW:
                self.min_rtt = rtt
                self._min_rtt_at = now
            self.rack_rtt = rtt
            self.rack_xmit_ts = xmit_ts
            self.rack_order = newest[4]
            self.rack_end = end
            return
        for record in records[:index]:
            size = (record[1] - record[0]) & _MASK
            self._forget(record, size)
            if not record[3] & SACKED:
                self._delivered(record, record[1], size, now, False)
        del records[:index]
        if index < count and records[0][0] != ack:
            first = records[0]
            size = (ack - first[0]) & _MASK
            self._forget(first, size)
            first[0] = ack
            if not first[3] & SACKED:
                self._delivered(first, ack, size, now, False)
        if not records:
            self._high_retrans = None

    def sack(self, blocks, snd_una: int, snd_max: int, now: float) -> int:
        """Mark the peer's SACK blocks; returns the bytes newly SACKed.  A
        first block below snd_una or inside the second block is a D-SACK
        (RFC 2883 section 4): it lands in `dsack` instead.  (A first block
        on data already SACKed is not: a window update repeats the SACK
        blocks of the ACK before.)  Blocks for data never sent are ignored."""
        self.dsack = None
        records = self.records
        newly = 0
        first = True
        for left, right in blocks:
            size = (right - left) & _MASK
            if size == 0 or size >= _HALF:
                first = False
                continue                   # malformed
            if first:
                first = False
                if self._is_dsack(left, right, blocks, snd_una):
                    continue
            if ((snd_max - right) & _MASK) >= _HALF or ((right - snd_una) & _MASK) >= _HALF \
                    or right == snd_una or not records:
                continue                   # beyond what was sent, or all acknowledged
            if ((left - snd_una) & _MASK) >= _HALF:
                left = snd_una
            index = self._cut(left)
            stop = self._cut(right)
            while index < stop:
                record = records[index]
                flags = record[3]
                if not flags & SACKED:
                    size = (record[1] - record[0]) & _MASK
                    if flags & LOST:
                        if not flags & RETRANS:
                            self.lost -= size
                    elif flags & RETRANS:
                        self.extra -= size
                    self.sacked += size
                    newly += size
                    self._delivered(record, record[1], size, now, True)
                    record[3] = (flags & EVER_RETRANS) | SACKED
                index += 1
        return newly

    def _is_dsack(self, left: int, right: int, blocks, snd_una: int) -> bool:
        if ((snd_una - right) & _MASK) < _HALF:
            self.dsack = (left, right)
            self.dsack_retransmitted = True    # forgotten: assume it was ours
            return True
        if len(blocks) > 1:
            outer_left, outer_right = blocks[1]
            if (((left - outer_left) & _MASK) < _HALF and ((outer_right - right) & _MASK) < _HALF
                    and (outer_left, outer_right) != (left, right)):
                self.dsack = (left, right)
                self.dsack_retransmitted = self._all_flagged(left, right, EVER_RETRANS)
                return True
        return False

    def _all_flagged(self, left: int, right: int, flag: int) -> bool:
        """Every record in [left, right) carries `flag`, and there are some."""
        records = self.records
        if not records:
            return False
        if (((left - records[0][0]) & _MASK) >= _HALF
                or ((records[-1][1] - right) & _MASK) >= _HALF):
            return False
        index = self._index(left)
        while index < len(records) and ((records[index][0] - right) & _MASK) >= _HALF:
            if not records[index][3] & flag:
                return False
            index += 1
        return True

    def _forget(self, record, size: int) -> None:
        """`size` bytes of `record` were cumulatively acknowledged."""
        flags = record[3]
        if flags & SACKED:
            self.sacked -= size
        elif flags & LOST:
            if not flags & RETRANS:
                self.lost -= size
        elif flags & RETRANS:
            self.extra -= size

    # ---------------------------------------------------------------- RACK

    def _advance(self, record, end: int, now: float, sacked: bool) -> None:
        """RFC 8985 section 6.2 steps 1 and 2 for one delivered record, of
        which `end` is the last byte delivered; `sacked`: by a SACK block."""
        xmit_ts = record[2]
        rtt = now - xmit_ts
        if record[3] & EVER_RETRANS:
            # An ACK that may be for the original: no sample (step 2).
            if self.min_rtt is not None and rtt < self.min_rtt:
                return
            # The echoed timestamp tells only for data the ACK acknowledges
            # cumulatively: a receiver echoes the newest in-order segment's
            # (RFC 7323 section 4.3), so a SACKed retransmission's ACK
            # always echoes an older one, and RACK would never learn that a
            # later retransmission arrived where an earlier one did not.
            tsecr = self.tsecr
            if (not sacked and tsecr is not None
                    and ((tsecr - ((int(xmit_ts * 1000) + self.ts_offset) & _MASK)) & _MASK) >= _HALF):
                return
        elif self.min_rtt is None or rtt <= self.min_rtt or now - self._min_rtt_at > _MIN_RTT_WINDOW:
            self.min_rtt = rtt
            self._min_rtt_at = now
        self.rack_rtt = rtt
        order = record[4]
        rack_order = self.rack_order
        if (order > rack_order
                or (order == rack_order and 0 < ((end - self.rack_end) & _MASK) < _HALF)):
            self.rack_xmit_ts = xmit_ts
            self.rack_order = order
            self.rack_end = end

    def _delivered(self, record, end: int, size: int, now: float, sacked: bool) -> None:
        """`size` bytes of a record newly delivered (acknowledged or SACKed):
        the delivery rate, RACK's state, and step 3, reordering: delivered
        below RACK.fack without having been resent, so it was overtaken."""
        self.rate.on_delivered(record[5], record[2], size, now, record[3] & EVER_RETRANS)
        self._advance(record, end, now, sacked)
        fack = self.fack
        if fack is None or 0 < ((end - fack) & _MASK) < _HALF:
            self.fack = end
        elif end != fack and not record[3] & EVER_RETRANS:
            self.reordering_seen = True

    def on_dsack(self, snd_una: int, snd_nxt: int) -> None:
        """RFC 8985 section 6.2 step 4: each round trip that brings a D-SACK
        widens the reordering window by min_RTT/4."""
        if self._dsack_round is not None and ((snd_una - self._dsack_round) & _MASK) < _HALF:
            self._dsack_round = None
        if self._dsack_round is None:
            self._dsack_round = snd_nxt
            self.reo_wnd_mult += 1
            self._reo_wnd_persist = _REO_WND_PERSIST

    def recovery_ended(self) -> None:
        """Step 4: the window narrows back after 16 recoveries without a D-SACK."""
        self._reo_wnd_persist -= 1
        if self._reo_wnd_persist <= 0:
            self.reo_wnd_mult = 1

    def detect_loss(self, now: float, reo_wnd: float):
        """RFC 8985 section 6.2 step 5: every record not delivered and sent
        before RACK's newest delivered one is lost once RACK.rtt + reo_wnd
        has passed since it was sent.  Returns (bytes newly deemed lost,
        seconds until the next record would be: 0 if none)."""
        records = self.records
        if self.rack_xmit_ts is None or not records:
            return 0, 0.0
        rack_order = self.rack_order
        base = records[0][0]
        rack_end = (self.rack_end - base) & _MASK
        if rack_end >= _HALF:
            rack_end = 0                   # RACK's record is cumulatively acknowledged
        # Beyond both RACK.end_seq and the last retransmission, records went
        # out in sequence order: the first one sent after RACK's ends the walk.
        ordered_from = rack_end
        if self._high_retrans is not None:
            high = (self._high_retrans - base) & _MASK
            if high < _HALF and high > ordered_from:
                ordered_from = high
        horizon = self.rack_rtt + reo_wnd
        newly = 0
        timeout = 0.0
        for record in records:
            flags = record[3]
            if flags & SACKED or flags & (LOST | RETRANS) == LOST:
                continue
            order = record[4]
            if order > rack_order or (order == rack_order
                                      and ((record[1] - base) & _MASK) >= rack_end):
                if ((record[0] - base) & _MASK) >= ordered_from:
                    break
                continue
            remaining = record[2] + horizon - now
            if remaining > 0:
                if remaining > timeout:
                    timeout = remaining
                continue
            size = (record[1] - record[0]) & _MASK
            if not flags & LOST:
                newly += size
            elif flags & RETRANS:
                newly += size              # the retransmission is lost too
            if flags & RETRANS and not flags & LOST:
                self.extra -= size
            self.lost += size
            record[3] = (flags | LOST) & ~RETRANS
        if newly:
            self.rate.on_lost(newly)
        return newly, timeout

    def mark_lost_on_timeout(self, now: float, reo_wnd: float, everything: bool) -> None:
        """After a retransmission timeout (RFC 8985 section 6.3): the first
        record is lost, and every other not SACKed that was sent RACK.rtt +
        reo_wnd ago; with `everything`, all of them.  A SACKed first record
        means the peer reneged: its SACKs are forgotten (RFC 2018 section 8)."""
        records = self.records
        if not records:
            return
        if records[0][3] & SACKED:
            self._clear(SACKED)
        horizon = self.rack_rtt + reo_wnd if self.rack_xmit_ts is not None else 0.0
        for index, record in enumerate(records):
            flags = record[3]
            if flags & SACKED or flags & (LOST | RETRANS) == LOST:
                continue
            if index and not everything and now - record[2] < horizon:
                continue
            size = (record[1] - record[0]) & _MASK
            if flags & RETRANS and not flags & LOST:
                self.extra -= size
            self.lost += size
            self.rate.on_lost(size)
            record[3] = (flags | LOST) & ~RETRANS

    def unmark_lost(self) -> None:
        """An undo: what was deemed lost was not (Linux tcp_undo_cwnd_reduction)."""
        self._clear(LOST | RETRANS)

    def forget(self) -> None:
        """Every copy in flight is gone and all of it goes again, SACKed or
        not (a smaller path MTU)."""
        self._clear(SACKED | LOST | RETRANS)

    def _clear(self, mask: int) -> None:
        for record in self.records:
            record[3] &= ~mask
        if mask & SACKED:
            self.sacked = 0
        if mask & LOST:
            self.lost = 0
        if mask & RETRANS:
            self.extra = 0

    # ----------------------------------------------------------- internals

    def _index(self, seq: int) -> int:
        """Index of the first record that ends after `seq` (binary search
        on offsets from the first record)."""
        records = self.records
        base = records[0][0]
        target = (seq - base) & _MASK
        if target >= _HALF:
            return 0
        low, high = 0, len(records)
        while low < high:
            middle = (low + high) >> 1
            if ((records[middle][1] - base) & _MASK) <= target:
                low = middle + 1
            else:
                high = middle
        return low

    def _cut(self, seq: int) -> int:
        """Make `seq` a record boundary; the index of the record starting there."""
        records = self.records
        index = self._index(seq)
        if index < len(records):
            record = records[index]
            if record[0] != seq and ((seq - record[0]) & _MASK) < _HALF:
                records.insert(index + 1, [seq, record[1], record[2], record[3], record[4], record[5]])
                record[1] = seq
                index += 1
        return index
