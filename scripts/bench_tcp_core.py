#!/usr/bin/env python3
"""Micro-benchmark of the TCP core's hot path: established connections,
in-order data and pure ACKs.  Prints segments per second for each case.

    python3 scripts/bench_tcp_core.py [--segments N] [--repeat R] [--congestion NAME] [--case NAME]
                                      [--connections C]

Cases:
  receive   in-order full-size data segments into TcpConnection.on_segment,
            the application reading everything, one ACK collected per batch
            of 16 segments (as the runtime does with a receive batch);
  send      pure ACKs into on_segment, each acknowledging two segments and
            releasing two new ones from a send buffer kept full;
  host-rx   the receive case through TcpHost.receive: parse, demux, timers
            and emitting the ACKs included;
  keepalive HTTP-like request/response over C connections (64) through the
            whole stack runtime (shared-memory region, Interface, TcpHost),
            as a keep-alive benchmark drives it: a request frame in, the
            application answers, a response frame out.  Only the runtime's
            own steps are timed, not the peer or the application's side;
  close     `Connection: close` through the whole runtime the same way:
            handshake, request, response with FIN, the client's FIN.

Segments are built before the clock starts, so only the core is measured
(keepalive: requests per second instead of segments).
The clock is the process's CPU time, so other load on the machine skews
less; every case runs R times and the best run is reported.
"""
import argparse
import functools
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtcpshim._shm import ffi, lib                  # noqa: E402
from mtcpshim.region import Region, RegionSize      # noqa: E402
from mtcpshim.runtime import Runtime                # noqa: E402
from mtcpshim.stack.host import TcpHost                      # noqa: E402
from mtcpshim.stack.iface import Interface                   # noqa: E402
from mtcpshim.stack.node import Node                         # noqa: E402
from mtcpshim.stackd import FRAME_ARENA_BYTES                # noqa: E402
from mtcpshim.stack.storage import RingBuffer                # noqa: E402
from mtcpshim.stack.tcp import TcpConfig, TcpConnection      # noqa: E402
from mtcpshim.stack.wire.tcp import ACK, PSH, SYN, TcpSegment  # noqa: E402

LOCAL_IP, REMOTE_IP = 0xC6120002, 0xC6120001
LOCAL_PORT, REMOTE_PORT = 80, 40000
MSS = 1448                     # 1460 minus the timestamp option
BATCH = 16
BUFFER = 4 << 20
# Start near the top of the sequence space so every run crosses the wrap.
LOCAL_ISS, REMOTE_ISS = 2**32 - 100_000, 2**32 - 200_000


CONFIG = TcpConfig()


def established(now=0.0):
    """A passively opened connection with timestamps, SACK and scaling."""
    config = CONFIG
    syn = TcpSegment(REMOTE_PORT, LOCAL_PORT, REMOTE_ISS, 0, SYN, 65535, mss=1460,
                     wscale=7, sack_permitted=True, timestamp=(1, 0))
    conn = TcpConnection.accept(config, LOCAL_IP, LOCAL_PORT, REMOTE_IP, REMOTE_PORT, syn,
                                RingBuffer(BUFFER), RingBuffer(BUFFER), LOCAL_ISS, now)
    conn.take_output()
    conn.on_segment(TcpSegment(REMOTE_PORT, LOCAL_PORT, REMOTE_ISS + 1, LOCAL_ISS + 1, ACK,
                               1 << 15, timestamp=(2, 0)), now)
    conn.events = 0
    return conn


def data_segments(count):
    payload = bytes(MSS)
    return [TcpSegment(REMOTE_PORT, LOCAL_PORT, (REMOTE_ISS + 1 + i * MSS) & 0xFFFFFFFF,
                       LOCAL_ISS + 1, ACK | PSH, 1 << 15, payload, timestamp=(3 + i, 0))
            for i in range(count)]


def bench_receive(count):
    conn = established()
    segments = data_segments(count)
    recv_buf = conn.recv_buf
    now = 0.001
    start = time.process_time()
    for first in range(0, count, BATCH):
        for segment in segments[first:first + BATCH]:
            conn.on_segment(segment, now)
        recv_buf.consume(len(recv_buf))
        conn.recv_consumed(now)
        conn.take_output()
        conn.events = 0
        now += 0.0001
    return count / (time.process_time() - start)


def bench_send(count):
    conn = established()
    send_buf = conn.send_buf
    chunk = bytes(64 * 1024)
    send_buf.write(chunk)
    conn.send_ready(0.001)
    conn.take_output()
    acks = [TcpSegment(REMOTE_PORT, LOCAL_PORT, REMOTE_ISS + 1,
                       (LOCAL_ISS + 1 + 2 * (i + 1) * MSS) & 0xFFFFFFFF, ACK, 1 << 15,
                       timestamp=(3 + i, 1)) for i in range(count)]
    now = 0.001
    start = time.process_time()
    for ack in acks:
        conn.on_segment(ack, now)
        if send_buf.space() >= len(chunk):
            send_buf.write(chunk)
            conn.send_ready(now)
        conn.take_output()
        conn.events = 0
        now += 0.00001
    elapsed = time.process_time() - start
    assert conn.snd_una == acks[-1].ack, "the sender fell behind the scripted ACKs"
    return count / elapsed


def bench_host_receive(count):
    host = TcpHost(LOCAL_IP, CONFIG)
    host.listen(LOCAL_PORT, 8, lambda ip, port: (RingBuffer(BUFFER), RingBuffer(BUFFER), None))
    syn = TcpSegment(REMOTE_PORT, LOCAL_PORT, REMOTE_ISS, 0, SYN, 65535, mss=1460, wscale=7,
                     sack_permitted=True, timestamp=(1, 0))
    host.receive(REMOTE_IP, LOCAL_IP, syn.emit(REMOTE_IP, LOCAL_IP), 0.0)
    (conn,) = host.connections.values()
    host.receive(REMOTE_IP, LOCAL_IP, TcpSegment(
        REMOTE_PORT, LOCAL_PORT, REMOTE_ISS + 1, conn.iss + 1, ACK, 1 << 15,
        timestamp=(2, 0)).emit(REMOTE_IP, LOCAL_IP), 0.0)
    host.take_output()
    wires = []
    for segment in data_segments(count):
        segment.ack = (conn.iss + 1) & 0xFFFFFFFF
        wires.append(segment.emit(REMOTE_IP, LOCAL_IP))
    recv_buf = conn.recv_buf
    now = 0.001
    start = time.process_time()
    for first in range(0, count, BATCH):
        for wire in wires[first:first + BATCH]:
            host.receive(REMOTE_IP, LOCAL_IP, wire, now)
        recv_buf.consume(len(recv_buf))
        conn.recv_consumed(now)
        host.collect(conn, now)
        host.on_timers(now)
        host.take_output()
        host.touched.clear()
        conn.events = 0
        now += 0.0001
    return count / (time.process_time() - start)


LOCAL_MAC, REMOTE_MAC = bytes.fromhex("020000000002"), bytes.fromhex("020000000001")
HTTP_PORT = 8080
CONNECTIONS = 64
PEER_BUFFER = 64 * 1024
REQUEST = b"GET /small.txt HTTP/1.1\r\nHost: 198.18.0.2:8080\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n" + b"x" * 63 + b"\n"


class _MemoryLink:
    """The runtime's packet I/O: frames go to and come from lists."""

    def __init__(self):
        self.inbound, self.outbound = [], []
        self._fds = os.pipe()             # never readable: a fd for poll() (PyPy 3.9 has no os.eventfd)

    def filenos(self):
        return self._fds[:1]

    def close(self):
        for fd in self._fds:
            os.close(fd)

    rx_vouched = None
    gathers_payload = False

    def recv_batch(self, max_frames):
        batch, self.inbound = self.inbound[:max_frames], self.inbound[max_frames:]
        return batch

    def send_batch(self, frames):
        self.outbound.extend(bytes(frame) for frame in frames)  # as a packet socket copies them
        return len(frames)


class _RuntimeRig:
    """The whole stack runtime (shared region, Interface, TcpHost) against
    a peer node over lists of frames, the application's side played with
    the interposer's ring operations.  Only the runtime's steps are timed."""

    def __init__(self, slots):
        self.region = Region.create(RegionSize(nslots=slots, nwaiters=4, cmd_capacity=1024,
                                               rx_size=64 * 1024, tx_size=64 * 1024), LOCAL_IP, 24)
        self.geom = self.region.geom
        stack_ctl, self.app_ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.link = _MemoryLink()
        self.wake_fds = os.pipe()
        self.runtime = Runtime(self.region, self.link,
                               Node(Interface(LOCAL_MAC, LOCAL_IP, 24, frame_arena=FRAME_ARENA_BYTES),
                                    TcpHost(LOCAL_IP, CONFIG)),
                               stack_ctl.detach(), self.wake_fds[0])
        self.peer = Node(Interface(REMOTE_MAC, REMOTE_IP, 24), TcpHost(REMOTE_IP))
        self.now = 1000.0
        self.timed = 0.0
        self.scratch = ffi.new("uint8_t[]", 4096)

    def stack_step(self):
        """A loop pass of the runtime, and more while frames wait: a pass
        takes at most a receive batch of them."""
        start = time.process_time()
        while True:
            self.now += 0.0001
            self.runtime.step(self.now)
            if not self.link.inbound:
                break
        self.timed += time.process_time() - start

    def peer_exchange(self):
        frames, self.link.outbound = self.link.outbound, []
        self.peer.ingest(frames, self.now)
        self.link.inbound.extend(bytes(frame) for frame in self.peer.egress(self.now))
        self.peer.host.touched.clear()     # the peer's events have no reader here

    def command(self, op, slot, arg=0):
        # As the interposer queues it: for the slot's current holder.
        generation = lib.mts_slot_at(self.geom, slot).generation if op != lib.MTS_OP_WAITER_FREE and slot < self.geom.nslots else 0
        assert lib.mts_cmd_push(self.geom, 0, op, slot, generation, arg) == 0

    def listen(self, backlog):
        listener = lib.mts_slot_alloc(self.geom, 0, ffi.NULL)
        lib.mts_slot_at(self.geom, listener).refcnt = 1
        self.command(lib.MTS_OP_BIND, listener, HTTP_PORT)
        self.command(lib.MTS_OP_LISTEN, listener, backlog)
        return listener

    def connect(self):
        return self.peer.host.connect_ephemeral(LOCAL_IP, HTTP_PORT, RingBuffer(PEER_BUFFER),
                                                RingBuffer(PEER_BUFFER), None, self.now)

    def serve(self, child):
        """The application reads the request and queues the response."""
        geom, slot = self.geom, lib.mts_slot_at(self.geom, child)
        got = lib.mts_ring_read(ffi.addressof(slot.rx), lib.mts_rx_data(geom, child), geom.rx_size,
                                self.scratch, 4096)
        assert got == len(REQUEST), "a request went missing"
        if lib.mts_rx_take_notify(slot):
            self.command(lib.MTS_OP_RXWIN, child)
        lib.mts_ring_write(ffi.addressof(slot.tx), lib.mts_tx_data(geom, child), geom.tx_size,
                           RESPONSE, len(RESPONSE))
        slot.tx_pending = 1
        self.command(lib.MTS_OP_TX, child)

    def close(self):
        self.runtime.waiters.ctl.close()
        self.app_ctl.close()
        for fd in self.wake_fds:
            os.close(fd)
        self.link.close()


def bench_keepalive(count, connections=CONNECTIONS):
    rig = _RuntimeRig(2 * connections)
    listener = rig.listen(connections)
    peers = []
    for _ in range(connections):
        # One at a time: the first waits for ARP, whose queue is short.
        peers.append(rig.connect())
        for _ in range(3):
            rig.peer_exchange()
            rig.stack_step()
    children = []
    while (child := lib.mts_accept_pop(rig.geom, listener, 0)) >= 0:
        children.append(child)
    assert len(children) == connections, "the handshakes did not complete"

    rig.timed = 0.0
    served = 0
    while served < count:
        for conn in peers:
            conn.send_buf.write(REQUEST)
            conn.send_ready(rig.now)
            rig.peer.host.collect(conn, rig.now)
        rig.peer_exchange()
        rig.stack_step()
        for child in children:
            rig.serve(child)
        rig.stack_step()
        rig.peer_exchange()
        for conn in peers:
            conn.recv_buf.read(len(conn.recv_buf))
            conn.recv_consumed(rig.now)
            rig.peer.host.collect(conn, rig.now)
        served += len(peers)
    rig.close()
    return served / rig.timed


def bench_close(count, connections=CONNECTIONS):
    """`Connection: close` rounds of `connections` clients: handshake, request,
    response with FIN, the client's FIN, TIME_WAIT (which the stack keeps)."""
    rig = _RuntimeRig(4 * connections)
    listener = rig.listen(connections)
    rig.stack_step()
    rig.connect()                         # ARP resolved once, outside the clock
    for _ in range(8):
        rig.peer_exchange()
        rig.stack_step()
    while lib.mts_accept_pop(rig.geom, listener, 0) >= 0:
        pass
    rig.timed = 0.0
    served = 0
    while served < count:
        peers = [rig.connect() for _ in range(connections)]
        rig.peer_exchange()                # SYNs
        rig.stack_step()                   # SYN-ACKs
        for conn in peers:
            conn.send_buf.write(REQUEST)
        rig.peer_exchange()                # ACKs, then the requests
        for conn in peers:
            conn.send_ready(rig.now)
            rig.peer.host.collect(conn, rig.now)
        rig.stack_step()
        rig.peer_exchange()
        rig.stack_step()
        children = []
        while (child := lib.mts_accept_pop(rig.geom, listener, 0)) >= 0:
            children.append(child)
        assert len(children) == len(peers), "a handshake did not complete"
        for child in children:
            rig.serve(child)
            rig.command(lib.MTS_OP_SHUTDOWN, child, socket.SHUT_WR)
            lib.mts_slot_at(rig.geom, child).refcnt = 0
            rig.command(lib.MTS_OP_CLOSE, child)
        rig.stack_step()                   # data and FIN
        rig.peer_exchange()
        for conn in peers:
            conn.recv_buf.read(len(conn.recv_buf))
            conn.close(rig.now)
            rig.peer.host.collect(conn, rig.now)
        rig.peer_exchange()                # the clients' FINs
        rig.stack_step()                   # TIME_WAIT, the last ACKs
        rig.peer_exchange()
        served += len(peers)
    rig.close()
    return served / rig.timed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--congestion", default=TcpConfig.congestion, help="congestion control of the cases")
    parser.add_argument("--case", action="append", help="run only these cases")
    parser.add_argument("--connections", type=int, default=CONNECTIONS,
                        help="connections of the keepalive and close cases")
    args = parser.parse_args()
    CONFIG.congestion = args.congestion
    runtime_cases = {"connections": args.connections}
    for name, case in (("receive", bench_receive), ("send", bench_send),
                       ("host-rx", bench_host_receive),
                       ("keepalive", functools.partial(bench_keepalive, **runtime_cases)),
                       ("close", functools.partial(bench_close, **runtime_cases))):
        if args.case and name not in args.case:
            continue
        best = max(case(args.segments) for _ in range(args.repeat))
        unit = "requests" if name in ("keepalive", "close") else "segments"
        print(f"{name:9} {best / 1000:8.1f} k {unit}/s")


if __name__ == "__main__":
    main()
