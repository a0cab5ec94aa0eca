"""The kernel runs the steering filters as tests/support/cbpf.py does
(issue 14, one stack per core).

Two AfPacketIO workers, steering=(0, 2) and (1, 2), share one end of a veth
pair in a fresh namespace; a raw packet socket on the other end sends
crafted frames: TCP flows both ways (some longer than an MTU, for the
large-frame socket), ARP, ICMP errors quoting TCP, an echo request, frames
cut short.  Each worker must receive exactly the frames the interpreter
says its filters keep: a TCP frame on the one worker worker_of_ports names,
ARP on both, the rest on worker 0.
"""
import os
import secrets
import select
import shutil
import socket
import subprocess
import time

import pytest

from mtcpshim.netns import enter_netns
from mtcpshim.stack import native
from mtcpshim.stack.io.afpacket import AfPacketIO, receive_filter
from mtcpshim.stack.io.steer import ALL_WORKERS, worker_of_frame, worker_of_ports
from support import cbpf
from support.frames import arp, icmp_echo, icmp_error, quote, tcp_frame

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 is not installed"),
    pytest.mark.skipif(not native.ACCELERATED, reason="AfPacketIO needs mtcpshim.stack._netfast"),
]

WORKERS = 2
MTU = 4000                     # room for TCP frames the large-frame socket takes
SENDER_MAC = b"\x02steer"


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def crafted_frames(stack_mac: bytes) -> tuple[list[bytes], dict[bytes, int]]:
    """The frames to send, and each TCP frame's worker by its ports."""
    macs = stack_mac + SENDER_MAC
    tcp = {}
    for sport in range(40000, 40040):
        for dport in (80, 443, 8080):
            tcp[tcp_frame(sport, dport, macs=macs)] = worker_of_ports(sport, dport, WORKERS)
            tcp[tcp_frame(dport, sport, payload=bytes([sport & 0xFF]), macs=macs)] = \
                worker_of_ports(dport, sport, WORKERS)
    for sport in (41000, 41001, 41002, 41003):
        tcp[tcp_frame(sport, 80, payload=bytes(3000), macs=macs)] = worker_of_ports(sport, 80, WORKERS)
    others = [arp(1, macs=b"\xff" * 6 + SENDER_MAC), arp(2, macs=macs), icmp_echo(7, 1, macs=macs),
              tcp_frame(42000, 80, macs=macs)[:36], tcp_frame(42001, 80, macs=macs)[:20]]
    others += [icmp_error(icmp_type, quote(sport, 80), code, macs=macs)
               for icmp_type, code in ((3, 4), (11, 0), (12, 0)) for sport in range(42100, 42104)]
    return list(tcp) + others, tcp


def test_each_frame_reaches_the_workers_the_filters_choose():
    namespace = f"mtcpt-{secrets.token_hex(3)}-w"
    workers, sender = [], None
    try:
        _ip("netns", "add", namespace)
        _ip("-n", namespace, "link", "add", "steer0", "mtu", str(MTU), "type", "veth",
            "peer", "name", "steer1", "mtu", str(MTU))
        for end in ("steer0", "steer1"):
            _ip("-n", namespace, "link", "set", end, "up")
        with enter_netns(namespace):
            for worker in range(WORKERS):
                workers.append(AfPacketIO("steer0", small_slots=512, large_slots=16,
                                          steering=(worker, WORKERS)))
            sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            sender.bind(("steer1", 0))
        frames, tcp = crafted_frames(workers[0].mac)
        # What the interpreter says each worker's two receive filters keep.
        filters = [(receive_filter(False, (worker, WORKERS)), receive_filter(True, (worker, WORKERS)))
                   for worker in range(WORKERS)]
        expected = {frame: {worker for worker, programs in enumerate(filters)
                            if any(cbpf.run(program, frame) for program in programs)}
                    for frame in frames}
        for frame, worker in tcp.items():
            assert expected[frame] == {worker}
        assert all(expected[frame] == ({0, 1} if worker_of_frame(frame, WORKERS) == ALL_WORKERS
                                       else {worker_of_frame(frame, WORKERS)}) for frame in frames)

        for frame in frames:
            assert sender.send(frame) == len(frame)
        received = [[] for _ in workers]
        wanted = sum(len(taken) for taken in expected.values())
        poller = select.poll()
        for io in workers:
            for fd in io.filenos():
                poller.register(fd, select.POLLIN)
        give_up = time.monotonic() + 5
        quiet_until = None           # once all arrived, a last look for frames that should not
        while time.monotonic() < give_up and (quiet_until is None or time.monotonic() < quiet_until):
            poller.poll(50)
            for worker, io in enumerate(workers):
                received[worker] += [bytes(frame) for frame in io.recv_batch(64)]
            if quiet_until is None and sum(map(len, received)) >= wanted:
                quiet_until = time.monotonic() + 0.2

        sent = set(frames)
        got = {frame: set() for frame in frames}
        for worker, batch in enumerate(received):
            mine = [frame for frame in batch if frame in sent]     # the kernel's own frames aside
            assert len(mine) == len(set(mine)), f"worker {worker} got a frame twice"
            for frame in mine:
                got[frame].add(worker)
        wrong = {frame.hex(): (got[frame], expected[frame]) for frame in frames if got[frame] != expected[frame]}
        assert not wrong
    finally:
        for io in workers:
            io.close()
        if sender is not None:
            sender.close()
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)
