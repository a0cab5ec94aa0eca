"""`mtcpshim stat`: a running stack's counters, like `netstat -s`: each
worker's, and their sum."""
from __future__ import annotations

import json
import os
import socket

from mtcpshim._shm import lib
from mtcpshim.launcher import LaunchError, runtime_path, worker_path

SECTIONS = (("runtime", "Stack loop"), ("cost", "Stack CPU since start, per unit of work"), ("packet_io", "Packet I/O"), ("interface", "Ethernet, ARP, IPv4, ICMP"),
            ("tcp", "TCP handshakes, drops and errors"), ("tcp_recovery", "TCP loss recovery"),
            ("congestion", "TCP congestion control, open connections"),
            ("connections", "TCP connections by state"),
            ("sockets", "Stack sockets, by holder (the program, or the stack after close) and state"),
            ("shm", "Shared region: what the program wrote that was refused or reset"))


class StatError(Exception):
    """One line for the user."""


def fetch(netns: str | None, iface: str) -> dict:
    """The stack's counters: one worker's snapshot, or with several the sum
    of theirs, each kept under "workers"."""
    try:
        path = runtime_path(netns, iface, "stats")  # by the namespace's and interface's identity, as `run`
    except LaunchError as err:  # no such namespace or interface
        raise StatError(str(err)) from None
    snapshots = [_fetch_one(path, netns, iface)]
    for index in range(1, lib.MTS_MAX_WORKERS):
        if not os.path.exists(worker_path(path, index)):
            break
        snapshots.append(_fetch_one(worker_path(path, index), netns, iface))
    return snapshots[0] if len(snapshots) == 1 else _total(snapshots)


# Figures that are not counts (or, for waiters, the same in every worker,
# as each holds every waiter's eventfd): worker 0's stand for the stack.
_NOT_SUMMED = ("pid", "python", "worker", "waiters")


def _total(snapshots: list[dict]) -> dict:
    total = _sum_counts(snapshots)
    total.update({key: snapshots[0][key] for key in _NOT_SUMMED if key in snapshots[0]})
    held: dict[str, set] = {}
    for snapshot in snapshots:
        for pid, slots in snapshot["processes"]["sockets"].items():
            held.setdefault(pid, set()).update(slots)
    total["processes"] = {"sockets": {pid: sorted(slots) for pid, slots in held.items()},
                          "ended": max(snapshot["processes"]["ended"] for snapshot in snapshots)}
    cpu_ms = total["cost"].get("cpu_ms", 0)
    total["cost"] = {"cpu_ms": cpu_ms}
    for unit, count in (("packet", total["interface"].get("rx_frames", 0) + total["interface"].get("tx_frames", 0)),
                        ("command", total["runtime"].get("commands", 0)), ("loop", total["runtime"].get("loops", 0))):
        if count:
            total["cost"][f"cpu_ns_per_{unit}"] = round(cpu_ms * 1e6 / count)
    total["congestion"] = {key: value for key, value in total["congestion"].items() if not key.endswith("_median")}
    total["workers"] = snapshots
    return total


def _sum_counts(snapshots: list[dict]) -> dict:
    """Numbers summed key by key, at any depth."""
    total: dict = {}
    for snapshot in snapshots:
        for key, value in snapshot.items():
            if isinstance(value, dict):
                total[key] = _sum_counts([total.get(key, {}), value])
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total


def _fetch_one(path: str, netns: str | None, iface: str) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5.0)
        try:
            conn.connect(path)
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        except (FileNotFoundError, ConnectionRefusedError):
            raise StatError(f"no stack is serving {iface}{' in ' + netns if netns else ''} "
                            f"(nothing answers at {path})") from None
        except TimeoutError:
            raise StatError(f"the stack at {path} did not answer within 5 s") from None
    return json.loads(b"".join(chunks))


def render(snapshot: dict, as_json: bool = False) -> str:
    if as_json:
        return json.dumps(snapshot, indent=2, sort_keys=True)
    workers = snapshot.get("workers", [snapshot])
    lines = [f"stack pid {snapshot['pid']} ({snapshot.get('python', 'CPython')}): "
             f"{snapshot['slots_in_use']} sockets, {snapshot['waiters']} waiters"]
    if len(workers) > 1:
        lines.append(f"{len(workers)} workers, the figures below their sum:")
        for worker in workers:
            lines.append(f"    worker {worker['worker']} (pid {worker['pid']}): {worker['slots_in_use']} sockets, "
                         f"{worker['interface'].get('rx_frames', 0)} frames in, "
                         f"{worker['interface'].get('tx_frames', 0)} out, "
                         f"{worker['cost'].get('cpu_ms', 0)} ms CPU")
    processes = snapshot.get("processes")
    if processes is not None:
        lines.append(f"program processes ({processes['ended']} ended since the stack started):")
        for pid, slots in processes["sockets"].items():
            lines.append(f"    pid {pid}: {len(slots)} sockets" + (f" (slots {_ranges(slots)})" if slots else ""))
    for key, title in SECTIONS:
        lines.append(f"{title}:")
        counters = snapshot.get(key) or {}
        if not counters:
            lines.append("    (none)")
        for name, value in sorted(counters.items()):
            lines.append(f"    {value:>12}  {name.replace('_', ' ')}")
    return "\n".join(lines)


def _ranges(numbers: list[int]) -> str:
    """1 2 3 7 -> "1-3 7"."""
    spans = []
    for n in numbers:
        if spans and spans[-1][1] == n - 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return " ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def serve(listener: socket.socket, snapshot) -> None:
    """The stack's end: answers every `mtcpshim stat` waiting on `listener`
    (non-blocking) with one JSON `snapshot()`."""
    while True:
        try:
            client, _ = listener.accept()
        except BlockingIOError:
            return
        with client:
            client.settimeout(1.0)
            try:
                client.sendall(json.dumps(snapshot()).encode())
            except OSError:
                pass
