"""One IPv4 node on one link: an Interface and the TcpHost behind it, glued
in one place (as smoltcp's Interface::poll and poll_at glue its interface
and sockets).  Sans-IO: frames and time in, frames out.

    ingest(frames, now)   received frames: ARP and ICMP answered by the
                          interface, TCP handed to the host, ICMP errors
                          (path MTU) to the host after the batch
    on_timers(now)        the host's and the interface's timers that are due
    egress(now)           every frame to send: segments framed, plus ARP,
                          ICMP and frames that waited for ARP; valid until
                          the next egress (an interface with a frame arena
                          builds the next batch over them)
    poll_at()             when on_timers next has work; None if never

The runtime, the runtime tests' peer and the core benchmark all drive a
node.  A host with a flow table (TcpHost(fast_path=True), the default
with the C module) gets the receive fast path in front of it
(stack/fastpath.py): each batch goes through header prediction first.
"""
from __future__ import annotations

from mtcpshim.stack.fastpath import FastPath
from mtcpshim.stack.host import TcpHost
from mtcpshim.stack.iface import Interface


class Node:
    __slots__ = ("iface", "host", "_fast_path")

    def __init__(self, iface: Interface, host: TcpHost):
        if iface.ip != host.ip:
            raise ValueError("the interface and the TCP host must share one address")
        self.iface = iface
        self.host = host
        self._fast_path = (FastPath(host.flows, iface.mac, iface.ip)
                           if host.flows is not None and iface.accelerated else None)

    def ingest(self, frames, now: float, vouched: bytes | None = None) -> None:
        """A batch of received frames; `vouched` as the backend's rx_vouched."""
        if self._fast_path is not None:
            taken = self._fast_path.ingest(frames, now, vouched, self._to_host, self.host.finish_predicted)
            if taken:
                self.iface.counters["rx_frames"] += taken
                self.host.count("tcp_fast_path", taken)
        else:
            for frame, checksum_vouched in zip(frames, vouched or bytes(len(frames))):
                self._to_host(frame, checksum_vouched, now)
        for error in self.iface.take_icmp_errors():
            self.host.receive_icmp_error(error, now)

    def _to_host(self, frame, checksum_vouched: int, now: float) -> None:
        tcp = self.iface.receive(frame, now, checksum_vouched)
        if tcp is not None:
            self.host.receive(tcp[0], tcp[1], tcp[2], now)

    def on_timers(self, now: float) -> None:
        self.host.on_timers(now)
        deadline = self.iface.deadline()
        if deadline is not None and deadline <= now:
            self.iface.on_timer(now)

    def egress(self, now: float) -> list:
        self.iface.reuse_frames()
        frame_tcp = self.iface.frame_tcp
        frames = []
        for dst_ip, header, payload, gso_size in self.host.take_output():
            frame = frame_tcp(dst_ip, header, payload, now, gso_size)
            if frame is not None:
                frames.append(frame)
        frames += self.iface.take_frames()
        return frames

    def poll_at(self) -> float | None:
        host_at, iface_at = self.host.next_deadline(), self.iface.deadline()
        if host_at is None or (iface_at is not None and iface_at < host_at):
            return iface_at
        return host_at
