"""Random and mutated Ethernet frames aimed at one stack, and a paced sender.

`FrameFuzzer(target, seed).frames(count)` yields (kind, frame, must_drop)
triples.  Frames are built byte by byte (the project's checksum routines fill
in valid checksums where a kind needs them), so that every field can be
wrong on purpose.  `must_drop` marks frames any correct stack must discard
(bad checksums, truncations, fragments, malformed options, addresses that
are not its own...): each of those must show up in some drop counter.

The kinds, chosen at random by weight:

  random_bytes     noise of random length, to random or to the stack's MAC
  other_ethertype  IPv6, 802.1Q-tagged IPv4, random EtherTypes
  truncated        a valid TCP frame cut short anywhere past the Ethernet header
  ip_header        version, header length, total length or checksum wrong
  ip_options       valid IP options (and garbage ones) in front of valid TCP
  fragment         first, middle and last fragments of TCP segments
  wrong_address    another host's IP, broadcast IP, TCP to the broadcast MAC
  other_protocol   UDP, IGMP, GRE, unassigned protocol numbers
  icmp             echo requests and replies, other types, bad checksums
  arp              well-formed and malformed ARP
  tcp_checksum     TCP with a wrong checksum, also on the live transfer's 4-tuple
  tcp_offset       data offset below 5 or past the end of the segment
  tcp_bad_options  option lengths of 0, 1, past the header; wrong lengths for
                   MSS, window scale, SACK, timestamps
  tcp_options      random option bytes (valid or not)
  tcp_flags        every flag combination in turn, valid checksum, random
                   sequence numbers, at a listener or a closed port

Valid TCP (correct checksum) never carries the live transfer's 4-tuple and
never goes to the transfer's listening port: a blind segment that lands in
the window would be accepted by any TCP, and spoofed SYNs there would fill
that listener's backlog (the SYN flood test covers that).
"""
import dataclasses
import random
import struct

from mtcpshim.stack.checksum import pseudo_header_sum
from mtcpshim.stack.native import internet_checksum

ETHERTYPE_IPV4, ETHERTYPE_ARP, ETHERTYPE_IPV6, ETHERTYPE_VLAN = 0x0800, 0x0806, 0x86DD, 0x8100
PROTO_ICMP, PROTO_IGMP, PROTO_TCP, PROTO_UDP, PROTO_GRE = 1, 2, 6, 17, 47
BROADCAST_MAC = b"\xff" * 6
# AF_PACKET refuses a frame shorter than the link header (EINVAL): nothing
# shorter reaches a stack through a veth.
MIN_FRAME_LEN = 14
DF = 0x4000
MF = 0x2000

# Option kinds: end, NOP, MSS, window scale, SACK permitted, SACK, timestamps.
_OPTION_LENGTHS = {2: 4, 3: 3, 4: 2, 8: 10}


@dataclasses.dataclass(frozen=True)
class Target:
    stack_mac: bytes
    client_mac: bytes
    stack_ip: int
    client_ip: int
    fuzz_port: int                  # a listener the fuzzer may hammer
    protected_port: int             # the live transfer's listening port
    protected_client_ports: range   # the live transfer's client ports


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(src: int, dst: int, protocol: int, payload: bytes, *, ttl: int = 64, ident: int = 0,
         flags_offset: int = DF, options: bytes = b"", tos: int = 0) -> bytearray:
    header_len = 20 + len(options)
    packet = bytearray(struct.pack("!BBHHHBBHII", 0x40 | (header_len // 4) & 0x0F, tos,
                                   (header_len + len(payload)) & 0xFFFF, ident, flags_offset, ttl,
                                   protocol, 0, src, dst))
    packet += options
    struct.pack_into("!H", packet, 10, internet_checksum(packet))
    return packet + payload


def tcp(src_ip: int, dst_ip: int, src_port: int, dst_port: int, seq: int, ack: int, flags: int, *,
        window: int = 65535, options: bytes = b"", payload: bytes = b"", data_offset: int | None = None,
        urgent: int = 0) -> bytearray:
    """A TCP segment with a valid checksum (over whatever the header says)."""
    offset = data_offset if data_offset is not None else (20 + len(options)) // 4
    segment = bytearray(struct.pack("!HHIIBBHHH", src_port, dst_port, seq, ack, (offset & 0x0F) << 4,
                                    flags, window, 0, urgent))
    segment += options + payload
    struct.pack_into("!H", segment, 16, internet_checksum(
        segment, pseudo_header_sum(src_ip, dst_ip, PROTO_TCP, len(segment))))
    return segment


def pad4(options: bytes) -> bytes:
    return options + b"\x00" * (-len(options) % 4)


class FrameFuzzer:
    def __init__(self, target: Target, seed: int):
        self.t = target
        self.rng = random.Random(seed)
        self._next_flags = 0
        self._kinds = [
            (self.random_bytes, 6), (self.other_ethertype, 3), (self.truncated, 10), (self.ip_header, 10),
            (self.ip_options, 6), (self.fragment, 6), (self.wrong_address, 6), (self.other_protocol, 4),
            (self.icmp, 5), (self.arp, 5), (self.tcp_checksum, 10), (self.tcp_offset, 6),
            (self.tcp_bad_options, 8), (self.tcp_options, 5), (self.tcp_flags, 10),
        ]
        self._choose = [kind for kind, weight in self._kinds for _ in range(weight)]

    def frames(self, count: int):
        choose = self.rng.choice
        for _ in range(count):
            kind = choose(self._choose)
            frame, must_drop = kind()
            yield kind.__name__, bytes(frame), must_drop

    # -- helpers ----------------------------------------------------------

    def _to_stack(self, ethertype: int, payload: bytes) -> bytes:
        return ethernet(self.t.stack_mac, self.t.client_mac, ethertype, payload)

    def _spoofed_ip(self) -> int:
        """A source in 198.18.0.0/24 other than the two real hosts."""
        return (self.t.client_ip & 0xFFFFFF00) | self.rng.randrange(3, 255)

    def _free_port(self) -> int:
        while True:
            port = self.rng.randrange(1, 65536)
            if port not in self.t.protected_client_ports and port != self.t.protected_port:
                return port

    def _payload(self, limit: int = 200) -> bytes:
        return self.rng.randbytes(self.rng.choice((0, 0, 1, self.rng.randrange(limit))))

    def _valid_tcp_frame(self, flags=None, options=b"", ip_options=b"") -> bytes:
        """A well-formed segment from a spoofed host to the fuzz listener."""
        rng = self.rng
        src = self._spoofed_ip()
        segment = tcp(src, self.t.stack_ip, self._free_port(), self.t.fuzz_port, rng.getrandbits(32),
                      rng.getrandbits(32), rng.getrandbits(8) if flags is None else flags,
                      options=options, payload=self._payload())
        return self._to_stack(ETHERTYPE_IPV4, ipv4(src, self.t.stack_ip, PROTO_TCP, segment, options=ip_options))

    def _live_tuple_tcp(self) -> tuple[int, int, int, int]:
        """(src_ip, dst_ip, src_port, dst_port) of the live transfer."""
        t = self.t
        return t.client_ip, t.stack_ip, self.rng.choice(t.protected_client_ports), t.protected_port

    # -- the kinds ------------------------------------------------------------

    def random_bytes(self):
        rng = self.rng
        noise = rng.randbytes(rng.randrange(MIN_FRAME_LEN, 1515))
        if rng.random() < 0.5:
            noise = self.t.stack_mac + noise[6:]
        return noise, True

    def other_ethertype(self):
        rng = self.rng
        choice = rng.randrange(3)
        if choice == 0:
            ethertype, payload = ETHERTYPE_IPV6, b"\x60" + rng.randbytes(rng.randrange(39, 200))
        elif choice == 1:
            src = self._spoofed_ip()
            inner = ipv4(src, self.t.stack_ip, PROTO_TCP, tcp(src, self.t.stack_ip, self._free_port(),
                                                             self.t.fuzz_port, 1, 0, 0x02))
            ethertype, payload = ETHERTYPE_VLAN, struct.pack("!HH", rng.randrange(4096), ETHERTYPE_IPV4) + inner
        else:
            ethertype = rng.randrange(0x600, 0x10000)
            if ethertype in (ETHERTYPE_IPV4, ETHERTYPE_ARP):
                ethertype = 0x88CC  # LLDP
            payload = rng.randbytes(rng.randrange(46, 200))
        return self._to_stack(ethertype, payload), True

    def truncated(self):
        rng = self.rng
        if rng.random() < 0.5:
            src, dst, sport, dport = self._live_tuple_tcp()
            segment = tcp(src, dst, sport, dport, rng.getrandbits(32), rng.getrandbits(32), 0x10,
                          payload=rng.randbytes(rng.randrange(1, 1400)))
            frame = self._to_stack(ETHERTYPE_IPV4, ipv4(src, dst, PROTO_TCP, segment))
        else:
            frame = self._valid_tcp_frame(flags=rng.choice((0x02, 0x10, 0x18, 0x11)),
                                          options=pad4(b"\x02\x04\x05\xb4\x04\x02\x08\x0a" + bytes(8)))
        # Cut inside the Ethernet header, the IP header, the TCP header or the payload.
        return frame[:rng.randrange(MIN_FRAME_LEN, len(frame))], True

    def ip_header(self):
        rng = self.rng
        src, dst, sport, dport = self._live_tuple_tcp()
        segment = tcp(src, dst, sport, dport, rng.getrandbits(32), rng.getrandbits(32), 0x10,
                      payload=self._payload())
        packet = ipv4(src, dst, PROTO_TCP, segment)
        damage = rng.randrange(5)
        if damage == 0:                                   # version
            packet[0] = (rng.choice((0, 1, 5, 6, 7, 15)) << 4) | (packet[0] & 0x0F)
        elif damage == 1:                                 # header length below 20 or past the packet
            packet[0] = 0x40 | rng.choice((0, 1, 2, 3, 4, 15))
            if (packet[0] & 0x0F) * 4 <= len(packet):
                packet[0] = 0x40 | rng.choice((0, 1, 2, 3, 4))
        elif damage == 2:                                 # total length past the frame or below the header
            total = rng.choice((rng.randrange(len(packet) + 1, 65536), rng.randrange(0, 20)))
            struct.pack_into("!H", packet, 2, total)
        elif damage == 3:                                 # header checksum
            packet[10] ^= 1 << rng.randrange(8)
        else:                                             # any bit of the header, checksum left stale
            packet[rng.randrange(0, 20)] ^= 1 << rng.randrange(8)
            if internet_checksum(packet[:20]) == 0:       # flipped a bit the checksum cannot see
                packet[11] ^= 1
        if damage in (0, 1, 2):
            struct.pack_into("!H", packet, 10, 0)
            struct.pack_into("!H", packet, 10, internet_checksum(packet[:max(20, (packet[0] & 0x0F) * 4)]))
        return self._to_stack(ETHERTYPE_IPV4, packet), True

    def ip_options(self):
        rng = self.rng
        choice = rng.randrange(4)
        if choice == 0:                                   # NOPs and an end of list
            options = bytes([1] * rng.randrange(1, 8)) + b"\x00"
        elif choice == 1:                                 # record route
            slots = rng.randrange(1, 10)
            options = bytes((7, 3 + 4 * slots, 4)) + bytes(4 * slots)
        elif choice == 2:                                 # timestamp, router alert
            options = bytes((68, 12, 5, 0)) + bytes(8) if rng.random() < 0.5 else b"\x94\x04\x00\x00"
        else:                                             # garbage
            options = rng.randbytes(rng.randrange(1, 41))
        return self._valid_tcp_frame(ip_options=pad4(options)[:40]), False

    def fragment(self):
        rng = self.rng
        src, dst, sport, dport = self._live_tuple_tcp()
        segment = tcp(src, dst, sport, dport, rng.getrandbits(32), rng.getrandbits(32), 0x18,
                      payload=rng.randbytes(rng.randrange(8, 800)))
        where = rng.randrange(3)
        flags_offset = (MF if where < 2 else 0) | (0 if where == 0 else rng.randrange(1, 0x2000))
        if where == 0:
            segment = segment[:8 * rng.randrange(1, max(2, len(segment) // 8))]
        packet = ipv4(src, dst, PROTO_TCP, segment, ident=rng.getrandbits(16), flags_offset=flags_offset)
        return self._to_stack(ETHERTYPE_IPV4, packet), True

    def wrong_address(self):
        rng = self.rng
        src = self._spoofed_ip()
        choice = rng.randrange(3)
        if choice == 0:                                   # another host's address
            dst = rng.choice(((self.t.stack_ip & 0xFFFFFF00) | rng.randrange(3, 255), 0xFFFFFFFF,
                              (self.t.stack_ip & 0xFFFFFF00) | 0xFF, 0, 0xE0000001, rng.getrandbits(32)))
            if dst == self.t.stack_ip:
                dst ^= 1
            segment = tcp(src, dst, self._free_port(), self.t.fuzz_port, rng.getrandbits(32), 0, 0x02)
            frame = self._to_stack(ETHERTYPE_IPV4, ipv4(src, dst, PROTO_TCP, segment))
        elif choice == 1:                                 # TCP to us but sent to the broadcast MAC
            segment = tcp(src, self.t.stack_ip, self._free_port(), self.t.fuzz_port, rng.getrandbits(32), 0, 0x02)
            frame = ethernet(BROADCAST_MAC, self.t.client_mac, ETHERTYPE_IPV4,
                             ipv4(src, self.t.stack_ip, PROTO_TCP, segment))
        else:                                             # another host's MAC
            segment = tcp(src, self.t.stack_ip, self._free_port(), self.t.fuzz_port, rng.getrandbits(32), 0, 0x02)
            mac = bytes((rng.randrange(256) & 0xFE,)) + rng.randbytes(5)
            if mac == self.t.stack_mac:
                mac = b"\x02" + mac[1:]
            frame = ethernet(mac, self.t.client_mac, ETHERTYPE_IPV4, ipv4(src, self.t.stack_ip, PROTO_TCP, segment))
        return frame, True

    def other_protocol(self):
        rng = self.rng
        src = self._spoofed_ip()
        protocol = rng.choice((PROTO_UDP, PROTO_IGMP, PROTO_GRE, 41, 50, 132, 253, 255, rng.randrange(7, 256)))
        if protocol == PROTO_TCP:
            protocol = PROTO_UDP
        return self._to_stack(ETHERTYPE_IPV4, ipv4(src, self.t.stack_ip, protocol, self._payload())), True

    def icmp(self):
        rng = self.rng
        src = self._spoofed_ip()
        icmp_type = rng.choice((0, 3, 5, 8, 8, 11, 13, rng.randrange(256)))
        message = bytearray(struct.pack("!BBHHH", icmp_type, rng.choice((0, 0, rng.randrange(256))), 0,
                                        rng.getrandbits(16), rng.getrandbits(16)) + self._payload(100))
        struct.pack_into("!H", message, 2, internet_checksum(message))
        if rng.random() < 0.3:
            message[rng.randrange(len(message))] ^= 1 << rng.randrange(8)
        if rng.random() < 0.1:
            message = message[:rng.randrange(len(message))]
        return self._to_stack(ETHERTYPE_IPV4, ipv4(src, self.t.stack_ip, PROTO_ICMP, bytes(message))), False

    def arp(self):
        rng = self.rng
        # Never claim the real client's address: that would be a working ARP
        # spoof (a kernel would believe it too), not a malformed frame.
        sender_ip = rng.choice((self._spoofed_ip(), 0, rng.getrandbits(32)))
        if sender_ip == self.t.client_ip:
            sender_ip = self._spoofed_ip()
        target_ip = rng.choice((self.t.stack_ip, self._spoofed_ip()))
        hardware, protocol, hlen, plen = 1, 0x0800, 6, 4
        damage = rng.randrange(4)
        if damage == 1:
            hardware, protocol, hlen, plen = rng.choice(((6, 0x0800, 6, 4), (1, 0x86DD, 6, 16), (1, 0x0800, 8, 4)))
        operation = rng.choice((1, 2)) if damage != 2 else rng.randrange(3, 65536)
        packet = struct.pack("!HHBBH6sI6sI", hardware, protocol, hlen, plen, operation,
                             bytes((rng.randrange(256) & 0xFE,)) + rng.randbytes(5), sender_ip,
                             bytes(6), target_ip)
        if damage == 3:
            packet = packet[:rng.randrange(28)]
        dst = rng.choice((BROADCAST_MAC, self.t.stack_mac))
        return ethernet(dst, self.t.client_mac, ETHERTYPE_ARP, packet), False

    def tcp_checksum(self):
        rng = self.rng
        if rng.random() < 0.5:
            src, dst, sport, dport = self._live_tuple_tcp()
        else:
            src, dst, sport, dport = self._spoofed_ip(), self.t.stack_ip, self._free_port(), self.t.fuzz_port
        segment = tcp(src, dst, sport, dport, rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(8),
                      payload=self._payload(1400))
        segment[16 + rng.randrange(2)] ^= 1 << rng.randrange(8)
        return self._to_stack(ETHERTYPE_IPV4, ipv4(src, dst, PROTO_TCP, segment)), True

    def tcp_offset(self):
        rng = self.rng
        src, dst, sport, dport = self._live_tuple_tcp()
        payload = self._payload(60)
        length = 20 + len(payload)
        offset = rng.choice([o for o in range(16) if o < 5 or o * 4 > length])
        segment = tcp(src, dst, sport, dport, rng.getrandbits(32), rng.getrandbits(32), 0x10,
                      payload=payload, data_offset=offset)
        return self._to_stack(ETHERTYPE_IPV4, ipv4(src, dst, PROTO_TCP, segment)), True

    def tcp_bad_options(self):
        rng = self.rng
        choice = rng.randrange(4)
        if choice == 0:                                   # a length below 2
            options = bytes((rng.choice((2, 3, 5, 8, rng.randrange(9, 256))), rng.randrange(2)))
        elif choice == 1:                                 # a length past the header
            options = bytes((rng.choice((2, 3, 5, 8, 30)), rng.randrange(40, 256)))
        elif choice == 2:                                 # a known kind with the wrong length
            kind = rng.choice(list(_OPTION_LENGTHS))
            length = rng.choice([n for n in range(2, 12) if n != _OPTION_LENGTHS[kind]])
            options = bytes((kind, length)) + bytes(length - 2)
        else:                                             # SACK blocks that are not 8 bytes each
            length = rng.choice((3, 4, 9, 11, 17, 35))
            options = bytes((5, length)) + rng.randbytes(length - 2)
        options = pad4(bytes([1] * rng.randrange(3)) + options)
        return self._valid_tcp_frame(flags=rng.choice((0x02, 0x10, 0x18, 0x12)), options=options), True

    def tcp_options(self):
        return self._valid_tcp_frame(options=pad4(self.rng.randbytes(self.rng.randrange(1, 41)))[:40]), False

    def tcp_flags(self):
        flags, self._next_flags = self._next_flags, (self._next_flags + 1) % 256
        rng = self.rng
        dst_port = self.t.fuzz_port if rng.random() < 0.5 else self._free_port()
        src = self._spoofed_ip()
        options = rng.choice((b"", b"\x02\x04\x05\xb4", b"\x01\x03\x03\x07", b"\x04\x02\x00\x00"))
        segment = tcp(src, self.t.stack_ip, self._free_port(), dst_port, rng.getrandbits(32),
                      rng.getrandbits(32), flags, options=options, payload=self._payload(),
                      urgent=rng.getrandbits(16) if flags & 0x20 else 0, window=rng.getrandbits(16))
        return self._to_stack(ETHERTYPE_IPV4, ipv4(src, self.t.stack_ip, PROTO_TCP, segment)), False


def send_frames(sock, frames, rate: float, time_limit: float, clock, sleep) -> tuple[int, float]:
    """Sends `frames` on `sock` at about `rate` frames/s, in bursts; stops
    at `time_limit` seconds.  Returns (frames sent, seconds taken)."""
    burst = 64
    started = clock()
    sent = 0
    send = sock.send
    for frame in frames:
        send(frame)
        sent += 1
        if sent % burst == 0:
            elapsed = clock() - started
            if elapsed > time_limit:
                break
            ahead = sent / rate - elapsed
            if ahead > 0:
                sleep(ahead)
    return sent, clock() - started
