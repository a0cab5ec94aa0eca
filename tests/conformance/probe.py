"""A packetdrill-like probe: one TCP connection to the stack, driven segment
by segment from the client namespace.

The probe speaks from PROBE_IP, an address the client's kernel does not own:
the kernel drops the stack's replies to it (not for us, no forwarding) and
so never answers them with RSTs of its own.  The probe answers the stack's
ARP requests for PROBE_IP itself, with the client veth's MAC, and reads the
stack's frames from an AF_PACKET socket on that veth.

    probe = Probe(net, sport=40000, dport=ECHO_PORT)
    probe.snd_nxt = 1000
    probe.send(SYN, ack=0, mss=1460, wscale=7, sack_perm=True)
    synack = probe.expect(SYN | ACK)
    probe.send(ACK)
    probe.send(PSH | ACK, payload=b"hello")
    probe.send(RST, seq=probe.snd_nxt + 100, ack=0)     # in window, not exact
    assert probe.expect(ACK).ack == probe.snd_nxt        # the challenge ACK

`send` defaults seq and ack to the probe's own next sequence number and the
next byte it expects (`snd_nxt`, `rcv_nxt`), which `send` and `receive`
advance; a script may pass any value explicitly to craft a bad segment.
"""
from __future__ import annotations

import ipaddress
import select
import socket
import time

from mtcpshim.netns import enter_netns
from mtcpshim.stack.seq import seq_add
from mtcpshim.stack.wire.arp import OP_REPLY, OP_REQUEST, ArpPacket
from mtcpshim.stack.wire.errors import WireError
from mtcpshim.stack.wire.ethernet import ETHERTYPE_ARP, ETHERTYPE_IPV4, EthernetHeader
from mtcpshim.stack.wire.ipv4 import PROTO_TCP, Ipv4Header
from mtcpshim.stack.wire.tcp import ACK, FIN, PSH, RST, SYN, TcpSegment
from support.net import mac_of

__all__ = ["Probe", "ACK", "FIN", "PSH", "RST", "SYN", "PROBE_IP", "seq_add"]

PROBE_IP = "198.18.0.77"
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4            # sll_pkttype of frames this host sent
DEFAULT_WINDOW = 65535


class Probe:
    """One crafted connection from PROBE_IP:`sport` to the stack's `dport`."""

    def __init__(self, net, sport: int, dport: int):
        self.net = net
        self.sport = sport
        self.dport = dport
        self.stack_ip = int(ipaddress.IPv4Address(net.srv_ip))
        self.probe_ip = int(ipaddress.IPv4Address(PROBE_IP))
        with enter_netns(net.cli_ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((net.cli_if, 0))
        self.mac = self.sock.getsockname()[4][:6]
        self.stack_mac = mac_of(net.srv_ns, net.srv_if)
        self.snd_nxt = 0
        self.rcv_nxt = 0
        self.seen: list[TcpSegment] = []   # everything received, for failure messages

    def close(self) -> None:
        self.sock.close()

    # --- sending ---------------------------------------------------------------

    def send(self, flags: int, seq: int | None = None, ack: int | None = None, payload: bytes = b"",
             window: int = DEFAULT_WINDOW, mss: int | None = None, wscale: int | None = None,
             sack_perm: bool = False, ts: tuple[int, int] | None = None, sack=()) -> TcpSegment:
        """Sends one segment; without an explicit seq it is sent at snd_nxt,
        which then moves past it."""
        if seq is None:
            seq = self.snd_nxt
            self.snd_nxt = seq_add(seq, len(payload) + bool(flags & SYN) + bool(flags & FIN))
        segment = TcpSegment(self.sport, self.dport, seq, self.rcv_nxt if ack is None else ack, flags,
                             window, payload, mss=mss, wscale=wscale, sack_permitted=sack_perm,
                             sack_blocks=tuple(sack), timestamp=ts)
        packet = Ipv4Header(self.probe_ip, self.stack_ip, PROTO_TCP).emit(
            segment.emit(self.probe_ip, self.stack_ip))
        self._send_frame(ETHERTYPE_IPV4, packet)
        return segment

    def _send_frame(self, ethertype: int, payload: bytes) -> None:
        self.sock.send(EthernetHeader(self.stack_mac, self.mac, ethertype).emit(payload))

    # --- receiving ---------------------------------------------------------------

    def expect(self, flags: int | None = None, timeout: float = 2.0, where=None) -> TcpSegment:
        """The next segment of this connection from the stack (with exactly
        `flags`, and for which `where(segment)` holds, if given); segments
        that do not match are skipped.  Fails the test after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            segment = self.receive(deadline - time.monotonic())
            if segment is None:
                raise AssertionError(f"no segment with flags {flags_text(flags)} within {timeout} s; "
                                     f"saw {self.seen[-8:]}")
            if (flags is None or segment.flags == flags) and (where is None or where(segment)):
                return segment

    def expect_none(self, timeout: float, where=None) -> None:
        """Asserts that the stack sends nothing (matching `where`) for `timeout` s."""
        deadline = time.monotonic() + timeout
        while (segment := self.receive(deadline - time.monotonic())) is not None:
            if where is None or where(segment):
                raise AssertionError(f"unexpected {segment}")

    def collect(self, duration: float) -> list[tuple[float, TcpSegment]]:
        """Every segment of this connection in the next `duration` seconds,
        with its arrival time."""
        deadline = time.monotonic() + duration
        segments = []
        while (segment := self.receive(deadline - time.monotonic())) is not None:
            segments.append((time.monotonic(), segment))
        return segments

    def receive(self, timeout: float) -> TcpSegment | None:
        """The next segment of this connection, or None at the timeout.
        Answers the stack's ARP requests for PROBE_IP on the way and moves
        rcv_nxt past in-order data, SYN and FIN."""
        deadline = time.monotonic() + max(timeout, 0)
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.sock], [], [], left)[0]:
                break
            frame, address = self.sock.recvfrom(65536)
            if address[2] == PACKET_OUTGOING:
                continue
            segment = self._parse(frame)
            if segment is not None:
                self.seen.append(segment)
                if segment.seq == self.rcv_nxt or segment.flags & SYN:
                    self.rcv_nxt = seq_add(segment.seq, segment.seg_len)
                return segment
        return None

    def _parse(self, frame: bytes) -> TcpSegment | None:
        try:
            ethernet, payload = EthernetHeader.parse(frame)
            if ethernet.ethertype == ETHERTYPE_ARP:
                self._answer_arp(ArpPacket.parse(payload))
                return None
            if ethernet.ethertype != ETHERTYPE_IPV4:
                return None
            ip, payload = Ipv4Header.parse(payload)
            if (ip.protocol, ip.src, ip.dst) != (PROTO_TCP, self.stack_ip, self.probe_ip):
                return None
            segment = TcpSegment.parse(bytes(payload), ip.src, ip.dst)
        except WireError:
            return None
        if (segment.src_port, segment.dst_port) != (self.dport, self.sport):
            return None
        return segment

    def _answer_arp(self, arp: ArpPacket) -> None:
        if arp.operation == OP_REQUEST and arp.target_ip == self.probe_ip:
            reply = ArpPacket(OP_REPLY, self.mac, self.probe_ip, arp.sender_mac, arp.sender_ip)
            self._send_frame(ETHERTYPE_ARP, reply.emit())

    def read_stream(self, count: int, timeout: float = 5.0, window: int = DEFAULT_WINDOW) -> bytes:
        """The stack's next `count` bytes in order, each segment ACKed as it
        arrives; out-of-order and repeated segments are ignored."""
        deadline = time.monotonic() + timeout
        data = bytearray()
        while len(data) < count:
            expected = self.rcv_nxt
            segment = self.receive(deadline - time.monotonic())
            if segment is None:
                raise AssertionError(f"{len(data)} of {count} bytes within {timeout} s; saw {self.seen[-8:]}")
            if segment.seq == expected and segment.payload:
                data += segment.payload
                self.send(ACK, window=window)
        return bytes(data)

    # --- scripted steps --------------------------------------------------------------

    def handshake(self, isn: int = 1000, window: int = DEFAULT_WINDOW, **options) -> TcpSegment:
        """SYN, SYN-ACK, ACK; returns the SYN-ACK.  `options` as for send()."""
        self.snd_nxt = isn
        self.send(SYN, ack=0, window=window, **options)
        synack = self.expect(SYN | ACK)
        ts = options.get("ts")
        self.send(ACK, window=window, ts=ts and (ts[0] + 1, synack.timestamp[0]))
        return synack


def flags_text(flags: int | None) -> str:
    if flags is None:
        return "any"
    names = ((SYN, "SYN"), (FIN, "FIN"), (RST, "RST"), (PSH, "PSH"), (ACK, "ACK"))
    return "|".join(name for bit, name in names if flags & bit) or "none"
