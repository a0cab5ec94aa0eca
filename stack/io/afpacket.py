"""AF_PACKET backend: TPACKET_V2 RX and TX rings in one shared mapping.

RX: the kernel fills ring slots; `recv_batch` walks the ready ones in C
(netfast.c) and returns views of the frames in their slots, which it hands
back to the kernel at the next call: the only copy of a payload is the one
into the application's receive ring.  TPACKET_V2, not V3: V3 delivers a
block only when it is full or its retire timer (at least 1 ms) fires, which
adds a millisecond at low load.

TX: `send_batch` copies the batch into free slots in one C call and flushes
the whole batch with one send().  Without segmentation offload,
PACKET_QDISC_BYPASS (when the kernel has it) skips the qdisc layer, as a
NIC driver's own ring would; with it, both sockets go through the qdisc, so
that their frames keep their order.

The socket is opened in the network namespace of the calling thread.  RX
slots hold a whole IPv4 packet of 64 KB: a local kernel sender's GSO frames
and a NIC's GRO-merged frames (offloads at their defaults) arrive whole, and
the TCP core takes one super-segment where it would have taken 45.  Anything
larger still is dropped and counted as `rx_truncated`.  TX slots are sized
for base.MTU.  Checksums a local sender left to offload, or the NIC checked,
are vouched for (`rx_vouched`, counted as `rx_csum_vouched`) and never summed:
on a 64 KB frame that was two passes over the payload.

Segmentation offload: a SegmentedFrame (a TCP segment of up to 64 KB, see
stack/wire/vnet.py) goes out through a second packet socket without rings
that carries a virtio_net_hdr (PACKET_VNET_HDR): the NIC or the kernel cuts
it into MSS-sized segments, and on a veth it crosses whole.  One sendmsg()
per 64 KB beats a ring slot of that size (about 5 vs 13 us on a veth here),
and it gathers the frame from its parts in C (netfast.c): the vnet header,
the headers, and the payload straight from the application's send ring, so
no byte of it is copied in user space.
Frames keep their order: queued ring frames are flushed before each one.
`gso_max_size` is 0 when the kernel has no PACKET_VNET_HDR.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import socket
import struct

from mtcpshim.stack import native
from mtcpshim.stack.io.base import (GSO_MAX_SIZE, MAX_FRAME_LEN, PacketIOError, device_segments,
                                     interface_index)
from mtcpshim.stack.wire.vnet import SegmentedFrame

_SOL_PACKET = 263
_PACKET_RX_RING = 5
_PACKET_STATISTICS = 6
_PACKET_VERSION = 10
_PACKET_TX_RING = 13
_PACKET_LOSS = 14
_PACKET_VNET_HDR = 15
_PACKET_QDISC_BYPASS = 20
_PACKET_IGNORE_OUTGOING = 23
_TPACKET_V2 = 1
_ETH_P_ALL = 0x0003
_SIOCGIFHWADDR = 0x8927
_SIOCGIFNAME = 0x8910

# On RX the frame starts after the tpacket2 header, the sockaddr_ll and
# alignment padding: at most 80 bytes in.  An RX slot holds the largest IPv4
# packet (TPACKET_ALIGNMENT: 16); 1 MiB blocks of 15 such slots waste 6%
# where one slot per block would cost a 128 KiB kernel allocation each.
_RX_HEADROOM = 80
RX_SLOT_SIZE = (_RX_HEADROOM + 14 + 4 + 65535 + 15) & ~15
_RX_BLOCK_SIZE = 1 << 20
# TX slots are a power of two so that they tile a page.
TX_SLOT_SIZE = 1 << (_RX_HEADROOM + MAX_FRAME_LEN - 1).bit_length()
_TX_BLOCK_SIZE = max(mmap.PAGESIZE, TX_SLOT_SIZE)
_ETH_P_IP = 0x0800

_TPACKET_REQ = struct.Struct("IIII")       # block size, blocks, frame size, frames
_TPACKET_STATS = struct.Struct("II")       # packets, drops (reading resets them)
# struct sockaddr_ll: family, protocol (network order), ifindex, hatype, pkttype, halen, addr
_SOCKADDR_LL = struct.Struct("=H2siHBB8s")


class AfPacketIO:
    """Packet I/O on interface `ifname` through AF_PACKET mmap rings.

    `rx_slots`/`tx_slots` are the ring sizes in frames.  `counters()` reports
    the rings' drops plus the kernel's (`rx_kernel_drops`: ring full)."""

    def __init__(self, ifname: str, rx_slots: int = 240, tx_slots: int = 1024):
        if not native.ACCELERATED:
            raise PacketIOError("AfPacketIO walks its rings in C: "
                                "build mtcpshim.stack._netfast (pip install -e .)")
        self.ifname = ifname
        try:
            interface_index(ifname)
        except OSError:
            raise PacketIOError(f"no such interface: {ifname}") from None
        try:
            # Protocol 0: nothing is queued before the rings exist; bind() starts RX.
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError:
            raise PacketIOError(f"AF_PACKET on {ifname} needs CAP_NET_RAW "
                                "(run as root or grant the capability)") from None
        self._gso_sock = None
        try:
            self._gso_sock = self._open_gso_socket()
            self._setup(ifname, rx_slots, tx_slots)
        except BaseException:
            if self._gso_sock is not None:
                self._gso_sock.close()
            self._sock.close()
            raise
        self.gso_max_size = GSO_MAX_SIZE if self._gso_sock is not None else 0
        self.device_segments = self.gso_max_size > 0 and device_segments(ifname)
        self._tx_segmented = 0

    def _open_gso_socket(self) -> socket.socket | None:
        """A send-only packet socket whose frames carry a virtio_net_hdr;
        None if the kernel cannot.  Protocol 0: it receives nothing."""
        # No PACKET_QDISC_BYPASS here: the direct path drops a frame that a
        # device without TSO needs cut in software.
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            sock.setsockopt(_SOL_PACKET, _PACKET_VNET_HDR, 1)
        except OSError as error:
            sock.close()
            if error.errno == errno.ENOPROTOOPT:
                return None
            raise
        self._gso_address = _SOCKADDR_LL.pack(socket.AF_PACKET, _ETH_P_IP.to_bytes(2, "big"),
                                              interface_index(self.ifname), 0, 0, 0, b"")
        return sock

    def _setup(self, ifname: str, rx_slots: int, tx_slots: int) -> None:
        ffi, lib = native.ffi, native.lib
        sock = self._sock
        sock.setsockopt(_SOL_PACKET, _PACKET_VERSION, _TPACKET_V2)
        # Skip malformed TX frames (marked WRONG_FORMAT) instead of stalling the ring.
        sock.setsockopt(_SOL_PACKET, _PACKET_LOSS, 1)
        # Bypass the qdisc only when every frame can: segmented frames take
        # the qdisc path, and a frame of a flow must never overtake an
        # earlier one queued there (a NIC's qdisc may hold them).
        wanted = [_PACKET_IGNORE_OUTGOING] + ([] if self._gso_sock else [_PACKET_QDISC_BYPASS])
        for option in wanted:
            try:
                sock.setsockopt(_SOL_PACKET, option, 1)
            except OSError as error:
                if error.errno != errno.ENOPROTOOPT:
                    raise
        rx_per_block, tx_per_block = _RX_BLOCK_SIZE // RX_SLOT_SIZE, _TX_BLOCK_SIZE // TX_SLOT_SIZE
        rx_blocks = -(-rx_slots // rx_per_block)
        tx_blocks = -(-tx_slots // tx_per_block)
        rx_slots, tx_slots = rx_blocks * rx_per_block, tx_blocks * tx_per_block
        sock.setsockopt(_SOL_PACKET, _PACKET_RX_RING,
                        _TPACKET_REQ.pack(_RX_BLOCK_SIZE, rx_blocks, RX_SLOT_SIZE, rx_slots))
        sock.setsockopt(_SOL_PACKET, _PACKET_TX_RING,
                        _TPACKET_REQ.pack(_TX_BLOCK_SIZE, tx_blocks, TX_SLOT_SIZE, tx_slots))
        # One mapping: the RX ring, then the TX ring.
        rx_bytes = rx_blocks * _RX_BLOCK_SIZE
        self._map = mmap.mmap(sock.fileno(), rx_bytes + tx_blocks * _TX_BLOCK_SIZE,
                              mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._map_view = ffi.from_buffer(self._map)
        base = ffi.cast("uint8_t *", self._map_view)
        # Received frames are slices of this view of the RX ring (a cffi
        # buffer: slices of it do not pin the mapping at close).
        self._rx_view = memoryview(ffi.buffer(base, rx_bytes))
        self._rx = ffi.new("struct nf_ring *", {"base": base, "frame_size": RX_SLOT_SIZE, "frame_count": rx_slots,
                                                "frames_per_block": rx_per_block, "block_size": _RX_BLOCK_SIZE})
        self._tx = ffi.new("struct nf_ring *", {"base": base + rx_bytes, "frame_size": TX_SLOT_SIZE,
                                                "frame_count": tx_slots, "frames_per_block": tx_per_block,
                                                "block_size": _TX_BLOCK_SIZE})
        self._rx_slots = rx_slots
        self._rx_spans = ffi.new("uint32_t[]", 2 * rx_slots)
        self._rx_vouched = ffi.new("uint8_t[]", rx_slots)
        self.rx_vouched = None
        self._stats = ffi.new("struct nf_ring_stats *")
        self._rx_kernel_drops = 0
        ifreq = fcntl.ioctl(sock.fileno(), _SIOCGIFHWADDR, struct.pack("16s16x", ifname.encode()))
        self.mac = ifreq[18:24]
        self._ifindex = interface_index(ifname)
        try:
            sock.bind((ifname, _ETH_P_ALL))
        except OSError as error:
            if error.errno == errno.ENODEV:
                raise PacketIOError(f"no such interface: {ifname}") from None
            raise
        self._collect, self._release = lib.nf_rx_collect, lib.nf_rx_release
        self._queue = lib.nf_tx_queue
        self._unpack = ffi.unpack
        self._buffer = ffi.buffer
        self._new_lengths = ffi.new

    def fileno(self) -> int:
        return self._sock.fileno()

    def device_error(self) -> str | None:
        # The interface went down or away (ENETDOWN): until the error is read,
        # poll() reports it at once, forever.  Down may come up again; away not.
        self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        try:  # asked through our socket: the namespace we serve, wherever this thread is
            fcntl.ioctl(self._sock.fileno(), _SIOCGIFNAME, struct.pack("16si12x", b"", self._ifindex))
        except OSError:
            return f"interface {self.ifname} was removed"
        return None

    def recv_batch(self, max_frames: int) -> list[memoryview]:
        self._release(self._rx)           # the slots of the previous batch
        count = self._collect(self._rx, min(max_frames, self._rx_slots), self._rx_spans,
                              self._rx_vouched, self._stats)
        if not count:
            self.rx_vouched = None
            return []
        self.rx_vouched = self._buffer(self._rx_vouched, count)[:]
        ring = self._rx_view
        bounds = iter(self._unpack(self._rx_spans, 2 * count))
        return [ring[start:end] for start, end in zip(bounds, bounds)]

    def send_batch(self, frames: list) -> int:
        if not frames:
            return 0
        if self._gso_sock is None:
            return self._send_ring(frames)
        sent = 0
        start = 0
        for index, frame in enumerate(frames):
            if type(frame) is SegmentedFrame:
                sent += self._send_ring(frames[start:index]) + self._send_segmented(frame)
                start = index + 1
        return sent + self._send_ring(frames[start:])

    def _send_segmented(self, frame: SegmentedFrame) -> int:
        sent = native.send_parts(self._gso_sock.fileno(), self._gso_address,
                                 frame.vnet_header(), frame.headers, frame.payload)
        if sent >= 0:
            self._tx_segmented += 1
            return 1
        if -sent in (errno.EAGAIN, errno.EINTR):
            self._stats.tx_ring_full += 1
        elif -sent in (errno.ENOBUFS, errno.EMSGSIZE, errno.EINVAL):
            self._stats.tx_rejected += 1
        else:
            raise OSError(-sent, f"sendmsg on {self.ifname}: {os.strerror(-sent)}")
        return 0

    def _send_ring(self, frames: list) -> int:
        if not frames:
            return 0
        # One C call for the batch: the frames laid end to end plus their lengths.
        lengths = self._new_lengths("uint32_t[]", [len(frame) for frame in frames])
        queued = self._queue(self._tx, b"".join(frames), lengths, len(frames), self._stats)
        if queued:
            try:
                self._sock.send(b"", socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                pass  # the slots stay marked; the next flush sends them
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
        return queued

    def counters(self) -> dict[str, int]:
        _, drops = _TPACKET_STATS.unpack(
            self._sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, _TPACKET_STATS.size))
        self._rx_kernel_drops += drops
        stats = self._stats
        return {"rx_kernel_drops": self._rx_kernel_drops,
                "rx_truncated": stats.rx_truncated, "rx_merged": stats.rx_merged,
                "rx_csum_vouched": stats.rx_csum_vouched,
                "tx_ring_full": stats.tx_ring_full, "tx_oversize": stats.tx_oversize,
                "tx_rejected": stats.tx_rejected, "tx_segmented": self._tx_segmented}

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        native.ffi.release(self._map_view)
        self._map.close()
        self._sock.close()
        if self._gso_sock is not None:
            self._gso_sock.close()

    def __enter__(self) -> "AfPacketIO":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
