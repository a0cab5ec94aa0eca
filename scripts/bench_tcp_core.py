#!/usr/bin/env python3
"""Micro-benchmark of the TCP core's hot path: established connections,
in-order data and pure ACKs.  Prints segments per second for each case.

    python3 scripts/bench_tcp_core.py [--segments N] [--repeat R]

Cases:
  receive   in-order full-size data segments into TcpConnection.on_segment,
            the application reading everything, one ACK collected per batch
            of 16 segments (as the runtime does with a receive batch);
  send      pure ACKs into on_segment, each acknowledging two segments and
            releasing two new ones from a send buffer kept full;
  host-rx   the receive case through TcpHost.receive: parse, demux, timers
            and emitting the ACKs included.

Segments are built before the clock starts, so only the core is measured.
The clock is the process's CPU time, so other load on the machine skews
less; every case runs R times and the best run is reported.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stack.host import TcpHost                      # noqa: E402
from stack.storage import RingBuffer                # noqa: E402
from stack.tcp import TcpConfig, TcpConnection      # noqa: E402
from stack.wire.tcp import ACK, PSH, SYN, TcpSegment  # noqa: E402

LOCAL_IP, REMOTE_IP = 0xC6120002, 0xC6120001
LOCAL_PORT, REMOTE_PORT = 80, 40000
MSS = 1448                     # 1460 minus the timestamp option
BATCH = 16
BUFFER = 4 << 20
# Start near the top of the sequence space so every run crosses the wrap.
LOCAL_ISS, REMOTE_ISS = 2**32 - 100_000, 2**32 - 200_000


def established(now=0.0):
    """A passively opened connection with timestamps, SACK and scaling."""
    config = TcpConfig()
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
    host = TcpHost(LOCAL_IP)
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
        host.after(conn, now)
        host.on_timers(now)
        host.take_output()
        host.touched.clear()
        conn.events = 0
        now += 0.0001
    return count / (time.process_time() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for name, case in (("receive", bench_receive), ("send", bench_send),
                       ("host-rx", bench_host_receive)):
        best = max(case(args.segments) for _ in range(args.repeat))
        print(f"{name:8} {best / 1000:8.1f} k segments/s")


if __name__ == "__main__":
    main()
