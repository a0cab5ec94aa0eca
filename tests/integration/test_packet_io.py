"""AfPacketIO and TapIO with an Interface, against a real kernel.

Each test gets two fresh namespaces (mtcpt-<random>-k/-s) joined by a veth
pair: the kernel side has 198.18.220.1/24, the stack side has no kernel
address and an AfPacketIO plus an Interface (198.18.220.2) answering in this
process.  The kernel's defaults stay on (checksum offload) on purpose: its
TCP checksums arrive unfinished and the ring walk must complete them.
"""
import contextlib
import ctypes
import ipaddress
import os
import secrets
import select
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

from mtcpshim.stack import native
from mtcpshim.stack.iface import Interface
from mtcpshim.stack.io.afpacket import AfPacketIO
from mtcpshim.stack.io.base import PacketIOError
from mtcpshim.stack.io.tap import TapIO

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 is not installed"),
]
needs_c = pytest.mark.skipif(not native.ACCELERATED,
                             reason="AfPacketIO needs mtcpshim.stack._netfast")

KERNEL_IP = "198.18.220.1"
_LOCAL_ETHERTYPE = 0x88B5                    # IEEE 802 local experimental: the kernel ignores it
STACK_IP = "198.18.220.2"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@contextlib.contextmanager
def inside_netns(name: str):
    """Runs the block with this thread in namespace `name`.  Sockets opened
    inside stay in that namespace after the thread returns home."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


class Link:
    def __init__(self):
        suffix = secrets.token_hex(3)
        self.kernel_ns = f"mtcpt-{suffix}-k"
        self.stack_ns = f"mtcpt-{suffix}-s"

    def in_kernel_ns(self, argv, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.kernel_ns, *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                **kwargs)


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def link():
    link = Link()
    try:
        _ip("netns", "add", link.kernel_ns)
        _ip("netns", "add", link.stack_ns)
        _ip("-n", link.kernel_ns, "link", "add", "veth0", "type", "veth",
            "peer", "name", "veth0", "netns", link.stack_ns)
        _ip("-n", link.kernel_ns, "addr", "add", f"{KERNEL_IP}/24", "dev", "veth0")
        _ip("-n", link.kernel_ns, "link", "set", "veth0", "up")
        _ip("-n", link.stack_ns, "link", "set", "veth0", "up")
        yield link
    finally:
        for namespace in (link.kernel_ns, link.stack_ns):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)


@pytest.fixture
def stack_side(link):
    if not native.ACCELERATED:
        pytest.skip("AfPacketIO needs mtcpshim.stack._netfast")
    with inside_netns(link.stack_ns):
        io = AfPacketIO("veth0")
    iface = Interface(io.mac, int(ipaddress.IPv4Address(STACK_IP)), 24)
    yield io, iface
    io.close()


def serve(io, iface, client: subprocess.Popen, on_tcp=None, time_limit=15.0) -> str:
    """Runs the receive/transmit loop until `client` exits (bounded in time);
    returns the client's output."""
    poller = select.poll()
    for fd in io.filenos():
        poller.register(fd, select.POLLIN)
    give_up = time.monotonic() + time_limit
    try:
        while client.poll() is None and time.monotonic() < give_up:
            poller.poll(50)
            now = time.monotonic()
            frames = io.recv_batch(64)
            for frame, vouched in zip(frames, io.rx_vouched or bytes(len(frames))):
                delivered = iface.receive(frame, now, vouched)
                if delivered is not None and on_tcp is not None:
                    on_tcp(*delivered, now)
            iface.on_timer(now)
            io.send_batch(iface.take_frames())
    finally:
        if client.poll() is None:
            client.kill()
    return client.communicate(timeout=10)[0]


def test_kernel_ping_is_answered(link, stack_side):
    io, iface = stack_side
    ping = link.in_kernel_ns(["ping", "-c", "3", "-i", "0.2", "-W", "2", STACK_IP])
    output = serve(io, iface, ping)
    assert ping.returncode == 0, output
    assert "3 received" in output
    assert iface.counters["arp_reply_tx"] >= 1
    assert iface.counters["icmp_echo"] == 3


def test_a_burst_of_a_thousand_frames_waits_in_the_rings_whole(link, stack_side):
    """ping -l sends its echo requests back to back, faster than the loop
    reads them: the small-frame ring holds them all (one ring of 240 slots
    sized for 64 KB frames dropped half of them)."""
    io, iface = stack_side
    serve(io, iface, link.in_kernel_ns(["ping", "-c", "1", "-W", "2", STACK_IP]))  # ARP first
    burst = link.in_kernel_ns(["ping", "-q", "-c", "1000", "-l", "1000", "-W", "5", STACK_IP])
    output = serve(io, iface, burst)
    assert "1000 received" in output, output
    assert io.counters()["rx_kernel_drops"] == 0


def test_kernel_syn_arrives_whole_and_our_rst_is_accepted(link, stack_side):
    """The kernel's SYN left its TCP checksum to offload: the ring walk
    vouches for it, and the interface takes it without summing a field that
    holds only the pseudo-header sum.  Our RST goes out through frame_tcp,
    and the kernel, which checks it, reports a refused connection."""
    io, iface = stack_side
    syns = []

    def refuse(src_ip, dst_ip, segment, now):
        src_port, dst_port, seq = struct.unpack_from("!HHI", segment)
        syns.append((src_port, dst_port))
        rst_ack = struct.pack("!HHIIBBHHH", dst_port, src_port, 0, (seq + 1) & 0xFFFFFFFF,
                              5 << 4, 0x14, 0, 0, 0)
        frame = iface.frame_tcp(src_ip, rst_ack, b"", now)
        assert frame is not None            # the kernel's ARP request taught us its MAC
        io.send_batch([frame])

    client = link.in_kernel_ns([sys.executable, "-c", (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('{STACK_IP}', 80), timeout=5)\n"
        "except ConnectionRefusedError:\n"
        "    print('refused')\n")])
    output = serve(io, iface, client, on_tcp=refuse)
    assert output.strip() == "refused"
    assert [dst_port for _, dst_port in syns] == [80]
    assert io.counters()["rx_csum_vouched"] >= 1


def test_a_batch_goes_out_in_order_and_a_refused_frame_is_counted(link, stack_side):
    """Plain frames leave a batch per sendmmsg; one longer than the MTU (and
    not segmented) is refused by the kernel, counted, and the rest still go,
    in order."""
    io, _ = stack_side
    with inside_netns(link.kernel_ns):
        tap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_LOCAL_ETHERTYPE))
    try:
        tap.bind(("veth0", _LOCAL_ETHERTYPE))
        tap.settimeout(5)

        def frame(tag: int, length: int = 100) -> bytes:
            header = b"\xff" * 6 + io.mac + _LOCAL_ETHERTYPE.to_bytes(2, "big")
            return header + tag.to_bytes(2, "big") + bytes(length - len(header) - 2)

        batch = [frame(tag) for tag in range(100)]
        batch[50] = frame(50, 3000)
        assert io.send_batch(batch) == 99
        assert io.counters()["tx_rejected"] == 1
        # 64 frames offered, 50 taken; the refused one alone; the last 49.
        assert io.counters()["tx_syscalls"] == 3
        tags = [int.from_bytes(tap.recv(4096)[14:16], "big") for _ in range(99)]
        assert tags == [tag for tag in range(100) if tag != 50]
    finally:
        tap.close()


@needs_c
def test_missing_interface_is_reported(link):
    with inside_netns(link.stack_ns):
        with pytest.raises(PacketIOError, match="no such interface: nope0"):
            AfPacketIO("nope0")


@needs_c
@pytest.mark.skipif(shutil.which("capsh") is None, reason="capsh is not installed")
def test_missing_privilege_is_reported():
    script = ("from mtcpshim.stack.io.afpacket import AfPacketIO\n"
              "from mtcpshim.stack.io.base import PacketIOError\n"
              "try:\n"
              "    AfPacketIO('lo')\n"
              "except PacketIOError as error:\n"
              "    print(error)\n")
    result = subprocess.run(["capsh", "--drop=cap_net_raw", "--", "-c",
                             f'exec "$0" -c "$1"', sys.executable, script],
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert "needs CAP_NET_RAW" in result.stdout, result.stdout + result.stderr


def test_kernel_ping_over_tap_is_answered(link):
    """The same loop on TapIO: the tap device is the kernel's end of the wire."""
    with inside_netns(link.kernel_ns):
        tap = TapIO("tap-netio")
    try:
        _ip("-n", link.kernel_ns, "addr", "add", "198.18.221.1/24", "dev", tap.name)
        _ip("-n", link.kernel_ns, "link", "set", tap.name, "up")
        iface = Interface(tap.mac, int(ipaddress.IPv4Address("198.18.221.2")), 24)
        ping = link.in_kernel_ns(["ping", "-c", "2", "-i", "0.2", "-W", "2", "198.18.221.2"])
        output = serve(tap, iface, ping)
    finally:
        tap.close()
    assert ping.returncode == 0, output
    assert iface.counters["icmp_echo"] == 2
