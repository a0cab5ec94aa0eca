import struct

import pytest

from mtcpshim.stack.wire.errors import WireError
from mtcpshim.stack.wire.tcp import ACK, FIN, PSH, SYN, TcpSegment

SRC, DST = 0xC6120001, 0xC6120002


def reference_checksum(src_ip, dst_ip, segment: bytes) -> int:
    """A deliberately naive RFC 1071 sum, independent of mtcpshim.stack.checksum."""
    data = struct.pack("!IIBBH", src_ip, dst_ip, 0, 6, len(segment)) + segment
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def header(src_port=1234, dst_port=80, seq=1, ack=0, offset_words=5, flags=ACK,
           window=1000, options=b"", payload=b"") -> bytes:
    raw = struct.pack("!HHIIBBHHH", src_port, dst_port, seq, ack, offset_words << 4,
                      flags, window, 0, 0) + options + payload
    checksum = reference_checksum(SRC, DST, raw)
    return raw[:16] + checksum.to_bytes(2, "big") + raw[18:]


def test_syn_options_in_linux_order_and_checksum():
    syn = TcpSegment(40000, 80, 0x01020304, 0, SYN, 64240, mss=1460, wscale=7,
                     sack_permitted=True, timestamp=(0x11111111, 0))
    wire = syn.emit(SRC, DST)
    assert wire[20:] == bytes.fromhex("020405b4" "0402080a" "11111111" "00000000" "01030307")
    assert wire[12] >> 4 == 10                               # 40-byte header
    assert reference_checksum(SRC, DST, wire[:16] + b"\0\0" + wire[18:]) == \
        int.from_bytes(wire[16:18], "big")
    assert TcpSegment.parse(wire, SRC, DST) == syn


def test_roundtrip_data_segment_with_timestamps_and_sack():
    segment = TcpSegment(80, 40000, 5, 6, ACK | PSH, 501, b"hello, world",
                         timestamp=(7, 8), sack_blocks=((100, 200), (300, 400)))
    parsed = TcpSegment.parse(segment.emit(SRC, DST), SRC, DST)
    assert parsed == segment
    assert bytes(parsed.payload) == b"hello, world"
    assert parsed.seg_len == 12


def test_parse_of_a_memoryview_gives_a_zero_copy_payload():
    wire = bytearray(TcpSegment(1, 2, 3, 4, ACK, 5, b"abc").emit(SRC, DST))
    parsed = TcpSegment.parse(memoryview(wire), SRC, DST)
    assert isinstance(parsed.payload, memoryview)
    wire[-1] = ord("z")
    assert bytes(parsed.payload) == b"abz"


def test_header_is_the_emitted_segment_before_its_payload_with_the_checksum_zero():
    segment = TcpSegment(1, 2, 3, 4, ACK, 5, b"abc", timestamp=(6, 7))
    header, wire = segment.header(), segment.emit(SRC, DST)
    assert len(header) == 32 and wire[32:] == b"abc"
    assert header[16:18] == b"\0\0" and wire[16:18] != b"\0\0"
    assert header[:16] + header[18:] == wire[:16] + wire[18:32]


def test_seg_len_counts_syn_and_fin():
    assert TcpSegment(1, 2, 0, 0, SYN, 0).seg_len == 1
    assert TcpSegment(1, 2, 0, 0, FIN | ACK, 0, b"ab").seg_len == 3


def test_repr_reads_like_tcpdump():
    segment = TcpSegment(80, 4000, 1, 2, SYN | ACK, 100, mss=1460, sack_permitted=True)
    assert repr(segment) == "<TCP 80 > 4000 [S.] seq=1 ack=2 win=100 mss=1460 sackOK len=0>"


def test_unknown_options_skipped_end_of_list_stops_and_big_shift_clamped():
    options = bytes((30, 4, 0, 0)) + bytes((3, 3, 20)) + bytes((0,)) + bytes((2, 1, 0, 0))
    parsed = TcpSegment.parse(header(offset_words=8, options=options), SRC, DST)
    assert parsed.wscale == 14                                # RFC 7323: at most 14
    assert parsed.mss is None                                 # after End of List


@pytest.mark.parametrize("wire, reason", [
    (header()[:19], "tcp_truncated"),
    (header(offset_words=4), "tcp_bad_offset"),
    (header(offset_words=6), "tcp_bad_offset"),               # header beyond the data
    (header(offset_words=6, options=bytes((2, 0, 0, 0))), "tcp_bad_option"),
    (header(offset_words=6, options=bytes((1, 1, 1, 2))), "tcp_bad_option"),   # no length
    (header(offset_words=6, options=bytes((8, 10, 0, 0))), "tcp_bad_option"),  # overruns
    (header(offset_words=6, options=bytes((2, 3, 5, 1))), "tcp_bad_option"),   # MSS length 3
    (header(offset_words=6, options=bytes((5, 6, 0, 0))), "tcp_bad_option"),   # SACK length 6
], ids=["truncated", "offset-too-small", "offset-too-large", "option-length-zero",
        "option-without-length", "option-overruns", "mss-length", "sack-length"])
def test_malformed_segments_are_rejected(wire, reason):
    with pytest.raises(WireError) as error:
        TcpSegment.parse(wire, SRC, DST)
    assert error.value.reason == reason


def test_bad_checksum_rejected_unless_verification_is_off():
    wire = bytearray(header(payload=b"data"))
    wire[-1] ^= 0x40
    with pytest.raises(WireError) as error:
        TcpSegment.parse(bytes(wire), SRC, DST)
    assert error.value.reason == "tcp_bad_checksum"
    assert bytes(TcpSegment.parse(bytes(wire), SRC, DST, verify_checksum=False).payload) \
        == b"dat!"                                                # "a" ^ 0x40
    with pytest.raises(WireError):
        TcpSegment.parse(header(payload=b"data"), SRC, DST + 1)   # wrong pseudo-header
