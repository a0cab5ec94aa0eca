"""`mtcpshim stat`: a running stack's counters, like `netstat -s`."""
from __future__ import annotations

import json
import socket

from mtcpshim.launcher import LaunchError, runtime_path

SECTIONS = (("runtime", "Stack loop"), ("cost", "Stack CPU since start, per unit of work"), ("packet_io", "Packet I/O"), ("interface", "Ethernet, ARP, IPv4, ICMP"),
            ("tcp", "TCP handshakes, drops and errors"), ("tcp_recovery", "TCP loss recovery"),
            ("congestion", "TCP congestion control, open connections"),
            ("connections", "TCP connections by state"),
            ("sockets", "Stack sockets, by holder (the program, or the stack after close) and state"),
            ("shm", "Shared region: what the program wrote that was refused or reset"))


class StatError(Exception):
    """One line for the user."""


def fetch(netns: str | None, iface: str) -> dict:
    try:
        path = runtime_path(netns, iface, "stats")  # by the namespace's and interface's identity, as `run`
    except LaunchError as err:  # no such namespace or interface
        raise StatError(str(err)) from None
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
    lines = [f"stack pid {snapshot['pid']} ({snapshot.get('python', 'CPython')}): "
             f"{snapshot['slots_in_use']} sockets, {snapshot['waiters']} waiters"]
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
