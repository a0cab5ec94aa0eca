"""Ethernet, ARP, IPv4 and ICMP echo: round trips, malformed input, and the
C fast paths against their Python definitions."""
import ipaddress
import random

import pytest

from mtcpshim.stack import checksum, native
from mtcpshim.stack.wire.arp import OP_REPLY, OP_REQUEST, ArpPacket
from mtcpshim.stack.wire.errors import WireError
from mtcpshim.stack.wire.ethernet import (BROADCAST, ETHERTYPE_ARP, ETHERTYPE_IPV4,
                                 EthernetHeader, mac_from_str, mac_to_str)
from mtcpshim.stack.wire.icmp import TYPE_ECHO_REPLY, TYPE_ECHO_REQUEST, IcmpEcho
from mtcpshim.stack.wire.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, Ipv4Header

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
IP_A = int(ipaddress.IPv4Address("198.18.0.1"))
IP_B = int(ipaddress.IPv4Address("198.18.0.2"))

needs_c = pytest.mark.skipif(not native.ACCELERATED, reason="mtcpshim.stack._netfast not built")


def expect_wire_error(reason, parse, data):
    with pytest.raises(WireError) as caught:
        parse(data)
    assert caught.value.reason == reason


# ---- Ethernet ---------------------------------------------------------------

def test_ethernet_round_trip():
    frame = EthernetHeader(BROADCAST, MAC_A, ETHERTYPE_ARP).emit(b"payload")
    assert frame[:14] == BROADCAST + MAC_A + b"\x08\x06"
    header, payload = EthernetHeader.parse(frame)
    assert header == EthernetHeader(BROADCAST, MAC_A, ETHERTYPE_ARP)
    assert bytes(payload) == b"payload"


def test_ethernet_truncated():
    expect_wire_error("eth_truncated", EthernetHeader.parse, bytes(13))


def test_mac_text_round_trip():
    assert mac_to_str(MAC_A) == "02:00:00:00:00:01"
    assert mac_from_str("02:00:00:00:00:01") == MAC_A
    with pytest.raises(ValueError):
        mac_from_str("02:00:00")


# ---- ARP --------------------------------------------------------------------

def test_arp_request_wire_layout():
    request = ArpPacket(OP_REQUEST, MAC_A, IP_A, bytes(6), IP_B)
    assert request.emit() == bytes.fromhex(
        "0001 0800 06 04 0001 020000000001 c6120001 000000000000 c6120002")


def test_arp_round_trip_ignores_ethernet_padding():
    reply = ArpPacket(OP_REPLY, MAC_B, IP_B, MAC_A, IP_A)
    assert ArpPacket.parse(reply.emit() + bytes(18)) == reply


@pytest.mark.parametrize("reason, mangle", [
    ("arp_truncated", lambda packet: packet[:27]),
    ("arp_unsupported", lambda packet: b"\x00\x06" + packet[2:]),       # token ring
    ("arp_unsupported", lambda packet: packet[:2] + b"\x86\xdd" + packet[4:]),
    ("arp_unsupported", lambda packet: packet[:5] + b"\x10" + packet[6:]),  # plen 16
    ("arp_bad_operation", lambda packet: packet[:6] + b"\x00\x03" + packet[8:]),
])
def test_arp_malformed(reason, mangle):
    packet = ArpPacket(OP_REQUEST, MAC_A, IP_A, bytes(6), IP_B).emit()
    expect_wire_error(reason, ArpPacket.parse, mangle(packet))


# ---- IPv4 -------------------------------------------------------------------

def test_ipv4_emit_defaults_ttl64_df_and_checksum():
    packet = Ipv4Header(IP_A, IP_B, PROTO_UDP, ident=0x1234).emit(b"x" * 8)
    assert packet[:12] == bytes.fromhex("4500 001c 1234 4000 40 11") + packet[10:12]
    assert checksum.internet_checksum(packet[:20]) == 0
    assert packet[12:20] == bytes.fromhex("c6120001 c6120002")


def test_ipv4_round_trip_cuts_ethernet_padding():
    sent = Ipv4Header(IP_A, IP_B, PROTO_TCP, ident=7)
    header, payload = Ipv4Header.parse(sent.emit(b"abc") + bytes(20))
    assert header == sent
    assert bytes(payload) == b"abc"
    assert not header.is_fragment


def test_ipv4_options_are_skipped_and_kept():
    sent = Ipv4Header(IP_A, IP_B, PROTO_ICMP, options=b"\x01\x01\x01\x00")  # NOP NOP NOP EOL
    header, payload = Ipv4Header.parse(sent.emit(b"data"))
    assert header.options == b"\x01\x01\x01\x00"
    assert bytes(payload) == b"data"


@pytest.mark.parametrize("more_fragments, offset", [(True, 0), (False, 185), (True, 185)])
def test_ipv4_fragments_are_flagged(more_fragments, offset):
    sent = Ipv4Header(IP_A, IP_B, PROTO_UDP, dont_fragment=False,
                      more_fragments=more_fragments, fragment_offset=offset)
    header, _ = Ipv4Header.parse(sent.emit(b"part"))
    assert header.is_fragment
    assert (header.more_fragments, header.fragment_offset) == (more_fragments, offset)


def reseal(header: bytearray) -> bytes:
    """Recompute the header checksum after mangling a field."""
    header[10:12] = b"\0\0"
    header[10:12] = checksum.internet_checksum(header[:20]).to_bytes(2, "big")
    return bytes(header)


@pytest.mark.parametrize("reason, mangle", [
    ("ipv4_truncated", lambda packet: packet[:19]),
    ("ipv4_bad_version", lambda packet: reseal(bytearray(b"\x65" + packet[1:]))),
    ("ipv4_bad_header_len", lambda packet: reseal(bytearray(b"\x44" + packet[1:]))),
    ("ipv4_truncated", lambda packet: reseal(bytearray(b"\x4f" + packet[1:]))[:40]),
    ("ipv4_bad_total_len", lambda packet: reseal(bytearray(packet[:2] + b"\x00\x13" + packet[4:]))),
    ("ipv4_bad_total_len", lambda packet: packet[:-1]),
    ("ipv4_bad_checksum", lambda packet: packet[:8] + b"\x3f" + packet[9:]),  # TTL changed
])
def test_ipv4_malformed(reason, mangle):
    packet = Ipv4Header(IP_A, IP_B, PROTO_TCP).emit(bytes(40))
    expect_wire_error(reason, Ipv4Header.parse, mangle(packet))


# ---- ICMP -------------------------------------------------------------------

def test_icmp_echo_round_trip_and_reply():
    request = IcmpEcho(TYPE_ECHO_REQUEST, ident=0x4242, seq=1, data=b"ping data")
    message = request.emit()
    assert checksum.internet_checksum(message) == 0
    assert IcmpEcho.parse(message) == request
    assert request.reply() == IcmpEcho(TYPE_ECHO_REPLY, 0x4242, 1, b"ping data")


def icmp_message(icmp_type: int, code: int, rest: bytes) -> bytes:
    message = bytearray([icmp_type, code, 0, 0]) + rest
    message[2:4] = checksum.internet_checksum(message).to_bytes(2, "big")
    return bytes(message)


@pytest.mark.parametrize("reason, message", [
    ("icmp_truncated", icmp_message(TYPE_ECHO_REQUEST, 0, b"\0\1")),
    ("icmp_bad_checksum", icmp_message(TYPE_ECHO_REQUEST, 0, b"\0\1\0\2abcd")[:-1] + b"?"),
    ("icmp_unsupported_type", icmp_message(3, 3, bytes(4) + bytes(28))),  # port unreachable
    ("icmp_bad_code", icmp_message(TYPE_ECHO_REQUEST, 1, b"\0\1\0\2")),
])
def test_icmp_malformed(reason, message):
    expect_wire_error(reason, IcmpEcho.parse, message)


# ---- C fast paths -----------------------------------------------------------

@needs_c
def test_c_checksum_equals_python_on_random_data():
    rng = random.Random(1071)
    buffers = [b"", b"\x00", b"\xff", b"\xff\xff", bytes(64), b"\xff" * 1461]
    buffers += [rng.randbytes(rng.randrange(0, 2000)) for _ in range(500)]
    # Merged-frame sizes and all four tails.
    buffers += [b"\xff" * 65535] + [rng.randbytes(n) for n in (65535, 65534, 65533, 65532, 4097)]
    for data in buffers:
        for initial in (0, 1, 0xFFFF, 0x1FFFE, rng.randrange(1 << 32)):
            expected = checksum.ones_complement_sum(data, initial)
            assert native.ones_complement_sum(data, initial) == expected
            assert native.ones_complement_sum(bytearray(data), initial) == expected
            assert native.ones_complement_sum(memoryview(data)[0:], initial) == expected
            assert native.internet_checksum(data, initial) == checksum.internet_checksum(
                data, initial)
    frame = rng.randbytes(9000)
    for shift in (1, 2, 3):                # the vector loop at any alignment
        assert native.ones_complement_sum(memoryview(frame)[shift:]) == checksum.ones_complement_sum(
            frame[shift:])


def python_tcp_frame(dst_mac, src_mac, src_ip, dst_ip, ident, segment):
    segment = bytearray(segment)
    segment[16:18] = b"\0\0"
    tcp_sum = checksum.internet_checksum(
        segment, checksum.pseudo_header_sum(src_ip, dst_ip, PROTO_TCP, len(segment)))
    segment[16:18] = tcp_sum.to_bytes(2, "big")
    packet = Ipv4Header(src_ip, dst_ip, PROTO_TCP, ident).emit(bytes(segment))
    return EthernetHeader(dst_mac, src_mac, ETHERTYPE_IPV4).emit(packet)


@needs_c
def test_c_tcp_frame_equals_python_framing():
    rng = random.Random(793)
    for header_len, payload_len in ((20, 0), (20, 1), (32, 3), (40, 1440), (60, 1401)):
        header = rng.randbytes(header_len)   # checksum field is random: it is ignored
        payload = rng.randbytes(payload_len)
        frame = native.build_tcp_frame(MAC_B, MAC_A, IP_A, IP_B, 0xBEEF, header, memoryview(payload))
        expected = python_tcp_frame(MAC_B, MAC_A, IP_A, IP_B, 0xBEEF, header + payload)
        assert bytes(frame) == expected
        # The headers of the same frame for a gather send: the payload is
        # not read, the TCP checksum holds the pseudo-header sum alone.
        headers = native.build_tcp_headers(MAC_B, MAC_A, IP_A, IP_B, 0xBEEF, header, payload_len)
        pseudo = checksum.ones_complement_sum(b"", checksum.pseudo_header_sum(
            IP_A, IP_B, PROTO_TCP, header_len + payload_len))
        assert bytes(headers) == (expected[:50] + pseudo.to_bytes(2, "big")
                                  + expected[52:34 + header_len])
    for header, payload in ((bytes(19), b""), (bytes(64), b""), (bytes(20), bytes(65496))):
        with pytest.raises(ValueError):
            native.build_tcp_frame(MAC_B, MAC_A, IP_A, IP_B, 1, header, payload)


@needs_c
def test_c_match_accepts_valid_tcp_to_us_and_nothing_else():
    segment = random.Random(9293).randbytes(100)
    frame = python_tcp_frame(MAC_B, MAC_A, IP_A, IP_B, 1, segment) + bytes(6)  # padded
    match = native.match_tcp_frame(frame, MAC_B, IP_B)
    assert (match >> 32, (match >> 16) & 0xFFFF, match & 0xFFFF) == (IP_A, 34, 100)

    assert native.match_tcp_frame(frame, MAC_A, IP_B) == 0            # other MAC
    assert native.match_tcp_frame(frame, MAC_B, IP_A) == 0            # other IP
    corrupt = bytearray(frame)
    corrupt[60] ^= 1
    assert native.match_tcp_frame(bytes(corrupt), MAC_B, IP_B) == 0   # TCP checksum
    corrupt = bytearray(frame)
    corrupt[22] ^= 1
    assert native.match_tcp_frame(bytes(corrupt), MAC_B, IP_B) == 0   # IP checksum
    fragment = bytearray(frame)
    fragment[20] |= 0x20                                                # MF
    assert native.match_tcp_frame(reseal_frame(fragment), MAC_B, IP_B) == 0
    assert native.match_tcp_frame(frame[:100], MAC_B, IP_B) == 0      # cut short


def reseal_frame(frame: bytearray) -> bytes:
    return bytes(frame[:14]) + reseal(bytearray(frame[14:]))
