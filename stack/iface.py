"""One IPv4-over-Ethernet interface: ARP, routing, ICMP echo, and the frame
level of the TCP path.  Sans-IO: frames and time in, frames out.

Receive.  `receive(frame, now)` answers ARP and ICMP echo itself, counts and
drops what is malformed or not ours, and hands TCP to the caller as
`(src_ip, dst_ip, tcp_bytes)`.  The TCP checksum is already verified then, so
the caller parses with `TcpSegment.parse(..., verify_checksum=False)`.  With
the C module built, a valid TCP frame to us costs one C call
(`native.match_tcp_frame`); anything else takes the Python path, which
finds out what the frame is and counts why it is dropped.  An ICMP
"fragmentation needed" quoting a TCP segment from our address returns None,
like any ICMP message, and waits as a `FragmentationNeeded` in
`take_icmp_errors()`, which the caller drains after each batch: whether it
concerns a live connection is for the TCP host to decide.

Transmit.  `frame_tcp(dst_ip, header, payload, now)` turns a TCP header
(`TcpSegment.header()`) and its payload into a frame in one call: a new
buffer receives the Ethernet and IPv4 headers, the TCP header and the one
copy of the payload, and both checksums are computed there.  A segment the
device is to cut (`gso_size`) becomes a SegmentedFrame instead, whose
payload is not copied at all: the packet socket gathers it from where it is.
With a frame arena, that buffer is a part of one reused for every batch
(`reuse_frames()`).
`frame_tcp` returns the frame when the next hop's MAC is known; otherwise it
queues the frame (with its own copy of the payload), starts ARP, returns
None, and the frame comes out of `take_frames()` once the neighbour answers.
`send_ip` does the same for any protocol, always through `take_frames()`.

Time.  `deadline()` is when `on_timer(now)` next has ARP work to do (a retry,
or giving up on a neighbour); None when there is nothing pending.

Counters.  `counters[reason]` counts every drop by the WireError reason or one
of the interface's own (`eth_not_for_us`, `eth_unsupported_type`,
`ipv4_fragment`, `not_for_us`, `tcp_not_unicast`, `ipv4_unsupported_protocol`,
`icmp_unexpected_echo_reply`, `icmp_error_not_ours`, `no_route`,
`arp_queue_overflow`, `arp_unresolved`, `tx_payload_gone`: a frame to hold for ARP
whose sendfile file was truncated), and the totals
`rx_frames`, `tx_frames`, `icmp_echo` (requests answered), `icmp_frag_needed`
(handed up), `arp_request_rx`,
`arp_reply_rx`, `arp_request_tx`, `arp_reply_tx`.
"""
from __future__ import annotations

import ipaddress
from collections import Counter, deque

from mtcpshim.stack import native
from mtcpshim.stack.checksum import pseudo_header_sum
from mtcpshim.stack.wire.arp import OP_REPLY, OP_REQUEST, UNKNOWN_MAC, ArpPacket
from mtcpshim.stack.wire.errors import WireError
from mtcpshim.stack.wire.ethernet import (BROADCAST, ETHERTYPE_ARP, ETHERTYPE_IPV4,
                                 EthernetHeader)
from mtcpshim.stack.wire.icmp import (CODE_FRAGMENTATION_NEEDED, TYPE_DEST_UNREACHABLE,
                             TYPE_ECHO_REQUEST, FragmentationNeeded, IcmpEcho)
from mtcpshim.stack.wire.ipv4 import PROTO_ICMP, PROTO_TCP, Ipv4Header
from mtcpshim.stack.wire.vnet import SegmentedFrame

#: Seconds between ARP requests for a neighbour that has not answered.
ARP_REQUEST_INTERVAL = 1.0
#: Requests sent before the frames waiting for a neighbour are dropped.
ARP_REQUEST_ATTEMPTS = 3
#: Frames held per unresolved neighbour; beyond that the oldest is dropped.
ARP_QUEUE_LIMIT = 32
NEIGHBOUR_LIMIT = 1024     # cached neighbours (Linux's gc_thresh3)

_TCP_CHECKSUM_AT = 16
_FRAGMENTATION_NEEDED = bytes((TYPE_DEST_UNREACHABLE, CODE_FRAGMENTATION_NEEDED))


class _Neighbour:
    """A resolved next hop.  From `refresh_at` on, each use sends a unicast
    ARP request (at most one per ARP_REQUEST_INTERVAL), so a busy neighbour
    is confirmed before its entry expires instead of stalling traffic."""

    __slots__ = ("mac", "expires", "refresh_at")

    def __init__(self, mac: bytes, expires: float, refresh_at: float):
        self.mac = mac
        self.expires = expires
        self.refresh_at = refresh_at


class _Resolution:
    """A next hop being resolved: frames waiting for its MAC (destination
    field still zero) and the ARP request schedule."""

    __slots__ = ("frames", "requests_sent", "next_request")

    def __init__(self, now: float):
        self.frames = deque()
        self.requests_sent = 0
        self.next_request = now


class Interface:
    def __init__(self, mac: bytes, ip: int, prefix_len: int, gateway: int | None = None,
                 arp_timeout: float = 60.0, *, accelerated: bool | None = None, frame_arena: int = 0,
                 answers_arp: bool = True):
        """`accelerated` selects the C paths (default: whenever the C module
        is built); False forces the pure-Python paths, e.g. to compare them.
        `answers_arp`: False for all but one of several stack workers on an
        interface: each sees every ARP frame and learns from it, and one
        answers requests and announces the address.
        `frame_arena` (bytes, C paths only): frame_tcp builds its frames in
        one buffer of that size, used again from the start at each
        `reuse_frames()`; 0 gives each frame a buffer of its own."""
        if len(mac) != 6:
            raise ValueError(f"MAC address of {len(mac)} bytes")
        if not 0 <= prefix_len <= 32:
            raise ValueError(f"prefix length {prefix_len}")
        self.mac = bytes(mac)
        self.ip = ip
        self.prefix_len = prefix_len
        self.netmask = (0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF
        if gateway is not None and (gateway ^ ip) & self.netmask:
            raise ValueError(f"gateway {ipaddress.IPv4Address(gateway)} is not on-link")
        self.gateway = gateway
        self.arp_timeout = arp_timeout
        self.answers_arp = answers_arp
        if accelerated is None:
            accelerated = native.ACCELERATED
        elif accelerated and not native.ACCELERATED:
            raise RuntimeError("mtcpshim.stack._netfast is not built")
        self.accelerated = accelerated
        self._arena = native.FrameArena(frame_arena) if accelerated and frame_arena else None
        self._frame_builder = self._arena.build_tcp_frame if self._arena else native.build_tcp_frame \
            if accelerated else None
        self.counters: Counter[str] = Counter()
        self._neighbours: dict[int, _Neighbour] = {}
        self._resolving: dict[int, _Resolution] = {}
        self._tx_frames: list = []
        self._icmp_errors: list[FragmentationNeeded] = []
        self._ident = 0

    def __repr__(self) -> str:
        return (f"Interface({ipaddress.IPv4Address(self.ip)}/{self.prefix_len}, "
                f"{self.mac.hex(':')})")

    # ---- receive -------------------------------------------------------

    def receive(self, frame, now: float,
                checksum_vouched: bool = False) -> tuple[int, int, memoryview] | None:
        self.counters["rx_frames"] += 1
        if self.accelerated:
            match = native.match_tcp_frame(frame, self.mac, self.ip, checksum_vouched)
            if match:
                start = (match >> 16) & 0xFFFF
                return match >> 32, self.ip, memoryview(frame)[start:start + (match & 0xFFFF)]
        try:
            return self._receive_checked(frame, now, checksum_vouched)
        except WireError as error:
            self.counters[error.reason] += 1
            return None

    def _receive_checked(self, frame, now: float,
                         checksum_vouched: bool) -> tuple[int, int, memoryview] | None:
        ethernet, payload = EthernetHeader.parse(frame)
        if ethernet.dst != self.mac and ethernet.dst != BROADCAST:
            self.counters["eth_not_for_us"] += 1
            return None
        if ethernet.ethertype == ETHERTYPE_ARP:
            self._receive_arp(ArpPacket.parse(payload), now)
            return None
        if ethernet.ethertype != ETHERTYPE_IPV4:
            self.counters["eth_unsupported_type"] += 1
            return None
        ip, payload = Ipv4Header.parse(payload)
        if ip.is_fragment:
            self.counters["ipv4_fragment"] += 1
            return None
        if ip.dst != self.ip:
            self.counters["not_for_us"] += 1
            return None
        if ip.protocol == PROTO_TCP:
            if ethernet.dst != self.mac:
                self.counters["tcp_not_unicast"] += 1
                return None
            if not checksum_vouched and native.internet_checksum(
                    payload, pseudo_header_sum(ip.src, ip.dst, PROTO_TCP, len(payload))):
                raise WireError("tcp_bad_checksum")
            return ip.src, ip.dst, payload
        if ip.protocol == PROTO_ICMP:
            if payload[:2] == _FRAGMENTATION_NEEDED:
                self._receive_fragmentation_needed(FragmentationNeeded.parse(payload))
            else:
                self._receive_icmp(ip.src, IcmpEcho.parse(payload), now)
            return None
        self.counters["ipv4_unsupported_protocol"] += 1
        return None

    def _receive_arp(self, arp: ArpPacket, now: float) -> None:
        is_request = arp.operation == OP_REQUEST
        self.counters["arp_request_rx" if is_request else "arp_reply_rx"] += 1
        # RFC 826: update a known sender; add it only if the packet is for us.
        # Sender 0.0.0.0 is an address probe (RFC 5227), nothing to learn.
        if arp.sender_ip and (arp.target_ip == self.ip or arp.sender_ip in self._neighbours):
            self._learn(arp.sender_ip, arp.sender_mac, now)
        if is_request and arp.target_ip == self.ip and self.answers_arp:
            reply = ArpPacket(OP_REPLY, self.mac, self.ip, arp.sender_mac, arp.sender_ip)
            self._tx_frames.append(
                EthernetHeader(arp.sender_mac, self.mac, ETHERTYPE_ARP).emit(reply.emit()))
            self.counters["arp_reply_tx"] += 1

    def _receive_icmp(self, src_ip: int, echo: IcmpEcho, now: float) -> None:
        if echo.type != TYPE_ECHO_REQUEST:
            self.counters["icmp_unexpected_echo_reply"] += 1
            return
        self.counters["icmp_echo"] += 1
        self.send_ip(src_ip, PROTO_ICMP, echo.reply().emit(), now)

    def _receive_fragmentation_needed(self, error: FragmentationNeeded) -> None:
        if error.src_ip != self.ip:
            # It quotes a datagram we did not send: nothing of ours to fix.
            self.counters["icmp_error_not_ours"] += 1
            return
        self.counters["icmp_frag_needed"] += 1
        self._icmp_errors.append(error)

    def take_icmp_errors(self) -> list[FragmentationNeeded]:
        errors = self._icmp_errors
        if errors:
            self._icmp_errors = []
        return errors

    # ---- transmit ------------------------------------------------------

    def frame_tcp(self, dst_ip: int, header: bytes, payload, now: float,
                  gso_size: int = 0) -> bytearray | SegmentedFrame | None:
        next_hop = self._next_hop(dst_ip)
        if next_hop is None:
            self.counters["no_route"] += 1
            return None
        neighbour = self._neighbours.get(next_hop)
        if neighbour is not None and now < neighbour.expires:
            if now >= neighbour.refresh_at:
                self._refresh(next_hop, neighbour, now)
            self.counters["tx_frames"] += 1
            return self._build_tcp_frame(neighbour.mac, dst_ip, header, payload, gso_size)
        frame = self._build_tcp_frame(UNKNOWN_MAC, dst_ip, header, payload, gso_size)
        if gso_size and (frame := frame.detached()) is None:
            self.counters["tx_payload_gone"] += 1   # the connection's buffer resets it
            return None
        self._hold(next_hop, frame if gso_size else bytearray(frame), now)  # out of the arena
        return None

    def _build_tcp_frame(self, dst_mac: bytes, dst_ip: int, header: bytes, payload,
                         gso_size: int) -> bytearray | SegmentedFrame:
        ident = self._next_ident()
        if self.accelerated:
            if gso_size:
                return SegmentedFrame(native.build_tcp_headers(
                    dst_mac, self.mac, self.ip, dst_ip, ident, header, len(payload)),
                    payload, gso_size)
            return self._frame_builder(dst_mac, self.mac, self.ip, dst_ip, ident, header, payload)
        header = bytearray(header)
        pseudo = pseudo_header_sum(self.ip, dst_ip, PROTO_TCP, len(header) + len(payload))
        if gso_size:
            tcp_checksum = pseudo  # the device completes each piece's checksum
        else:
            header[_TCP_CHECKSUM_AT:_TCP_CHECKSUM_AT + 2] = b"\0\0"
            tcp_checksum = native.internet_checksum(
                payload, native.ones_complement_sum(header, pseudo))
        header[_TCP_CHECKSUM_AT:_TCP_CHECKSUM_AT + 2] = tcp_checksum.to_bytes(2, "big")
        packet = Ipv4Header(self.ip, dst_ip, PROTO_TCP, ident).emit(bytes(header) + bytes(payload))
        frame = bytearray(EthernetHeader(dst_mac, self.mac, ETHERTYPE_IPV4).emit(packet))
        if gso_size:
            return SegmentedFrame(frame[:native.TCP_FRAME_HEADROOM + len(header)], payload, gso_size)
        return frame

    def send_ip(self, dst_ip: int, protocol: int, payload: bytes, now: float) -> None:
        next_hop = self._next_hop(dst_ip)
        if next_hop is None:
            self.counters["no_route"] += 1
            return
        packet = Ipv4Header(self.ip, dst_ip, protocol, self._next_ident()).emit(payload)
        neighbour = self._neighbours.get(next_hop)
        if neighbour is not None and now < neighbour.expires:
            if now >= neighbour.refresh_at:
                self._refresh(next_hop, neighbour, now)
            self._tx_frames.append(
                EthernetHeader(neighbour.mac, self.mac, ETHERTYPE_IPV4).emit(packet))
        else:
            self._hold(next_hop, bytearray(
                EthernetHeader(UNKNOWN_MAC, self.mac, ETHERTYPE_IPV4).emit(packet)), now)

    def reuse_frames(self) -> None:
        """Every frame frame_tcp returned so far is sent or copied: with a
        frame arena, the next ones are built over them."""
        if self._arena is not None:
            self._arena.reuse()

    def take_frames(self) -> list:
        frames, self._tx_frames = self._tx_frames, []
        self.counters["tx_frames"] += len(frames)
        return frames

    def routes(self, dst_ip: int) -> bool:
        """Whether the interface can reach dst_ip (on-link or via the gateway)."""
        return self._next_hop(dst_ip) is not None

    def _next_hop(self, dst_ip: int) -> int | None:
        if not (dst_ip ^ self.ip) & self.netmask:
            return dst_ip
        return self.gateway

    def _next_ident(self) -> int:
        self._ident = (self._ident + 1) & 0xFFFF
        return self._ident

    # ---- ARP -----------------------------------------------------------

    def _hold(self, next_hop: int, frame, now: float) -> None:
        """Queue `frame` until `next_hop` resolves; start resolving it."""
        self._neighbours.pop(next_hop, None)
        resolution = self._resolving.get(next_hop)
        if resolution is None:
            resolution = self._resolving[next_hop] = _Resolution(now)
            self._request_resolution(next_hop, resolution, now)
        if len(resolution.frames) == ARP_QUEUE_LIMIT:
            resolution.frames.popleft()
            self.counters["arp_queue_overflow"] += 1
        resolution.frames.append(frame)

    def _request_resolution(self, next_hop: int, resolution: _Resolution, now: float) -> None:
        self._send_arp_request(next_hop, BROADCAST)
        resolution.requests_sent += 1
        resolution.next_request = now + ARP_REQUEST_INTERVAL

    def announce(self) -> None:
        """Queues a gratuitous ARP (RFC 5227 announcement: a request for our
        own address), so neighbours that cached another MAC for it, from an
        earlier stack or TAP device, update their entry at once."""
        if not self.answers_arp:
            return
        self._send_arp_request(self.ip, BROADCAST)
        self.counters["arp_announce_tx"] += 1

    def _refresh(self, ip: int, neighbour: _Neighbour, now: float) -> None:
        self._send_arp_request(ip, neighbour.mac)
        neighbour.refresh_at = now + ARP_REQUEST_INTERVAL

    def _send_arp_request(self, target_ip: int, eth_dst: bytes) -> None:
        request = ArpPacket(OP_REQUEST, self.mac, self.ip, UNKNOWN_MAC, target_ip)
        self._tx_frames.append(
            EthernetHeader(eth_dst, self.mac, ETHERTYPE_ARP).emit(request.emit()))
        self.counters["arp_request_tx"] += 1

    def _learn(self, ip: int, mac: bytes, now: float) -> None:
        refresh_lead = ARP_REQUEST_ATTEMPTS * ARP_REQUEST_INTERVAL
        neighbours = self._neighbours
        if ip not in neighbours and len(neighbours) >= NEIGHBOUR_LIMIT:
            del neighbours[next(iter(neighbours))]  # the longest known: ARP floods stay bounded
            self.counters["arp_neighbour_evicted"] += 1
        neighbours[ip] = _Neighbour(
            mac, now + self.arp_timeout, now + max(0.0, self.arp_timeout - refresh_lead))
        resolution = self._resolving.pop(ip, None)
        if resolution is not None:
            for frame in resolution.frames:
                (frame.headers if type(frame) is SegmentedFrame else frame)[0:6] = mac
            self._tx_frames.extend(resolution.frames)

    def deadline(self) -> float | None:
        if not self._resolving:
            return None
        return min(resolution.next_request for resolution in self._resolving.values())

    def on_timer(self, now: float) -> None:
        for next_hop, resolution in list(self._resolving.items()):
            if now < resolution.next_request:
                continue
            if resolution.requests_sent < ARP_REQUEST_ATTEMPTS:
                self._request_resolution(next_hop, resolution, now)
            else:
                del self._resolving[next_hop]
                self.counters["arp_unresolved"] += len(resolution.frames)
