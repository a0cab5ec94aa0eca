"""Classic pcap capture files (LINKTYPE_ETHERNET, microsecond timestamps),
readable by tcpdump -r and Wireshark.

Several stack workers (one per core) write one capture: the launcher
starts the file (`start_capture`), and each worker appends to it
(`PcapWriter`), every record with one write(2) on an O_APPEND descriptor,
so that records of different workers never interleave.  A record's place
in the file is when it was written; its timestamp says when it was seen.
"""
import os
import struct

_MAGIC_MICROSECONDS = 0xA1B2C3D4
_LINKTYPE_ETHERNET = 1
_SNAPLEN = 65535
# magic, version 2.4, timezone offset, timestamp accuracy, snaplen, link type
_FILE_HEADER = struct.Struct("=IHHiIII")
# seconds, microseconds, captured length, original length
_RECORD_HEADER = struct.Struct("=IIII")


def start_capture(path) -> None:
    """A new capture file at `path`: its header and no record yet."""
    with open(path, "wb") as capture:
        capture.write(_FILE_HEADER.pack(_MAGIC_MICROSECONDS, 2, 4, 0, 0, _SNAPLEN, _LINKTYPE_ETHERNET))


class PcapWriter:
    """Appends records to a capture file that start_capture made."""

    def __init__(self, path):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def write(self, frame, timestamp: float) -> None:
        """Record `frame` captured at `timestamp` (seconds since the epoch)."""
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            frame = bytes(frame)  # a frame in parts (stack/wire/vnet.py's SegmentedFrame)
        microseconds = round(timestamp * 1_000_000)
        captured = min(len(frame), _SNAPLEN)
        os.write(self._fd, _RECORD_HEADER.pack(microseconds // 1_000_000, microseconds % 1_000_000, captured,
                                               len(frame)) + bytes(frame[:captured]))

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "PcapWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
