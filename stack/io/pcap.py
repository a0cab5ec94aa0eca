"""Classic pcap capture files (LINKTYPE_ETHERNET, microsecond timestamps),
readable by tcpdump -r and Wireshark."""
import struct

_MAGIC_MICROSECONDS = 0xA1B2C3D4
_LINKTYPE_ETHERNET = 1
_SNAPLEN = 65535
# magic, version 2.4, timezone offset, timestamp accuracy, snaplen, link type
_FILE_HEADER = struct.Struct("=IHHiIII")
# seconds, microseconds, captured length, original length
_RECORD_HEADER = struct.Struct("=IIII")


class PcapWriter:
    def __init__(self, path):
        self._file = open(path, "wb")
        self._file.write(_FILE_HEADER.pack(_MAGIC_MICROSECONDS, 2, 4, 0, 0, _SNAPLEN,
                                           _LINKTYPE_ETHERNET))

    def write(self, frame, timestamp: float) -> None:
        """Record `frame` captured at `timestamp` (seconds since the epoch)."""
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            frame = bytes(frame)  # a frame in parts (stack/wire/vnet.py's SegmentedFrame)
        microseconds = round(timestamp * 1_000_000)
        captured = min(len(frame), _SNAPLEN)
        self._file.write(_RECORD_HEADER.pack(microseconds // 1_000_000,
                                             microseconds % 1_000_000, captured, len(frame)))
        self._file.write(frame[:captured])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "PcapWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
