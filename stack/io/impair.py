"""A seeded fault injector in front of any packet I/O backend.

`ImpairedIO(inner, spec)` has the backend interface (filenos, recv_batch,
send_batch, close, mac) and impairs the frames that pass through it, per
direction: `rx` is what the wire delivers to the stack, `tx` what the stack
puts on the wire.  For each frame, in this order:

  loss       the frame vanishes;
  corrupt    one random bit of the IP packet flips (the Ethernet header is
             spared: a real NIC's FCS would have caught a flip there, and what
             this exercises is the IPv4/TCP checksums);
  dup        a second copy follows the frame;
  reorder    the frame is held back until 1 to REORDER_MAX_OVERTAKES later
             frames have overtaken it, or REORDER_MAX_HOLD has passed;
  delay      the frame is released `delay` +- `jitter` (uniform) after it
             arrived.  Jitter never reorders: a frame leaves no earlier than
             the one before it, as on a real link; reordering is `reorder`'s
             job, so each fault can be exercised alone.

On transmit the faults act on the frames the stack hands the device, as
netem in the device's queue acts on the kernel's: where the device takes
segmentation offload frames whole (TSO on: a veth carries them across, a
NIC cuts them), a 64 KB frame is lost, copied, held or delayed whole, as a
GSO packet would be, and to corrupt one the lane first cuts it into wire
segments and flips a bit in one of them, as netem does (a bit flipped in a
frame whose checksums the device completes would reach the peer as valid
data).  Where the device would cut each frame in software anyway (TSO
off), the stack cuts its segments itself and the faults act on them.

Held frames leave at a time: `deadline()` says when the next one is due, and
the stack's loop wakes for it.  Due TX frames go out on the next
`send_batch` or `recv_batch`, whichever the loop calls first (it calls
`recv_batch` on every iteration).

Every decision comes from a per-direction random.Random seeded from `seed`,
so a given sequence of frames meets the same fate on every run.  What
happened is counted in `counters()` as `impair_<dir>_<what>`, beside the
wrapped backend's own counters.

Spec syntax (the `--impair` option of `mtcpshim run`):

    loss=1%,dup=1%,reorder=25%,corrupt=0.1%,delay=20ms,jitter=10ms,seed=7,dir=both

Every key is optional; percentages need `%`, times a unit (us, ms or s);
dir is rx, tx or both (the default).
"""
from __future__ import annotations

import random
import re
import time
from collections import Counter, deque
from dataclasses import dataclass

from mtcpshim.stack import native
from mtcpshim.stack.wire.vnet import SegmentedFrame

#: A held-back frame goes out after this many later frames at most ...
REORDER_MAX_OVERTAKES = 3
#: ... or after this many seconds, so the last frame of a burst is not stuck.
REORDER_MAX_HOLD = 0.005
#: Frames one direction may hold (delayed or held back); beyond that new
#: frames are dropped and counted as `overflow`, as a full link buffer would.
LANE_LIMIT = 8192

_ETHERNET_HEADER_LEN = 14
_DIRECTIONS = ("rx", "tx", "both")
_PERCENT_KEYS = ("loss", "dup", "reorder", "corrupt")
_TIME_KEYS = ("delay", "jitter")
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_TIME = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(us|ms|s)")
_PERCENT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)%")


class ImpairSpecError(ValueError):
    """A spec that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class ImpairSpec:
    """What to do to the frames.  Probabilities are fractions (0.01 is 1 %),
    times are seconds."""

    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    corrupt: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    seed: int = 1
    direction: str = "both"

    @classmethod
    def parse(cls, text: str) -> "ImpairSpec":
        fields = {}
        for item in text.split(","):
            key, sep, value = item.strip().partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise ImpairSpecError(f"bad impairment {item.strip()!r}: want KEY=VALUE")
            name = "direction" if key == "dir" else key
            if name in fields:
                raise ImpairSpecError(f"{key} is given twice")
            fields[name] = _parse_value(key, value)
        if fields.get("jitter", 0.0) > fields.get("delay", 0.0):
            raise ImpairSpecError("jitter must not exceed delay: a frame cannot leave before it arrived")
        return cls(**fields)

    def affects(self, direction: str) -> bool:
        return self.direction in (direction, "both") and any(
            (self.loss, self.dup, self.reorder, self.corrupt, self.delay))


def _parse_value(key: str, value: str):
    if key in _PERCENT_KEYS:
        match = _PERCENT.fullmatch(value)
        if match is None:
            raise ImpairSpecError(f"{key}={value}: want a percentage such as {key}=1%")
        percent = float(match.group(1))
        if percent > 100:
            raise ImpairSpecError(f"{key}={value}: at most 100%")
        return percent / 100
    if key in _TIME_KEYS:
        match = _TIME.fullmatch(value)
        if match is None:
            raise ImpairSpecError(f"{key}={value}: want a time with a unit such as {key}=20ms (us, ms, s)")
        return float(match.group(1)) * _TIME_UNITS[match.group(2)]
    if key == "seed":
        try:
            return int(value, 0)
        except ValueError:
            raise ImpairSpecError(f"seed={value}: want an integer") from None
    if key == "dir":
        if value not in _DIRECTIONS:
            raise ImpairSpecError(f"dir={value}: want rx, tx or both")
        return value
    known = ", ".join((*_PERCENT_KEYS, *_TIME_KEYS, "seed", "dir"))
    raise ImpairSpecError(f"unknown impairment {key!r} (known: {known})")


class _HeldFrame:
    """A frame set aside by `reorder` until enough later frames passed it."""

    __slots__ = ("overtakes_left", "hold_until", "release_at", "frame")

    def __init__(self, overtakes_left: int, hold_until: float, release_at: float, frame: bytes):
        self.overtakes_left = overtakes_left
        self.hold_until = hold_until
        self.release_at = release_at
        self.frame = frame


class _Lane:
    """One direction: a line of frames in departure order with their release
    times (never decreasing), plus the frames held back for reordering."""

    def __init__(self, spec: ImpairSpec, direction: str, counters: Counter):
        self._spec = spec
        self._rng = random.Random(f"{spec.seed}/{direction}")
        self._prefix = f"impair_{direction}_"
        self._counters = counters
        self._line: deque[tuple[float, bytes]] = deque()
        self._held: list[_HeldFrame] = []
        self._last_release = 0.0

    def admit(self, frames, now: float) -> None:
        spec, rng, count = self._spec, self._rng, self._counters
        prefix = self._prefix
        for frame in frames:
            if spec.loss and rng.random() < spec.loss:
                count[prefix + "lost"] += 1
                continue
            if spec.corrupt and rng.random() < spec.corrupt:
                count[prefix + "corrupted"] += 1
                if type(frame) is SegmentedFrame:
                    pieces = frame.cut()
                    damaged = rng.randrange(len(pieces))
                    pieces[damaged] = self._flip_a_bit(pieces[damaged])
                    for piece in pieces:
                        self._enqueue(piece, now)
                    continue
                frame = self._flip_a_bit(frame)
            self._enqueue(frame, now)
            if spec.dup and rng.random() < spec.dup:
                count[prefix + "duplicated"] += 1
                self._enqueue(frame, now)

    def _flip_a_bit(self, frame) -> bytes:
        damaged = bytearray(frame)
        start = _ETHERNET_HEADER_LEN if len(damaged) > _ETHERNET_HEADER_LEN else 0
        if len(damaged) > start:
            damaged[self._rng.randrange(start, len(damaged))] ^= 1 << self._rng.randrange(8)
        return bytes(damaged)

    def _enqueue(self, frame, now: float) -> None:
        spec, rng = self._spec, self._rng
        if len(self._line) + len(self._held) >= LANE_LIMIT:
            self._counters[self._prefix + "overflow"] += 1
            return
        release_at = now + spec.delay + (rng.uniform(-spec.jitter, spec.jitter) if spec.jitter else 0.0)
        if spec.reorder and rng.random() < spec.reorder:
            self._counters[self._prefix + "reordered"] += 1
            self._held.append(_HeldFrame(rng.randint(1, REORDER_MAX_OVERTAKES),
                                         now + REORDER_MAX_HOLD, release_at, _own(frame)))
            return
        self._append(release_at, frame if release_at <= now else _own(frame))
        if self._held:
            self._overtake()

    def _append(self, release_at: float, frame) -> None:
        self._last_release = max(release_at, self._last_release)
        self._line.append((self._last_release, frame))

    def _overtake(self) -> None:
        """A frame has just passed every held one."""
        still_held = []
        for held in self._held:
            held.overtakes_left -= 1
            if held.overtakes_left:
                still_held.append(held)
            else:
                self._append(held.release_at, held.frame)
        self._held = still_held

    def release(self, now: float, limit: int | None = None) -> list:
        if self._held:
            overdue = [held for held in self._held if held.hold_until <= now]
            if overdue:
                self._held = [held for held in self._held if held.hold_until > now]
                for held in overdue:
                    self._append(held.release_at, held.frame)
        line, due = self._line, []
        while line and line[0][0] <= now and (limit is None or len(due) < limit):
            due.append(line.popleft()[1])
        return due

    def deadline(self) -> float | None:
        times = [held.hold_until for held in self._held]
        if self._line:
            times.append(self._line[0][0])
        return min(times) if times else None


def _wire_checksummed(frame) -> bytearray:
    frame = bytearray(frame)
    native.complete_checksum(frame)
    return frame


def _own(frame):
    """A frame that outlives the loop pass that made it: a segmentation
    offload frame's payload is a view of the send ring, and a plain frame
    may be a view of the interface's frame arena, both valid for one pass."""
    return frame.detached() if type(frame) is SegmentedFrame else bytes(frame)


class ImpairedIO:
    """`inner` with `spec`'s faults applied; see the module docstring."""

    def __init__(self, inner, spec: ImpairSpec, clock=time.monotonic):
        self.inner = inner
        self.spec = spec
        self._clock = clock
        self._counters: Counter[str] = Counter()
        self._rx = _Lane(spec, "rx", self._counters) if spec.affects("rx") else None
        self._tx = _Lane(spec, "tx", self._counters) if spec.affects("tx") else None

    @property
    def mac(self) -> bytes:
        return self.inner.mac

    @property
    def gso_max_size(self) -> int:
        # Where the device would cut offload frames, transmit faults act on
        # the segments, so the stack cuts them itself (see above).
        return self.inner.gso_max_size if self._tx is None or self.inner.device_segments else 0

    @property
    def device_segments(self) -> bool:
        return self.inner.device_segments

    gathers_payload = False  # held and cut frames are copied

    @property
    def rx_vouched(self) -> bytes | None:
        return self.inner.rx_vouched if self._rx is None else None

    def filenos(self) -> tuple[int, ...]:
        return self.inner.filenos()

    def recv_batch(self, max_frames: int) -> list:
        now = self._clock()
        if self._tx is not None:
            self._flush_tx(now)
        if self._rx is None:
            return self.inner.recv_batch(max_frames)
        # Held frames outlive the batch; the inner backend's may be views of
        # its ring.  A damaged frame must fail its checksum, so none is
        # vouched for past this point: each gets the checksum a wire carries.
        frames = self.inner.recv_batch(max_frames)
        vouched = self.inner.rx_vouched
        if vouched is not None:
            frames = [_wire_checksummed(frame) if flag else frame
                      for frame, flag in zip(frames, vouched)]
        self._rx.admit([bytes(frame) for frame in frames], now)
        return self._rx.release(now, max_frames)

    def send_batch(self, frames: list) -> int:
        if self._tx is None:
            return self.inner.send_batch(frames)
        now = self._clock()
        self._tx.admit(frames, now)
        self._flush_tx(now)
        return len(frames)  # the inner backend counts what its ring refuses

    def _flush_tx(self, now: float) -> None:
        due = self._tx.release(now)
        if due:
            self.inner.send_batch(due)

    def device_error(self) -> str | None:
        return self.inner.device_error()

    def deadline(self) -> float | None:
        """When the next held frame is due; None if none is held."""
        times = [lane.deadline() for lane in (self._rx, self._tx) if lane is not None]
        times = [t for t in times if t is not None]
        return min(times) if times else None

    def counters(self) -> dict[str, int]:
        inner = self.inner.counters() if hasattr(self.inner, "counters") else {}
        return {**inner, **self._counters}

    def close(self) -> None:
        self.inner.close()
