"""Byte-exact transfers over a test network, each way, and the counters
read around them: the stack's, the client kernel's and the link's."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import random
import sys
import time

from .net import SERVER_PORT, HarnessError, curl_in_client, kernel_counters, link_fault_counters
from .programs import ShimProgram, shim_lighttpd

# MTCPSHIM_LONG=1 selects the long variants: 256 MiB each way per fault.
LONG = os.environ.get("MTCPSHIM_LONG") == "1"
BODY_SIZE = (256 if LONG else 4) * 1024 * 1024
# Longer than the injector holds a frame (delay and jitter of the fault
# runs, reordering): what it counted on the way in has reached the stack.
IMPAIR_SETTLE = 0.2

# Client-side kernel counters worth reporting after a run (/proc/net/snmp, netstat).
KERNEL_COUNTERS = ("Tcp.InSegs", "Tcp.OutSegs", "Tcp.RetransSegs", "Tcp.InCsumErrors",
                   "Ip.InHdrErrors", "TcpExt.TCPDSACKOldSent", "TcpExt.TCPDSACKRecv",
                   "TcpExt.TCPOFOQueue", "TcpExt.TCPSACKReorder", "TcpExt.TCPTimeouts")

# Counters of a stat snapshot that count traffic handled, not dropped.
NOT_DROPS = {"rx_frames", "tx_frames", "arp_request_rx", "arp_reply_rx", "arp_request_tx", "arp_reply_tx",
             "icmp_echo", "icmp_frag_needed", "tcp_pmtu_lowered", "tcp_syncookies_sent",
             "tcp_syncookies_accepted"}


def make_body(path: pathlib.Path, size: int, seed: int = 1) -> str:
    """A file of `size` pseudo-random bytes; returns its sha256."""
    rng, digest = random.Random(seed), hashlib.sha256()
    with open(path, "wb") as out:
        left = size
        while left:
            chunk = rng.randbytes(min(left, 1 << 20))
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        while chunk := data.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def counter_deltas(before: dict, after: dict, names=KERNEL_COUNTERS) -> dict[str, int]:
    return {name: after.get(name, 0) - before.get(name, 0) for name in names}


def stack_drop_counters(snapshot: dict) -> dict[str, int]:
    """The drop, error and fault counters of a `mtcpshim stat` snapshot, flat."""
    flat = {}
    for section in ("packet_io", "interface", "tcp"):
        for name, value in (snapshot.get(section) or {}).items():
            if value and name not in NOT_DROPS:
                flat[name] = value
    return flat


@dataclasses.dataclass
class Transfer:
    direction: str              # "stack sends" or "stack receives"
    size: int
    seconds: float
    sha256_sent: str
    sha256_received: str
    stack_counters: dict        # `mtcpshim stat` snapshot at the end
    kernel_counters: dict       # client kernel counter deltas
    link_counters: dict         # nftables loss/duplication counters at the end

    @property
    def exact(self) -> bool:
        return self.sha256_sent == self.sha256_received

    @property
    def megabytes_per_second(self) -> float:
        return self.size / self.seconds / 1e6


def stack_sends(net, docroot: pathlib.Path, name: str, workdir: pathlib.Path,
                impair: str | None = None, timeout: float = 300, options=()) -> Transfer:
    """lighttpd under the stack (`mtcpshim run OPTIONS`) serves
    docroot/name; curl on the client's kernel downloads it."""
    received = workdir / f"received-{name}"
    with shim_lighttpd(docroot, workdir, net, options=options, impair=impair) as server:
        before = kernel_counters(net)
        result = curl_in_client(net, f"http://{net.srv_ip}:{SERVER_PORT}/{name}", str(received), timeout,
                                extra=("-w", "%{time_total}"))
        if result.returncode != 0:
            raise HarnessError(f"download from the stack failed: {result.stderr.decode().strip()}")
        seconds = float(result.stdout)
        if impair:
            time.sleep(IMPAIR_SETTLE)    # what the injector still holds reaches the stack first
        stack_counters = server.stats()
        kernel = counter_deltas(before, kernel_counters(net))
    return _finish("stack sends", docroot / name, received, seconds, stack_counters, kernel, net)


def stack_receives(net, kernel_url: str, docroot: pathlib.Path, name: str, workdir: pathlib.Path,
                   impair: str | None = None, timeout: float = 300) -> Transfer:
    """curl under the stack downloads docroot/name from the client's kernel
    http.server; the stack's counters are read (by a program under the same
    stack) before it exits."""
    received, stat_file, time_file = (workdir / f"received-{name}", workdir / "stack-stat.json",
                                      workdir / "curl-seconds")
    tests_dir = str(pathlib.Path(__file__).resolve().parent.parent)
    snapshot = (f"import json, sys; sys.path.insert(0, {tests_dir!r}); "
                f"from support.programs import stack_snapshot; "
                f"print(json.dumps(stack_snapshot({net.srv_ns!r}, {net.srv_if!r})))")
    settle = f"sleep {IMPAIR_SETTLE}; " if impair else ""    # see stack_sends
    script = (f"curl -sS --fail -m {timeout:.0f} -w '%{{time_total}}' -o {received} {kernel_url}/{name}"
              f" > {time_file} || exit 1; {settle}exec {sys.executable} -c \"{snapshot}\" > {stat_file}")
    before = kernel_counters(net)
    client = ShimProgram(["sh", "-c", script], workdir / "curl-launcher.log", net, impair=impair)
    status = client.wait(timeout + 30)
    if status != 0:
        raise HarnessError(f"download by the stack failed (status {status}): {client.output().strip()[-300:]}")
    client.stop()
    kernel = counter_deltas(before, kernel_counters(net))
    return _finish("stack receives", docroot / name, received, float(time_file.read_text()),
                   json.loads(stat_file.read_text()), kernel, net)


def _finish(direction, sent: pathlib.Path, received: pathlib.Path, seconds, stack_counters, kernel, net):
    transfer = Transfer(direction, received.stat().st_size, seconds, sha256_of(sent), sha256_of(received),
                        stack_counters, kernel, link_fault_counters(net))
    received.unlink()
    return transfer
