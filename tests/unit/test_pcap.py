"""PcapWriter output: the classic pcap layout, and tcpdump reads it back."""
import ipaddress
import shutil
import struct
import subprocess

import pytest

from mtcpshim.stack.io.pcap import PcapWriter, start_capture
from mtcpshim.stack.wire.arp import OP_REQUEST, ArpPacket
from mtcpshim.stack.wire.ethernet import BROADCAST, ETHERTYPE_ARP, ETHERTYPE_IPV4, EthernetHeader
from mtcpshim.stack.wire.icmp import TYPE_ECHO_REQUEST, IcmpEcho
from mtcpshim.stack.wire.ipv4 import PROTO_ICMP, Ipv4Header

MAC = bytes.fromhex("020000000001")
PEER_MAC = bytes.fromhex("020000000002")
IP = int(ipaddress.IPv4Address("198.18.0.1"))
PEER_IP = int(ipaddress.IPv4Address("198.18.0.2"))

ARP_REQUEST = EthernetHeader(BROADCAST, MAC, ETHERTYPE_ARP).emit(
    ArpPacket(OP_REQUEST, MAC, IP, bytes(6), PEER_IP).emit())
PING = EthernetHeader(PEER_MAC, MAC, ETHERTYPE_IPV4).emit(
    Ipv4Header(IP, PEER_IP, PROTO_ICMP, ident=1).emit(
        IcmpEcho(TYPE_ECHO_REQUEST, 0x99, 1, b"abcdefgh").emit()))


@pytest.fixture
def capture(tmp_path):
    path = tmp_path / "trace.pcap"
    start_capture(path)
    with PcapWriter(path) as first, PcapWriter(path) as second:   # two stack workers
        first.write(ARP_REQUEST, 1700000000.25)
        second.write(bytearray(PING), 1700000000.500001)
    return path


def test_file_layout(capture):
    data = capture.read_bytes()
    magic, major, minor, _, _, snaplen, linktype = struct.unpack_from("=IHHiIII", data)
    assert (magic, major, minor, snaplen, linktype) == (0xA1B2C3D4, 2, 4, 65535, 1)
    records, offset = [], 24
    while offset < len(data):
        seconds, micros, captured, original = struct.unpack_from("=IIII", data, offset)
        records.append(((seconds, micros), data[offset + 16:offset + 16 + captured], original))
        offset += 16 + captured
    assert records == [((1700000000, 250000), ARP_REQUEST, len(ARP_REQUEST)),
                       ((1700000000, 500001), PING, len(PING))]


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump not installed")
def test_tcpdump_reads_it(capture):
    result = subprocess.run(["tcpdump", "-r", str(capture), "-nn", "-tt"],
                            capture_output=True, text=True, timeout=10, check=True)
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("1700000000.250000 ARP, Request who-has 198.18.0.2 tell 198.18.0.1")
    assert lines[1].startswith("1700000000.500001 IP 198.18.0.1 > 198.18.0.2: ICMP echo request")
