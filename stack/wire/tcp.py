"""TCP header (RFC 9293 section 3.1) with the options the core negotiates.

`TcpSegment.parse` validates a whole segment (lengths, data offset, option
lengths, checksum) and raises `WireError`; once parsed, every field is a plain
value.  `emit` builds header, options and payload with the checksum filled in.
Option order on output follows Linux, so captures look familiar and every
option stays 4-byte aligned without padding at the end.
"""
import struct

from mtcpshim.stack import checksum
from mtcpshim.stack.wire.errors import WireError

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

IPPROTO_TCP = 6
HEADER_LEN = 20
MAX_OPTIONS_LEN = 40

OPT_END = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERMITTED = 4
OPT_SACK = 5
OPT_TIMESTAMP = 8

# RFC 7323 section 2.3: a larger shift is treated as 14.
MAX_WSCALE = 14

_HEADER = struct.Struct("!HHIIBBHHH")
_HEADER_OFFSET = HEADER_LEN << 2                  # the data offset byte
# The header of an established connection with timestamps, the fixed part
# and NOP, NOP, TIMESTAMP together: one pack on output, one unpack on input
# (which takes the first option word whole, to compare).
_HEADER_NOP_NOP_TS = struct.Struct("!HHIIBBHHHBBBBII")
_HEADER_NOP_NOP_TS_PARSE = struct.Struct("!HHIIBBHHHIII")
_HEADER_NOP_NOP_TS_OFFSET = (HEADER_LEN + 12) << 2
_NOP_NOP_TS_WORD = 0x0101080A
_CHECKSUM = struct.Struct("!H")
_U16 = struct.Struct("!H")
_U32_PAIR = struct.Struct("!II")
_OPT_MSS = struct.Struct("!BBH")
# NOP NOP TIMESTAMP: what every segment carries once timestamps are on.
_OPT_NOP_NOP_TS = struct.Struct("!BBBBII")
_NOP_NOP_SACK_PERMITTED = bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERMITTED, 2))

# tcpdump's flag letters, in tcpdump's order.
_FLAG_LETTERS = ((FIN, "F"), (SYN, "S"), (RST, "R"), (PSH, "P"), (ACK, "."),
                 (URG, "U"), (ECE, "E"), (CWR, "W"))


class TcpSegment:
    """One TCP segment.  `window` is the raw 16-bit header value (unscaled);
    `timestamp` is (tsval, tsecr) or None; `sack_blocks` a tuple of
    (left, right) sequence pairs.  `payload` is bytes or a memoryview (parse
    slices its input, so a memoryview input gives a zero-copy payload that is
    only valid as long as the underlying packet buffer is)."""

    __slots__ = ("src_port", "dst_port", "seq", "ack", "flags", "window",
                 "urgent", "mss", "wscale", "sack_permitted", "sack_blocks",
                 "timestamp", "payload")

    def __init__(self, src_port: int, dst_port: int, seq: int, ack: int,
                 flags: int, window: int, payload=b"", urgent: int = 0,
                 mss=None, wscale=None, sack_permitted: bool = False,
                 sack_blocks: tuple = (), timestamp=None):
        self.src_port = src_port
        self.dst_port = dst_port
        self.seq = seq
        self.ack = ack
        self.flags = flags
        self.window = window
        self.payload = payload
        self.urgent = urgent
        self.mss = mss
        self.wscale = wscale
        self.sack_permitted = sack_permitted
        self.sack_blocks = sack_blocks
        self.timestamp = timestamp

    @property
    def seg_len(self) -> int:
        """Sequence space the segment occupies: payload plus SYN and FIN."""
        return len(self.payload) + (self.flags & SYN) // SYN + (self.flags & FIN)

    @classmethod
    def parse(cls, data, src_ip: int, dst_ip: int,
              verify_checksum: bool = True) -> "TcpSegment":
        length = len(data)
        if length >= HEADER_LEN + 12:
            # Unpack the options a segment usually carries (NOP, NOP,
            # timestamps) with the header; used if that is what they are.
            (src_port, dst_port, seq, ack, offset_byte, flags, window, _, urgent,
             first_option_word, tsval, tsecr) = _HEADER_NOP_NOP_TS_PARSE.unpack_from(data)
        elif length >= HEADER_LEN:
            (src_port, dst_port, seq, ack, offset_byte, flags, window, _,
             urgent) = _HEADER.unpack_from(data)
            first_option_word = None
        else:
            raise WireError("tcp_truncated", f"{length} bytes")
        header_len = (offset_byte >> 4) * 4
        if header_len < HEADER_LEN or header_len > length:
            raise WireError("tcp_bad_offset", f"header {header_len} of {length} bytes")
        if verify_checksum and checksum.internet_checksum(
                data, checksum.pseudo_header_sum(src_ip, dst_ip, IPPROTO_TCP, length)):
            raise WireError("tcp_bad_checksum")
        segment = cls(src_port, dst_port, seq, ack, flags, window,
                      data[header_len:], urgent)
        if header_len == HEADER_LEN:
            return segment
        if header_len == HEADER_LEN + 12 and first_option_word == _NOP_NOP_TS_WORD:
            segment.timestamp = (tsval, tsecr)
            return segment
        segment._parse_options(data, header_len)
        return segment

    def _parse_options(self, data, end: int) -> None:
        sack_blocks = []
        i = HEADER_LEN
        while i < end:
            kind = data[i]
            if kind == OPT_END:
                break
            if kind == OPT_NOP:
                i += 1
                continue
            if i + 1 >= end:
                raise WireError("tcp_bad_option", f"kind {kind} without length")
            option_len = data[i + 1]
            if option_len < 2 or i + option_len > end:
                raise WireError("tcp_bad_option", f"kind {kind} length {option_len}")
            if kind == OPT_MSS:
                _expect_option_len(kind, option_len, 4)
                self.mss = _U16.unpack_from(data, i + 2)[0]
            elif kind == OPT_WSCALE:
                _expect_option_len(kind, option_len, 3)
                self.wscale = min(data[i + 2], MAX_WSCALE)
            elif kind == OPT_SACK_PERMITTED:
                _expect_option_len(kind, option_len, 2)
                self.sack_permitted = True
            elif kind == OPT_SACK:
                if option_len < 10 or (option_len - 2) % 8:
                    raise WireError("tcp_bad_option", f"SACK length {option_len}")
                for at in range(i + 2, i + option_len, 8):
                    sack_blocks.append(_U32_PAIR.unpack_from(data, at))
            elif kind == OPT_TIMESTAMP:
                _expect_option_len(kind, option_len, 10)
                self.timestamp = _U32_PAIR.unpack_from(data, i + 2)
            i += option_len
        self.sack_blocks = tuple(sack_blocks)

    def options_bytes(self) -> bytes:
        """The options field, Linux order: MSS, SACK-permitted/timestamps,
        window scale, SACK blocks; each padded with NOPs to 4 bytes."""
        timestamp = self.timestamp
        options = bytearray()
        if self.mss is not None:
            options += _OPT_MSS.pack(OPT_MSS, 4, self.mss)
        if timestamp is not None:
            if self.sack_permitted:
                options += _OPT_NOP_NOP_TS.pack(OPT_SACK_PERMITTED, 2, OPT_TIMESTAMP,
                                                10, *timestamp)
            else:
                options += _OPT_NOP_NOP_TS.pack(OPT_NOP, OPT_NOP, OPT_TIMESTAMP,
                                                10, *timestamp)
        elif self.sack_permitted:
            options += _NOP_NOP_SACK_PERMITTED
        if self.wscale is not None:
            options += bytes((OPT_NOP, OPT_WSCALE, 3, self.wscale))
        if self.sack_blocks:
            options += bytes((OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(self.sack_blocks)))
            for left, right in self.sack_blocks:
                options += _U32_PAIR.pack(left, right)
        if len(options) > MAX_OPTIONS_LEN:
            raise ValueError(f"TCP options need {len(options)} bytes, at most 40 fit")
        return bytes(options)

    def header(self) -> bytes:
        """Header and options, the checksum field zero: what a framer that
        computes the checksum (or leaves it to the device) sends in front of
        the payload, which stays where it is."""
        if (self.mss is None and self.wscale is None and not self.sack_permitted
                and not self.sack_blocks):
            # Nearly every segment: no options, or only timestamps.
            timestamp = self.timestamp
            if timestamp is not None:
                return _HEADER_NOP_NOP_TS.pack(
                    self.src_port, self.dst_port, self.seq, self.ack, _HEADER_NOP_NOP_TS_OFFSET,
                    self.flags, self.window, 0, self.urgent,
                    OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10, timestamp[0], timestamp[1])
            return _HEADER.pack(self.src_port, self.dst_port, self.seq, self.ack,
                                _HEADER_OFFSET, self.flags, self.window, 0, self.urgent)
        options = self.options_bytes()
        header = bytearray(HEADER_LEN + len(options))
        _HEADER.pack_into(header, 0, self.src_port, self.dst_port, self.seq, self.ack,
                          len(header) << 2, self.flags, self.window, 0, self.urgent)
        header[HEADER_LEN:] = options
        return bytes(header)

    def emit(self, src_ip: int, dst_ip: int) -> bytes:
        """The whole segment, checksum filled, as it goes on the wire."""
        header = bytearray(self.header())
        payload = self.payload
        # Sum the header and the payload separately: the header length is a
        # multiple of 4, so the payload's words stay aligned and need no copy.
        partial = checksum.ones_complement_sum(header, checksum.pseudo_header_sum(
            src_ip, dst_ip, IPPROTO_TCP, len(header) + len(payload)))
        _CHECKSUM.pack_into(header, 16, checksum.internet_checksum(payload, partial))
        return bytes(header) + payload

    def _key(self) -> tuple:
        return (self.src_port, self.dst_port, self.seq, self.ack, self.flags,
                self.window, self.urgent, self.mss, self.wscale, self.sack_permitted,
                tuple(self.sack_blocks), self.timestamp and tuple(self.timestamp),
                bytes(self.payload))

    def __eq__(self, other):
        if not isinstance(other, TcpSegment):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None

    def __repr__(self) -> str:
        flags = "".join(letter for bit, letter in _FLAG_LETTERS if self.flags & bit)
        parts = [f"{self.src_port} > {self.dst_port} [{flags}] seq={self.seq}"]
        if self.flags & ACK:
            parts.append(f"ack={self.ack}")
        parts.append(f"win={self.window}")
        if self.urgent:
            parts.append(f"urg={self.urgent}")
        if self.mss is not None:
            parts.append(f"mss={self.mss}")
        if self.wscale is not None:
            parts.append(f"ws={self.wscale}")
        if self.sack_permitted:
            parts.append("sackOK")
        if self.timestamp is not None:
            parts.append("ts={}/{}".format(*self.timestamp))
        if self.sack_blocks:
            parts.append("sack=" + ",".join(f"{l}-{r}" for l, r in self.sack_blocks))
        parts.append(f"len={len(self.payload)}")
        return f"<TCP {' '.join(parts)}>"


def _expect_option_len(kind: int, actual: int, expected: int) -> None:
    if actual != expected:
        raise WireError("tcp_bad_option", f"kind {kind} length {actual}, expected {expected}")
