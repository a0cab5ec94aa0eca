"""AF_PACKET backend: TPACKET_V2 receive rings in shared mappings, and
batched sends.

RX: the kernel fills ring slots; `recv_batch` walks the ready ones in C
(netfast.c) and returns views of the frames in their slots, which it hands
back to the kernel at the next call: the only copy of a payload is the one
into the application's receive ring.  Two sockets receive, each with its
ring and a classic BPF filter that sorts frames by length: frames up to an
MTU take 2 KB slots, larger ones 64 KB slots, and the walk merges both in
the order the kernel stamped them.  One ring of 64 KB slots held 240 frames
in 16 MB: a frame-exact sender's burst of a 1 MiB window (720 segments)
overflowed it, and a ring that could hold that many would pin 47 MB.
TPACKET_V2, not V3: V3 delivers a block only when it is full or its retire
timer (at least 1 ms) fires, which adds a millisecond at low load.

TX: `send_batch` hands a batch of frames to the kernel with one sendmmsg()
(C, netfast.c), each frame behind a virtio_net_hdr that makes it all linear
skb data.  A TX ring was tried first: its slots become page fragments of the
skb, so every small frame cost a page allocation, and a veth copied it again
to cross into the peer's namespace (skb_copy_ubufs); keep-alive requests
took 5% more stack CPU that way.

The sockets are opened in the network namespace of the calling thread.
Large RX slots hold a whole IPv4 packet of 64 KB: a local kernel sender's
GSO frames and a NIC's GRO-merged frames (offloads at their defaults) arrive
whole, and the TCP core takes one super-segment where it would have taken
45.  Anything larger still is dropped and counted as `rx_truncated`.  Small
RX slots are sized for base.MTU.  Checksums a local sender left
to offload, or the NIC checked, are vouched for (`rx_vouched`, counted as
`rx_csum_vouched`) and never summed: on a 64 KB frame that was two passes
over the payload.

Every frame goes out through a send-only packet socket that carries a
virtio_net_hdr (PACKET_VNET_HDR).  A SegmentedFrame (a TCP segment of up to
64 KB, see stack/wire/vnet.py) asks for segmentation offload: the NIC or the
kernel cuts it into MSS-sized segments, and on a veth it crosses whole.  It
goes with a sendmsg() of its own that gathers it from its parts in C: the
vnet header, the headers, and the payload straight from the application's
send ring or from a mapping of the file it passed to sendfile()
(PayloadParts where it lies in several), so no byte of it is copied or
read in user space (`gathers_payload`).  A file truncated under its mapping
fails that copy with EFAULT: the frame is dropped (`tx_payload_gone`) and
the send buffer resets the connection.  Frames keep their
order: the plain frames before one are sent first.
Where the kernel has no PACKET_VNET_HDR, plain frames go through the
receiving socket without a header, bypassing the qdisc as a NIC driver's
own ring would, and `gso_max_size` is 0.

Steering (issue 14, one stack per core): with `steering=(worker, workers)`
each of N workers opens its own sockets on the interface, and each receive
filter, after its length test, drops the frames another worker takes
(steer.py: a TCP flow by its two ports, ARP to all, the rest to worker 0).
Not PACKET_FANOUT: a fanout group's member index is its join order and
compacts when a member leaves, so a flow's worker would change under it,
and fanout hands ARP to one member only.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import socket
import struct

from mtcpshim.stack import native
from mtcpshim.stack.io.base import (GSO_MAX_SIZE, MAX_FRAME_LEN, PacketIOError, device_segments,
                                     interface_index)
from mtcpshim.stack.io.steer import steering_program
from mtcpshim.stack.wire.vnet import PayloadParts, SegmentedFrame

_SOL_PACKET = 263
_PACKET_RX_RING = 5
_PACKET_STATISTICS = 6
_PACKET_VERSION = 10
_PACKET_VNET_HDR = 15
_PACKET_QDISC_BYPASS = 20
_PACKET_IGNORE_OUTGOING = 23
_TPACKET_V2 = 1
_ETH_P_ALL = 0x0003
_SIOCGIFHWADDR = 0x8927
_SIOCGIFNAME = 0x8910

# On RX the frame starts after the tpacket2 header, the sockaddr_ll and
# alignment padding: at most 80 bytes in.  A large RX slot holds the largest
# IPv4 packet (TPACKET_ALIGNMENT: 16); 1 MiB blocks of 15 such slots waste 6%
# where one slot per block would cost a 128 KiB kernel allocation each.
_RX_HEADROOM = 80
LARGE_SLOT_SIZE = (_RX_HEADROOM + 14 + 4 + 65535 + 15) & ~15
_LARGE_BLOCK_SIZE = 1 << 20
# Small RX slots hold a frame of an MTU; a power of two, so that they tile a
# page.
SMALL_SLOT_SIZE = 1 << (_RX_HEADROOM + MAX_FRAME_LEN - 1).bit_length()
_SMALL_BLOCK_SIZE = max(mmap.PAGESIZE, SMALL_SLOT_SIZE)
_ETH_P_IP = 0x0800

_TPACKET_REQ = struct.Struct("IIII")       # block size, blocks, frame size, frames
_SO_ATTACH_FILTER = 26
# Classic BPF on a packet socket: A = frame length, jump if A > K, return
# K (a verdict is the bytes kept).
_BPF_LD_LEN, _BPF_JGT_K, _BPF_RET_K = 0x80, 0x25, 0x06
_SOCK_FILTER = struct.Struct("HBBI")
_KEEP_ALL, _DROP = 0x40000, 0
_TPACKET_STATS = struct.Struct("II")       # packets, drops (reading resets them)
# struct sockaddr_ll: family, protocol (network order), ifindex, hatype, pkttype, halen, addr
_SOCKADDR_LL = struct.Struct("=H2siHBB8s")


class AfPacketIO:
    """Packet I/O on interface `ifname` through AF_PACKET mmap rings.

    `small_slots`/`large_slots` are the receive rings' sizes in frames
    (64 and 16 MiB).  Small frames come in bursts: wrk opening 10,000
    connections at once overflowed 4,096 slots by 71,000 frames (SYNs, then
    the requests, while the stack worked through them) and 16,384 by
    18,000; 32,768 dropped none.  `counters()` reports the rings' drops plus
    the kernel's (`rx_kernel_drops`: a ring full).  `steering` (worker,
    workers) receives only this worker's frames (module docstring); None:
    every frame."""

    def __init__(self, ifname: str, small_slots: int = 32768, large_slots: int = 240,
                 steering: tuple[int, int] | None = None):
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
        self._large_sock = self._gso_sock = None
        try:
            self._large_sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            self._gso_sock = self._open_gso_socket()
            self._setup(ifname, small_slots, large_slots, steering)
        except BaseException:
            for sock in (self._gso_sock, self._large_sock, self._sock):
                if sock is not None:
                    sock.close()
            raise
        self.gso_max_size = GSO_MAX_SIZE if self._gso_sock is not None else 0
        self.device_segments = self.gso_max_size > 0 and device_segments(ifname)
        self.gathers_payload = self._gso_sock is not None
        self._tx_segmented = 0
        self._tx_payload_gone = 0

    def _open_gso_socket(self) -> socket.socket | None:
        """The send-only packet socket whose frames carry a virtio_net_hdr;
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

    def _setup(self, ifname: str, small_slots: int, large_slots: int,
               steering: tuple[int, int] | None) -> None:
        ffi, lib = native.ffi, native.lib
        for sock in (self._sock, self._large_sock):
            sock.setsockopt(_SOL_PACKET, _PACKET_VERSION, _TPACKET_V2)
            try:
                sock.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
            except OSError as error:
                if error.errno != errno.ENOPROTOOPT:
                    raise
        # Without vnet headers the receiving socket sends too, and may bypass
        # the qdisc: no segmented frame takes the qdisc path beside it, where
        # a NIC's qdisc could hold one while a later frame of its flow overtakes.
        if not self._gso_sock:
            try:
                self._sock.setsockopt(_SOL_PACKET, _PACKET_QDISC_BYPASS, 1)
            except OSError as error:
                if error.errno != errno.ENOPROTOOPT:
                    raise
        _attach_filter(self._sock, receive_filter(longer=False, steering=steering))
        _attach_filter(self._large_sock, receive_filter(longer=True, steering=steering))
        small, small_bytes = _request_ring(self._sock, _PACKET_RX_RING, _SMALL_BLOCK_SIZE,
                                           SMALL_SLOT_SIZE, small_slots)
        large, large_bytes = _request_ring(self._large_sock, _PACKET_RX_RING, _LARGE_BLOCK_SIZE,
                                           LARGE_SLOT_SIZE, large_slots)
        self._maps = [mmap.mmap(sock.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                      for sock, size in ((self._sock, small_bytes),
                                         (self._large_sock, large_bytes))]
        self._map_views = [ffi.from_buffer(mapping) for mapping in self._maps]
        small_base, large_base = (ffi.cast("uint8_t *", view) for view in self._map_views)
        # Received frames are slices of these views of the RX rings (cffi
        # buffers: slices of them do not pin the mappings at close).
        self._rx_views = (memoryview(ffi.buffer(small_base, small_bytes)),
                          memoryview(ffi.buffer(large_base, large_bytes)))
        self._rx_small = ffi.new("struct nf_ring *", dict(small, base=small_base))
        self._rx_large = ffi.new("struct nf_ring *", dict(large, base=large_base))
        self._rx_capacity = small["frame_count"] + large["frame_count"]
        self._rx_spans = ffi.new("uint32_t[]", 2 * self._rx_capacity)
        self._rx_ring_of = ffi.new("uint8_t[]", self._rx_capacity)
        self._rx_vouched = ffi.new("uint8_t[]", self._rx_capacity)
        self.rx_vouched = None
        self._stats = ffi.new("struct nf_ring_stats *")
        self._rx_kernel_drops = 0
        ifreq = fcntl.ioctl(self._sock.fileno(), _SIOCGIFHWADDR, struct.pack("16s16x", ifname.encode()))
        self.mac = ifreq[18:24]
        self._ifindex = interface_index(ifname)
        try:
            for sock in (self._sock, self._large_sock):
                sock.bind((ifname, _ETH_P_ALL))
        except OSError as error:
            if error.errno == errno.ENODEV:
                raise PacketIOError(f"no such interface: {ifname}") from None
            raise
        self._collect, self._release = lib.nf_rx_collect, lib.nf_rx_release
        self._send_frames = lib.nf_send_frames
        # Plain frames go where segmented ones do, behind a vnet header, or
        # through the receiving socket where the kernel has no vnet headers.
        self._plain_vnet = self._gso_sock is not None
        if self._plain_vnet:
            self._plain_fd, self._plain_address = self._gso_sock.fileno(), self._gso_address
        else:
            self._plain_fd, self._plain_address = self._sock.fileno(), _SOCKADDR_LL.pack(
                socket.AF_PACKET, _ETH_P_IP.to_bytes(2, "big"), self._ifindex, 0, 0, 0, b"")
        self._unpack = ffi.unpack
        self._buffer = ffi.buffer
        self._new = ffi.new
        self._from_buffer = ffi.from_buffer

    def filenos(self) -> tuple[int, int]:
        return self._sock.fileno(), self._large_sock.fileno()

    def device_error(self) -> str | None:
        # The interface went down or away (ENETDOWN): until the error is read,
        # poll() reports it at once, forever.  Down may come up again; away not.
        for sock in (self._sock, self._large_sock):
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        try:  # asked through our socket: the namespace we serve, wherever this thread is
            fcntl.ioctl(self._sock.fileno(), _SIOCGIFNAME, struct.pack("16si12x", b"", self._ifindex))
        except OSError:
            return f"interface {self.ifname} was removed"
        return None

    def recv_batch(self, max_frames: int) -> list[memoryview]:
        self._release(self._rx_small)     # the slots of the previous batch
        self._release(self._rx_large)
        count = self._collect(self._rx_small, self._rx_large, min(max_frames, self._rx_capacity),
                              self._rx_spans, self._rx_ring_of, self._rx_vouched, self._stats)
        if not count:
            self.rx_vouched = None
            return []
        self.rx_vouched = self._buffer(self._rx_vouched, count)[:]
        rings = self._rx_views
        bounds = iter(self._unpack(self._rx_spans, 2 * count))
        return [rings[which][start:end]
                for which, start, end in zip(self._buffer(self._rx_ring_of, count)[:], bounds, bounds)]

    def send_batch(self, frames: list) -> int:
        if not frames:
            return 0
        if self._gso_sock is None:
            return self._send_plain(frames)
        sent = 0
        start = 0
        for index, frame in enumerate(frames):
            if type(frame) is SegmentedFrame:
                sent += self._send_plain(frames[start:index]) + self._send_segmented(frame)
                start = index + 1
        return sent + self._send_plain(frames[start:])

    def _send_segmented(self, frame: SegmentedFrame) -> int:
        payload = frame.payload
        parts = ((frame.vnet_header(), frame.headers, *payload.parts) if type(payload) is PayloadParts
                 else (frame.vnet_header(), frame.headers, payload))
        sent = native.send_parts(self._gso_sock.fileno(), self._gso_address, parts)
        self._stats.tx_syscalls += 1
        if sent >= 0:
            self._tx_segmented += 1
            return 1
        if -sent in (errno.EAGAIN, errno.EINTR, errno.ENOBUFS):
            self._stats.tx_busy += 1
        elif -sent in (errno.EMSGSIZE, errno.EINVAL):
            self._stats.tx_rejected += 1
        elif -sent == errno.EFAULT:     # a sendfile span's file was truncated: its socket is reset
            self._tx_payload_gone += 1
        else:
            raise OSError(-sent, f"sendmsg on {self.ifname}: {os.strerror(-sent)}")
        return 0

    def _send_plain(self, frames: list) -> int:
        if not frames:
            return 0
        # One C call for the batch: where each frame is and its length, no byte copied.
        new, at = self._new, self._from_buffer
        starts = new("uint8_t *[]", [at(frame) for frame in frames])
        lengths = new("uint32_t[]", [len(frame) for frame in frames])
        sent = self._send_frames(self._plain_fd, self._plain_address, len(self._plain_address),
                                 self._plain_vnet, starts, lengths, len(frames), self._stats)
        if sent < 0:
            raise OSError(-sent, f"sendmmsg on {self.ifname}: {os.strerror(-sent)}")
        return sent

    def counters(self) -> dict[str, int]:
        for sock in (self._sock, self._large_sock):
            _, drops = _TPACKET_STATS.unpack(
                sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, _TPACKET_STATS.size))
            self._rx_kernel_drops += drops
        stats = self._stats
        return {"rx_kernel_drops": self._rx_kernel_drops,
                "rx_truncated": stats.rx_truncated, "rx_merged": stats.rx_merged,
                "rx_csum_vouched": stats.rx_csum_vouched,
                "tx_busy": stats.tx_busy, "tx_rejected": stats.tx_rejected, "tx_syscalls": stats.tx_syscalls,
                "tx_segmented": self._tx_segmented, "tx_payload_gone": self._tx_payload_gone}

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        for view in self._map_views:
            native.ffi.release(view)
        for mapping in self._maps:
            mapping.close()
        for sock in (self._sock, self._large_sock, self._gso_sock):
            if sock is not None:
                sock.close()

    def __enter__(self) -> "AfPacketIO":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _request_ring(sock: socket.socket, option: int, block_size: int, slot_size: int,
                  slots: int) -> tuple[dict, int]:
    """Asks for a TPACKET_V2 ring of at least `slots` slots; returns its
    nf_ring geometry (without the base) and its size in bytes."""
    per_block = block_size // slot_size
    blocks = -(-slots // per_block)
    slots = blocks * per_block
    sock.setsockopt(_SOL_PACKET, option, _TPACKET_REQ.pack(block_size, blocks, slot_size, slots))
    return ({"frame_size": slot_size, "frame_count": slots, "frames_per_block": per_block,
             "block_size": block_size}, blocks * block_size)


def receive_filter(longer: bool, steering: tuple[int, int] | None) -> list[tuple[int, int, int, int]]:
    """The classic BPF program of a receive socket: it keeps the frames
    longer than an MTU's (`longer`) or the others, and of those the ones
    `steering` gives this worker."""
    taken = [(_BPF_RET_K, 0, 0, _KEEP_ALL)] if steering is None else steering_program(*steering, _KEEP_ALL)
    return [(_BPF_LD_LEN, 0, 0, 0),
            (_BPF_JGT_K, int(longer), int(not longer), MAX_FRAME_LEN),   # past the drop: our lengths
            (_BPF_RET_K, 0, 0, _DROP),
            *taken]


def _attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    code = b"".join(_SOCK_FILTER.pack(*instruction) for instruction in program)
    instructions = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog: the instruction count, then a pointer to them.
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER,
                    struct.pack("HxxxxxxP", len(program), ctypes.addressof(instructions)))
