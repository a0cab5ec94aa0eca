"""Ethernet frames built by hand, well-formed or not, for tests of what
reads frames without the stack's parsers (steering: stack/io/steer.py).
Checksums are left 0."""
from __future__ import annotations

import struct

MACS = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02"   # destination, source
SRC_IP, DST_IP = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
ROUTER_IP = bytes([198, 18, 9, 9])


def ethernet(ethertype: int, payload: bytes, macs: bytes = MACS) -> bytes:
    return macs + struct.pack("!H", ethertype) + payload


def ipv4(protocol: int, payload: bytes, options: bytes = b"", fragment: int = 0,
         src: bytes = SRC_IP, dst: bytes = DST_IP) -> bytes:
    """An IPv4 header and `payload`; `fragment` is the flags and offset field."""
    header_len = 20 + len(options)
    return struct.pack("!BBHHHBBH4s4s", 0x40 | header_len // 4, 0, header_len + len(payload), 1,
                       fragment, 64, protocol, 0, src, dst) + options + payload


def tcp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 2, 5 << 4, 0x10, 1000, 0, 0) + payload


def tcp_frame(sport: int, dport: int, ip_options: bytes = b"", payload: bytes = b"",
              fragment: int = 0, macs: bytes = MACS) -> bytes:
    return ethernet(0x0800, ipv4(6, tcp(sport, dport, payload), ip_options, fragment), macs)


def quote(sport: int, dport: int, options: bytes = b"", protocol: int = 6) -> bytes:
    """What an ICMP error quotes of a datagram DST_IP sent to SRC_IP: its
    IPv4 header and the first 8 bytes after it."""
    datagram = ipv4(protocol, struct.pack("!HHI", sport, dport, 7), options, 0x4000, DST_IP, SRC_IP)
    return datagram[:len(options) + 28]


def icmp_error(icmp_type: int, quoted: bytes, code: int = 0, outer_options: bytes = b"",
               macs: bytes = MACS) -> bytes:
    """An ICMP error from ROUTER_IP (the unused word holds a next-hop MTU)."""
    message = struct.pack("!BBHHH", icmp_type, code, 0, 0, 1400) + quoted
    return ethernet(0x0800, ipv4(1, message, outer_options, src=ROUTER_IP), macs)


def icmp_echo(ident: int, seq: int, macs: bytes = MACS) -> bytes:
    return ethernet(0x0800, ipv4(1, struct.pack("!BBHHH", 8, 0, 0, ident, seq) + bytes(56)), macs)


def arp(op: int = 1, macs: bytes = MACS) -> bytes:
    """An ARP request (1) or reply (2) between SRC_IP and DST_IP, padded to 60 bytes."""
    return ethernet(0x0806, struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, macs[6:], SRC_IP,
                                        bytes(6), DST_IP) + bytes(18), macs)
