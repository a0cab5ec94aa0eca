"""A packet I/O backend in memory (stack/io/base.py's PacketIO), for tests
that drive the stack's loop or a backend wrapper without a device: frames
put in `inbound` are what the wire delivers, `outbound` what reached it."""
from __future__ import annotations

import os

from mtcpshim.stack.wire.vnet import SegmentedFrame


class MemoryLink:
    """`gso_max_size` and `device_segments` as base.PacketIO: by default a
    device that takes whole frames only."""

    def __init__(self, mac: bytes, gso_max_size: int = 0, device_segments: bool = False):
        self.mac = mac
        self.gso_max_size = gso_max_size
        self.device_segments = device_segments
        self.inbound: list[bytes] = []
        self.outbound: list[bytes] = []
        self.closed = False
        self.payload_gone = 0
        self._fd = os.eventfd(0, os.EFD_NONBLOCK)   # something to poll

    def filenos(self) -> tuple[int]:
        return (self._fd,)

    rx_vouched = None
    gathers_payload = False  # it copies what it is sent

    def recv_batch(self, max_frames: int) -> list[bytes]:
        batch, self.inbound = self.inbound[:max_frames], self.inbound[max_frames:]
        return batch

    def send_batch(self, frames) -> int:
        for frame in frames:
            copy = frame.detached() if type(frame) is SegmentedFrame else bytes(frame)
            if copy is None:        # a view of a truncated file: a kernel's gather send fails (EFAULT)
                self.payload_gone += 1
            else:
                self.outbound.append(copy)
        return len(frames)

    def device_error(self) -> str | None:
        return None

    def counters(self) -> dict:
        return {"rx_kernel_drops": 0}

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
            self.closed = True
