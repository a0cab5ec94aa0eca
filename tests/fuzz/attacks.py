"""Hostile traffic against a running stack, with honest traffic beside it.

`fuzz_during_transfers` throws FrameFuzzer frames at lighttpd under the
stack while a kernel client downloads a body again and again;
`syn_flood` sends spoofed SYNs while a kernel client keeps connecting.
Both inject from the client namespace through an AF_PACKET socket on the
client's veth, return what happened as a dict, and stop everything they
started.  Used by tests/fuzz and scripts/reliability.py.
"""
import ipaddress
import random
import struct
import threading
import time

import psutil

from framefuzz import (ETHERTYPE_IPV4, PROTO_TCP, FrameFuzzer, Target, ethernet, ipv4,
                       send_frames, tcp)
from support.net import SERVER_PORT, curl_in_client, mac_of, packet_socket
from support.programs import shim_lighttpd, wait_until
from support.transfers import sha256_of, stack_drop_counters

FUZZ_PORT = 8081                      # a second lighttpd listener, for the fuzzer
TRANSFER_CLIENT_PORTS = range(40000, 41000)
SYN = 0x02


def _target(net) -> Target:
    return Target(stack_mac=mac_of(net.srv_ns, net.srv_if),
                  client_mac=mac_of(net.cli_ns, net.cli_if),
                  stack_ip=int(ipaddress.IPv4Address(net.srv_ip)),
                  client_ip=int(ipaddress.IPv4Address(net.cli_ip)),
                  fuzz_port=FUZZ_PORT, protected_port=SERVER_PORT,
                  protected_client_ports=TRANSFER_CLIENT_PORTS)


class ClientLoop(threading.Thread):
    """Fetches `url` from the client's kernel again and again until stopped
    (at most `limit` times): each result is (curl status, body sha256 or None,
    seconds)."""

    def __init__(self, net, url, workdir, timeout, limit=10000, local_ports=None):
        super().__init__(daemon=True)
        self.net, self.url, self.timeout, self.limit = net, url, timeout, limit
        self.output = workdir / f"client-loop-{id(self)}"
        self.extra = ("--local-port", f"{local_ports.start}-{local_ports.stop - 1}") if local_ports else ()
        self.results: list[tuple[int, str | None, float]] = []
        self._stopping = threading.Event()

    def run(self):
        while not self._stopping.is_set() and len(self.results) < self.limit:
            started = time.monotonic()
            done = curl_in_client(self.net, self.url, str(self.output), self.timeout, self.extra)
            seconds = time.monotonic() - started
            digest = sha256_of(self.output) if done.returncode == 0 else None
            self.results.append((done.returncode, digest, round(seconds, 2)))

    def stop(self) -> list:
        self._stopping.set()
        self.join(self.timeout + 30)
        if self.output.exists():
            self.output.unlink()
        return self.results


class MemoryWatch(threading.Thread):
    """Samples a process's resident memory until stopped."""

    def __init__(self, process: psutil.Process, interval=0.1):
        super().__init__(daemon=True)
        self.process, self.interval = process, interval
        self.samples: list[int] = []
        self._stopping = threading.Event()

    def run(self):
        while not self._stopping.is_set():
            try:
                self.samples.append(self.process.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            self._stopping.wait(self.interval)

    def stop(self) -> int:
        self._stopping.set()
        self.join()
        return max(self.samples, default=0)


def _drops(snapshot: dict) -> int:
    return sum(stack_drop_counters(snapshot).values())


# A backlog well below the stack's 1024 socket slots: half-open connections
# then overflow into SYN cookies instead of using up every slot (see
# docs/reliability.md, "SYN flood").
LISTEN_BACKLOG = 128


def fuzz_during_transfers(net, docroot, body_name: str, workdir, frames: int, rate: float,
                          time_limit: float, seed: int = 1) -> dict:
    """Fuzzes the stack while a client downloads docroot/body_name in a loop."""
    expected = sha256_of(docroot / body_name)
    with shim_lighttpd(docroot, workdir, net, extra_ports=(FUZZ_PORT,),
                       listen_backlog=LISTEN_BACKLOG) as server:
        stack = server.stack_process()
        before = server.stats()
        rss_before = stack.memory_info().rss
        memory = MemoryWatch(stack)
        memory.start()
        client = ClientLoop(net, f"http://{net.srv_ip}:{SERVER_PORT}/{body_name}", workdir,
                            timeout=time_limit + 120, local_ports=TRANSFER_CLIENT_PORTS)
        client.start()
        kinds: dict[str, int] = {}
        must_drop = 0

        def tally(stream):
            nonlocal must_drop
            for kind, frame, dropped in stream:
                kinds[kind] = kinds.get(kind, 0) + 1
                must_drop += dropped
                yield frame

        with packet_socket(net) as sock:
            sent, seconds = send_frames(sock, tally(FrameFuzzer(_target(net), seed).frames(frames)),
                                        rate, time_limit, time.monotonic, time.sleep)
        # Let the transfer that ran under fire finish, then one more clean one.
        transfers_under_fire = len(client.results) + 1
        wait_until(lambda: len(client.results) >= transfers_under_fire or not client.is_alive(),
                   time_limit + 120, "the transfer under fire to finish")
        results = client.stop()
        stack_alive = server.proc.poll() is None and stack.is_running()
        after = server.stats() if stack_alive else {}
        peak_rss = memory.stop()
        answers = curl_in_client(net, f"http://{net.srv_ip}:{SERVER_PORT}/ping.txt").returncode == 0
    ring_drops = after.get("packet_io", {}).get("rx_kernel_drops", 0) - before["packet_io"].get("rx_kernel_drops", 0)
    return {
        "frames_sent": sent, "seconds": round(seconds, 2), "frames_per_s": round(sent / seconds),
        "by_kind": kinds, "must_drop": must_drop,
        "drops_counted": _drops(after) - _drops(before) if after else None,
        "ring_drops": ring_drops,
        "stack_alive": stack_alive, "still_answers": answers,
        "transfers": len(results), "transfers_exact": sum(1 for _, digest, _ in results if digest == expected),
        "transfer_failures": [(status, seconds) for status, digest, seconds in results if digest != expected],
        "transfer_seconds": [seconds for _, _, seconds in results],
        "bytes_moved": sum((docroot / body_name).stat().st_size for _, digest, _ in results if digest == expected),
        "rss_before": rss_before, "peak_rss": peak_rss,
        "drop_reasons": {k: v - stack_drop_counters(before).get(k, 0)
                         for k, v in stack_drop_counters(after).items()},
    }


def spoofed_syns(net, count: int, seed: int = 1):
    """SYN frames from random 198.18.0.3-254 addresses and ports to the
    stack's lighttpd, each with MSS, SACK-permitted, timestamps and window
    scale like a Linux SYN."""
    target = _target(net)
    rng = random.Random(seed)
    subnet = target.client_ip & 0xFFFFFF00
    for _ in range(count):
        src = subnet | rng.randrange(3, 255)
        options = struct.pack("!BBHBBBBIIBBBB", 2, 4, 1460, 4, 2, 8, 10, rng.getrandbits(32), 0, 1, 3, 3, 7)
        segment = tcp(src, target.stack_ip, rng.randrange(1024, 65536), SERVER_PORT,
                      rng.getrandbits(32), 0, SYN, window=64240, options=options)
        yield ethernet(target.stack_mac, target.client_mac, ETHERTYPE_IPV4,
                       bytes(ipv4(src, target.stack_ip, PROTO_TCP, segment, ident=rng.getrandbits(16))))


WARMUP_FLOODS = 8


def syn_flood(net, docroot, workdir, syns: int, rate: float, time_limit: float, seed: int = 1,
              settle_seconds: float = 3.0, listen_backlog: int = LISTEN_BACKLOG, client_timeout: float = 10,
              attempts_after: int = 20, settle_memory: int | None = None) -> dict:
    """Floods lighttpd's port with spoofed SYNs while a client keeps
    fetching a small file; then checks the client still gets through.
    With `settle_memory` (bytes), the same flood runs unmeasured first until
    its peak memory lies less than that above the previous flood's peak (at
    most WARMUP_FLOODS): the flood's paths compiled and the collector's heap
    grown to what they need (PyPy's takes several).  `previous_peak_rss` is
    then the last of those peaks: state kept per SYN would raise each
    flood's peak above the one before, the collector's sawtooth does not."""
    url = f"http://{net.srv_ip}:{SERVER_PORT}/ping.txt"
    with shim_lighttpd(docroot, workdir, net, listen_backlog=listen_backlog) as server:
        stack = server.stack_process()
        previous_peak = None
        for warmup in range(WARMUP_FLOODS if settle_memory else 0):
            memory = MemoryWatch(stack)
            memory.start()
            client = ClientLoop(net, url, workdir, timeout=client_timeout)
            client.start()
            with packet_socket(net) as sock:
                send_frames(sock, spoofed_syns(net, syns, seed + 1 + warmup), rate, time_limit,
                            time.monotonic, time.sleep)
            client.stop()
            time.sleep(settle_seconds)
            peak = memory.stop()
            settled = previous_peak is not None and peak - previous_peak < settle_memory
            previous_peak = peak
            if settled:
                break
        before = server.stats()
        rss_before = stack.memory_info().rss
        memory = MemoryWatch(stack)
        memory.start()
        client = ClientLoop(net, url, workdir, timeout=client_timeout)
        client.start()
        with packet_socket(net) as sock:
            sent, seconds = send_frames(sock, spoofed_syns(net, syns, seed), rate, time_limit,
                                        time.monotonic, time.sleep)
        during = client.stop()
        time.sleep(settle_seconds)
        rss_after_flood = stack.memory_info().rss
        after_flood = [curl_in_client(net, url, timeout=client_timeout).returncode
                       for _ in range(attempts_after)]
        stack_alive = server.proc.poll() is None and stack.is_running()
        after = server.stats() if stack_alive else {}
        peak_rss = memory.stop()
    tcp_before, tcp_after = before.get("tcp", {}), after.get("tcp", {})
    return {
        "syns_sent": sent, "seconds": round(seconds, 2), "syns_per_s": round(sent / seconds),
        "client_during": len(during), "client_during_ok": sum(1 for status, _, _ in during if status == 0),
        "client_after": len(after_flood), "client_after_ok": after_flood.count(0),
        "stack_alive": stack_alive,
        "tcp_counters": {k: v - tcp_before.get(k, 0) for k, v in tcp_after.items() if v != tcp_before.get(k, 0)},
        "connections_after": after.get("connections", {}),
        "rss_before": rss_before, "peak_rss": peak_rss, "rss_after": rss_after_flood,
        "previous_peak_rss": previous_peak,
        "ring_drops": after.get("packet_io", {}).get("rx_kernel_drops", 0)
        - before["packet_io"].get("rx_kernel_drops", 0),
    }
