"""A packet I/O backend in memory (stack/io/base.py's PacketIO), for tests
that drive the stack's loop or a backend wrapper without a device: frames
put in `inbound` are what the wire delivers, `outbound` what reached it."""
from __future__ import annotations

import os


class MemoryLink:
    gso_max_size = 0                       # whole frames only

    def __init__(self, mac: bytes):
        self.mac = mac
        self.inbound: list[bytes] = []
        self.outbound: list[bytes] = []
        self.closed = False
        self._fd = os.eventfd(0, os.EFD_NONBLOCK)   # something to poll

    def fileno(self) -> int:
        return self._fd

    def recv_batch(self, max_frames: int) -> list[bytes]:
        batch, self.inbound = self.inbound[:max_frames], self.inbound[max_frames:]
        return batch

    def send_batch(self, frames) -> int:
        self.outbound.extend(bytes(frame) for frame in frames)
        return len(frames)

    def device_error(self) -> str | None:
        return None

    def counters(self) -> dict:
        return {"rx_kernel_drops": 0}

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
            self.closed = True
