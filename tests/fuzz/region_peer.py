#!/usr/bin/env python3
"""The kernel-side peer of the hostile-region tests: runs in the client
namespace on the kernel's TCP (never under the stack), does one connection,
and writes what happened to --out as JSON (the bytes it received go to
--out + ".bin").  Every wait is bounded by --timeout.

    region_peer.py sink   --listen IP:PORT  --out F   accept one, read until EOF
    region_peer.py source --listen IP:PORT  --out F   accept one, send until the peer stops us
    region_peer.py client --connect IP:PORT --out F   connect, read until EOF
    region_peer.py streams --connect IP:PORT --out F  keep --streams connections open and
                                                      sending, reconnecting, until --stop exists

Outcome: "eof", "reset" (RST: ECONNRESET/EPIPE), "refused", "timeout"
(nothing happened for --timeout seconds: a hang), "limit" (source sent
--limit bytes), or "error: ...".
"""
import argparse
import errno
import hashlib
import json
import os
import socket
import time


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def outcome_of(err: OSError) -> str:
    if isinstance(err, (TimeoutError, socket.timeout)):
        return "timeout"
    if err.errno in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    if err.errno == errno.ECONNREFUSED:
        return "refused"
    return f"error: {err!r}"


def read_all(conn: socket.socket, timeout: float, deadline: float) -> tuple[bytes, str]:
    data = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(data), "timeout"
        conn.settimeout(min(timeout, left))
        try:
            chunk = conn.recv(65536)
        except OSError as err:
            return bytes(data), outcome_of(err)
        if not chunk:
            return bytes(data), "eof"
        data += chunk


def accept_one(listen: str, ready_path: str, timeout: float) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(address(listen))
    listener.listen(4)
    listener.settimeout(timeout)
    with open(ready_path, "w") as ready:
        ready.write("ready\n")
    try:
        conn, _ = listener.accept()
    finally:
        listener.close()
    return conn


def streams(target: tuple[str, int], count: int, stop_path: str, deadline: float, silence: float) -> dict:
    """Keeps `count` connections to target open, each sending whenever it
    can; a connection that ends is counted by how, and replaced."""
    import selectors
    sel = selectors.DefaultSelector()
    tally = {"connects": 0, "reset": 0, "eof": 0, "refused": 0, "timeout": 0, "errors": 0, "bytes_sent": 0,
             "silent": 0}
    chunk = hashlib.sha256(b"stream").digest() * 512
    last_progress = {}

    def open_one():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(target)
        if err not in (0, errno.EINPROGRESS):
            tally["errors"] += 1
            sock.close()
            return
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        last_progress[sock] = time.monotonic()
        tally["connects"] += 1

    def finish(sock, how):
        tally[how] += 1
        sel.unregister(sock)
        last_progress.pop(sock, None)
        sock.close()

    next_open = 0.0
    while time.monotonic() < deadline and not os.path.exists(stop_path):
        # At most `count` new connections per 0.2 s, so a dead listener is
        # not met with a storm of SYNs (the stack would be busy answering them).
        if time.monotonic() >= next_open:
            for _ in range(count - len(sel.get_map())):
                open_one()
            next_open = time.monotonic() + 0.2
        for key, events in sel.select(0.1):
            sock = key.fileobj
            try:
                if events & selectors.EVENT_READ:
                    if not sock.recv(65536):
                        finish(sock, "eof")
                        continue
                if events & selectors.EVENT_WRITE:
                    tally["bytes_sent"] += sock.send(chunk)
                last_progress[sock] = time.monotonic()
            except BlockingIOError:
                pass
            except OSError as err:
                outcome = outcome_of(err)
                finish(sock, outcome if outcome in tally else "errors")
        now = time.monotonic()
        for sock, at in list(last_progress.items()):
            if now - at > silence:  # a full window for that long: let it go, count it
                finish(sock, "silent")
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    tally["open_at_end"] = len(sel.get_map())
    return tally


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("sink", "source", "client", "streams"))
    parser.add_argument("--listen")
    parser.add_argument("--connect")
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=float, default=20.0, help="longest silence")
    parser.add_argument("--total", type=float, default=60.0, help="longest run")
    parser.add_argument("--limit", type=int, default=256 * 1024 * 1024, help="source: bytes at most")
    parser.add_argument("--send", default="", help="client: a line to send first")
    parser.add_argument("--streams", type=int, default=16, help="streams: connections kept open")
    parser.add_argument("--stop", help="streams: stop once this file exists")
    args = parser.parse_args(argv)

    started = time.monotonic()
    deadline = started + args.total
    result = {"mode": args.mode}
    data = b""
    try:
        if args.mode == "streams":
            result.update(streams(address(args.connect), args.streams, args.stop, deadline, args.timeout))
            conn, outcome = None, "stopped"
        elif args.mode == "client":
            conn = socket.create_connection(address(args.connect), timeout=args.timeout)
            result["local_port"] = conn.getsockname()[1]
            with open(args.out + ".connected", "w") as note:
                note.write(f"{result['local_port']}\n")
        else:
            conn = accept_one(args.listen, args.out + ".ready", args.timeout)
        if conn is not None:
            with conn:
                if args.mode == "source":
                    sent, outcome = 0, "limit"
                    chunk = hashlib.sha256(b"source").digest() * 2048
                    while sent < args.limit:
                        if time.monotonic() > deadline:
                            outcome = "timeout"
                            break
                        conn.settimeout(args.timeout)
                        try:
                            sent += conn.send(chunk)
                        except OSError as err:
                            outcome = outcome_of(err)
                            break
                    result["sent"] = sent
                else:
                    if args.send:
                        conn.sendall(args.send.encode() + b"\n")
                    data, outcome = read_all(conn, args.timeout, deadline)
    except OSError as err:
        outcome = outcome_of(err)
    result.update(outcome=outcome, received=len(data), sha256=hashlib.sha256(data).hexdigest(),
                  seconds=round(time.monotonic() - started, 2))
    with open(args.out + ".bin", "wb") as out:
        out.write(data)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as out:
        json.dump(result, out)
    os.rename(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
