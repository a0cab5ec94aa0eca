"""The virtio_net_hdr in front of received frames (a TAP with IFF_VNET_HDR):
merged frames pass whole, partial checksums are completed, and a header
that points outside its frame or names what we cannot take is refused with
a reason."""
import random

import pytest

from mtcpshim.stack.iface import Interface
from mtcpshim.stack.wire.errors import WireError
from mtcpshim.stack.wire.tcp import ACK, PSH, TcpSegment
from mtcpshim.stack.wire.vnet import (F_DATA_VALID, F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, HEADER,
                             NO_OFFLOAD, received_frame)

MSS = 1448
SENDER_MAC, OUR_MAC = bytes.fromhex("02000000bb02"), bytes.fromhex("02000000aa01")
SENDER_IP, OUR_IP = 0xC6120001, 0xC6120002


def merged_frame(payload_len=3 * MSS + 5):
    """What a local sender hands a TAP: one frame of several MSS with its
    TCP checksum left partial, as the stack's own SegmentedFrame."""
    sender = Interface(SENDER_MAC, SENDER_IP, 24)
    sender._learn(OUR_IP, OUR_MAC, 0.0)
    segment = TcpSegment(80, 40000, 7, 9, ACK | PSH, 100, random.Random(5).randbytes(payload_len),
                         timestamp=(1, 2))
    return sender.frame_tcp(OUR_IP, segment.header(), segment.payload, 0.0, MSS)


def receive(frame):
    src, dst, tcp = Interface(OUR_MAC, OUR_IP, 24).receive(frame, 0.0)
    return TcpSegment.parse(tcp, src, dst)       # the checksum is verified here


def test_a_merged_frame_with_a_partial_checksum_arrives_whole_and_valid():
    frame = merged_frame()
    segment = receive(received_frame(frame.vnet_header() + bytes(frame)))
    assert len(segment.payload) == 3 * MSS + 5 and segment.seq == 7


def test_a_frame_without_offload_passes_unchanged():
    frame = bytearray(bytes(merged_frame(100)))
    frame[50:52] = b"\0\0"    # any checksum: the header claims nothing about it
    assert bytes(received_frame(NO_OFFLOAD + frame)) == bytes(frame)


@pytest.mark.parametrize("header, reason", [
    (HEADER.pack(0x10, GSO_NONE, 0, 0, 0, 0), "vnet_bad_flags"),
    (HEADER.pack(F_NEEDS_CSUM, 4, 54, MSS, 34, 16), "vnet_bad_gso"),          # TCPv6
    (HEADER.pack(F_NEEDS_CSUM, 3, 54, MSS, 34, 6), "vnet_bad_gso"),           # UDP
    (HEADER.pack(F_NEEDS_CSUM, GSO_TCPV4, 54, 0, 34, 16), "vnet_bad_gso"),    # cut by 0
    (HEADER.pack(0, GSO_TCPV4, 54, MSS, 0, 0), "vnet_bad_gso"),               # no checksum state
    (HEADER.pack(F_NEEDS_CSUM, GSO_TCPV4, 54, MSS, 34, 65000), "vnet_bad_csum_offset"),
    (HEADER.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 65530, 0), "vnet_bad_csum_offset"),
    (HEADER.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 4, 0), "vnet_bad_csum_offset"),  # inside Ethernet
])
def test_a_hostile_header_is_refused_with_its_reason(header, reason):
    with pytest.raises(WireError) as refused:
        received_frame(header + bytes(merged_frame()))
    assert refused.value.reason == reason


def test_a_data_valid_merged_frame_passes():
    frame = bytearray(bytes(merged_frame()))
    frame[50:52] = b"\0\0"
    header = HEADER.pack(F_DATA_VALID, GSO_TCPV4, 66, MSS, 0, 0)
    assert bytes(received_frame(header + frame)) == bytes(frame)


def test_too_short_for_a_header_and_an_ethernet_header():
    with pytest.raises(WireError) as refused:
        received_frame(bytes(23))
    assert refused.value.reason == "vnet_truncated"
