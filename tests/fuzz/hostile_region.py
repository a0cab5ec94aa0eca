#!/usr/bin/env python3
"""A hostile program: run it UNDER the stack, it attacks the shared region.

    mtcpshim run [--netns NS --iface IF] -- python3 tests/fuzz/hostile_region.py MODE [options]

It finds the region through MTCPSHIM_FDS ("SHM_FD,CTL_FD,WAKE_FD,DEATH_FD",
see mtcpshim/launcher.py), maps it read-write as any process of a wrapped
program may, and writes what an attacker would.  Every offset comes from
the ABI header through cffi (mtcpshim._shm.ffi) and from the region's header
as it was when the program started: the attack never trusts the values it
has itself corrupted.

Modes, one per row of issue 8's table, plus the fuzzer:

  nslots          header.nslots = 0xFFFFFFFF, then a command for slot 0x7FFFFFF0
  cmdq            header.cmd_capacity and the queue's dequeue position huge, then a command
  accept-indices  header.rx_size huge and a listener's accept ring head/tail moved;
                  then a client connects (the test does that, see --state)
  waiters         header.nwaiters huge, waiters_off far away, then a waiter registration
  data-off        header.data_off moved, a connection to --peer opened, 4096 bytes "queued"
  fake-accept     a made-up slot id in a listener's accept queue, then close
  rx-tail         a live connection's (to --peer) RX tail 10 MB past its head, keep receiving, close
  slot-free       an accepted connection's slot marked free, then a second connection accepted
  sendfile-spans  a file sent with sendfile (the stack takes spans of it), then a span
                  record from a file never registered, over bytes already sent, past the ring
  keepalive-options  keep-alive idle/interval/count and user timeout 0xFFFFFFFF on a live
                  connection (to --peer), then MTS_OP_SETOPT
  listener-close-handshake   (honest) the listener closed during a client's handshake: the
                  stack must not write into the freed slot when the handshake completes
  fuzz            seeded random and adversarial values into every field it can reach,
                  --count operations at --rate per second, while the program's own
                  blob server (--blob-port, a child process) serves honest clients
                  and kernel clients keep connections to a decoy listener
                  (--victim-port) open: those are attacked
  serve           (helper) an HTTP/1.0 blob server under the stack, used by fuzz

Talking to the test (--state DIR): the program writes small JSON files into
DIR when something happened ("ready", "attacked", "check-ready", "result")
and waits, where the test must act in between, for DIR/go; DIR/stop ends
it.  After each attack it restores the header's geometry (so that its own
interposer keeps working: the stack must not have needed that) and serves a
known blob on --check-port, so the test can check that a new connection
over the same stack is byte-exact.  Every wait is bounded.
"""
import argparse
import ctypes
import ctypes.util
import hashlib
import json
import mmap
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

from mtcpshim._shm import ffi, lib

STRUCT_FORMAT = {1: "B", 2: "H", 4: "I", 8: "Q"}
HUGE_SLOT = 0x7FFFFFF0
TEN_MB = 10 * 1000 * 1000
DATA_OFF_BYTES = 4096

# Header fields that only the program reads (the stack writes them): writing
# them only makes the program's own sockets fail.  The fuzzer leaves them
# alone unless --all-fields.
PROGRAM_SIDE_HEADER_FIELDS = ("stack_state", "fault")


def log(*args):
    print("hostile:", *args, flush=True)


# --- the region's layout, from the ABI header ----------------------------------------


def fields_of(struct_name: str, prefix: str = "", base: int = 0):
    """(name, offset, size, kind) for every field of a struct, nested structs
    flattened ("rx.head"); kind is "int" or "bytes"."""
    out = []
    for name, field in ffi.typeof(struct_name).fields:
        offset = base + field.offset
        ctype = field.type
        if ctype.kind == "struct":
            out += fields_of(ctype.cname, f"{prefix}{name}.", offset)
        elif ctype.kind == "array":
            out.append((prefix + name, offset, ffi.sizeof(ctype), "bytes"))
        else:
            out.append((prefix + name, offset, ffi.sizeof(ctype), "int"))
    return out


HEADER_FIELDS = {name: (off, size, kind) for name, off, size, kind in fields_of("struct mts_header")}
SLOT_FIELDS = {name: (off, size, kind) for name, off, size, kind in fields_of("struct mts_slot")}
WORKER_FIELDS = {name: (off, size, kind) for name, off, size, kind in fields_of("struct mts_worker")}
WAITER_FIELDS = {name: (off, size, kind) for name, off, size, kind in fields_of("struct mts_waiter")}
CMD_FIELDS = {name: (off, size, kind) for name, off, size, kind in fields_of("struct mts_cmd")}
SLOT_SIZE = ffi.sizeof("struct mts_slot")
WAITER_SIZE = ffi.sizeof("struct mts_waiter")
WORKER_SIZE = ffi.sizeof("struct mts_worker")
CMD_SIZE = ffi.sizeof("struct mts_cmd")
CMDQ_SIZE = ffi.sizeof("struct mts_cmdq")
ENQUEUE_POS = ffi.offsetof("struct mts_cmdq", "enqueue_pos")
DEQUEUE_POS = 64  # struct mts_cmdq's dequeue position (or, once private to the stack, padding)
CTL_MSG = ffi.sizeof("struct mts_ctl_msg")


def inherited_fds() -> tuple[int, int, int, int]:
    """The region, worker 0's control socket and wake eventfd, the death pipe."""
    value = os.environ.get("MTCPSHIM_FDS")
    if not value:
        sys.exit("hostile: MTCPSHIM_FDS is not set: run me under `mtcpshim run`")
    shm, death, _table, ctl, wake = (int(v) for v in value.split(",")[:5])  # then the other workers', if any
    return shm, ctl, wake, death


class Region:
    """The shared region, mapped read-write, with the geometry it had when we
    started (read once)."""

    def __init__(self):
        self.shm_fd, self.ctl_fd, self.wake_fd, self.death_fd = inherited_fds()
        self.size = os.fstat(self.shm_fd).st_size
        self.mm = mmap.mmap(self.shm_fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.start = {name: self.read(off, size) for name, (off, size, kind) in HEADER_FIELDS.items()
                      if kind == "int"}
        g = self.start
        self.nslots, self.nwaiters, self.cmd_capacity = g["nslots"], g["nwaiters"], g["cmd_capacity"]
        self.rx_size, self.tx_size = g["rx_size"], g["tx_size"]
        self.waiters_off, self.cmdq_off, self.workers_off = g["waiters_off"], g["cmdq_off"], g["workers_off"]
        self.slots_off, self.data_off = g["slots_off"], g["data_off"]
        self.region_size = g["region_size"]
        if g["magic"] != lib.MTS_MAGIC or self.region_size > self.size:
            sys.exit("hostile: the region does not look like an mtcpshim region")
        self._cas = _compare_and_swap_8(self.mm)

    # raw access
    def read(self, off: int, size: int) -> int:
        return struct.unpack_from("=" + STRUCT_FORMAT[size], self.mm, off)[0]

    def write(self, off: int, size: int, value: int) -> None:
        struct.pack_into("=" + STRUCT_FORMAT[size], self.mm, off, value & ((1 << (8 * size)) - 1))

    def write_bytes(self, off: int, data: bytes) -> None:
        self.mm[off:off + len(data)] = data

    # header
    def header(self, name: str) -> int:
        off, size, _ = HEADER_FIELDS[name]
        return self.read(off, size)

    def set_header(self, name: str, value: int) -> None:
        off, size, _ = HEADER_FIELDS[name]
        self.write(off, size, value)

    def restore_geometry(self) -> None:
        """Puts back every header field we may have written, as it was at start
        (the stack's own fields excepted)."""
        for name in ("magic", "version", "header_size", "region_size", "nslots", "nworkers", "nwaiters",
                     "cmd_capacity", "changes_capacity", "rx_size", "tx_size", "workers_off", "waiters_off",
                     "cmdq_off", "changes_off", "slots_off", "data_off", "ip", "prefix_len", "gateway"):
            self.set_header(name, self.start[name])
        self.set_worker("slot_hint", 0)

    def set_worker(self, name: str, value: int, worker: int = 0) -> None:
        """A field of a stack worker's words."""
        off, size, _ = WORKER_FIELDS[name]
        self.write(self.workers_off + worker * WORKER_SIZE + off, size, value)

    def worker(self, name: str, worker: int = 0) -> int:
        off, size, _ = WORKER_FIELDS[name]
        return self.read(self.workers_off + worker * WORKER_SIZE + off, size)

    def worker_of_slot(self, slot_id: int) -> int:
        return slot_id // (self.nslots // self.start["nworkers"])

    def move_to_worker_of(self, slot_id: int) -> None:
        """This thread runs on the core of the worker that owns the slot:
        the sockets it makes next take that worker's slots."""
        cpu = self.worker("cpu", self.worker_of_slot(slot_id))
        if cpu != 0xFFFFFFFF:                     # -1: a worker pinned nowhere
            os.sched_setaffinity(0, {cpu})

    # slots
    def slot_off(self, slot_id: int) -> int:
        return self.slots_off + slot_id * SLOT_SIZE

    def slot(self, slot_id: int, name: str) -> int:
        off, size, _ = SLOT_FIELDS[name]
        return self.read(self.slot_off(slot_id) + off, size)

    def set_slot(self, slot_id: int, name: str, value: int) -> None:
        off, size, _ = SLOT_FIELDS[name]
        self.write(self.slot_off(slot_id) + off, size, value)

    def rx_data_off(self, slot_id: int) -> int:
        return self.data_off + slot_id * (self.rx_size + self.tx_size)

    def tx_data_off(self, slot_id: int) -> int:
        return self.rx_data_off(slot_id) + self.rx_size

    def find_slot(self, local_port: int, state: int | None = None, remote_port: int | None = None,
                  timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            for slot_id in range(self.nslots):
                if (self.slot(slot_id, "in_use") == lib.MTS_SLOT_USED
                        and self.slot(slot_id, "local_port") == local_port
                        and (state is None or self.slot(slot_id, "state") == state)
                        and (remote_port is None or self.slot(slot_id, "remote_port") == remote_port)):
                    return slot_id
            if time.monotonic() > deadline:
                raise SystemExit(f"hostile: no slot with local port {local_port} (state {state}, "
                                 f"remote port {remote_port}) within {timeout:.0f} s")
            time.sleep(0.05)

    def listening_parts(self, port: int) -> list[int]:
        """A listener's slot and its siblings' (one per other stack
        worker), each with an accept queue of its own."""
        self.find_slot(port, lib.MTS_ST_LISTENING)
        return [slot_id for slot_id in range(self.nslots) if self.slot(slot_id, "in_use") == lib.MTS_SLOT_USED
                and self.slot(slot_id, "local_port") == port and self.slot(slot_id, "state") == lib.MTS_ST_LISTENING]

    # waiters
    def waiter_off(self, waiter_id: int) -> int:
        return self.waiters_off + waiter_id * WAITER_SIZE

    def waiter(self, waiter_id: int, name: str) -> int:
        off, size, _ = WAITER_FIELDS[name]
        return self.read(self.waiter_off(waiter_id) + off, size)

    # command queue
    def cell_off(self, pos: int) -> int:
        return self.cmdq_off + CMDQ_SIZE + (pos & (self.cmd_capacity - 1)) * CMD_SIZE

    def push(self, op: int, slot: int, arg: int, generation: int | None = None) -> bool:
        """mts_cmd_push over the raw region (Vyukov queue), with the geometry
        we started with, for the slot's generation as it is now unless
        `generation` says otherwise; False if the queue is full."""
        if generation is None:
            generation = self.slot(slot, "generation") if slot < self.nslots and op != lib.MTS_OP_WAITER_FREE else 0
        enqueue = self.cmdq_off + ENQUEUE_POS
        for _ in range(10000):
            pos = self.read(enqueue, 8)
            cell = self.cell_off(pos)
            lag = (self.read(cell, 8) - pos) & 0xFFFFFFFFFFFFFFFF
            lag = lag - (1 << 64) if lag >> 63 else lag
            if lag == 0:
                if self._cas(enqueue, pos, pos + 1):
                    self.write(cell + CMD_FIELDS["op"][0], 4, op)
                    self.write(cell + CMD_FIELDS["slot"][0], 4, slot)
                    self.write(cell + CMD_FIELDS["arg"][0], 8, arg)
                    self.write(cell + CMD_FIELDS["generation"][0], 4, generation)
                    self.write(cell + CMD_FIELDS["seq"][0], 8, pos + 1)
                    return True
            elif lag < 0:
                return False
        return False

    def wake_stack(self) -> None:
        try:
            os.eventfd_write(self.wake_fd, 1)
        except OSError:
            pass

    def register_waiter(self, waiter_id: int) -> None:
        """An MTS_CTL_REGISTER_WAITER datagram for waiter_id, with a fresh eventfd."""
        ctl = socket.socket(fileno=self.ctl_fd)
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            message = ffi.buffer(ffi.new("struct mts_ctl_msg *", {"op": lib.MTS_CTL_REGISTER_WAITER,
                                                                    "id": waiter_id & 0xFFFFFFFF}))[:]
            socket.send_fds(ctl, [message], [efd])
        except OSError:
            pass
        finally:
            ctl.detach()
            os.close(efd)


def _compare_and_swap_8(mm: mmap.mmap):
    """An atomic 8-byte compare-and-swap on the mapping, from libatomic: the
    command queue has other producers (the program's other processes).
    Without libatomic, a plain read-compare-write (fine when we are the only
    producer)."""
    name = ctypes.util.find_library("atomic")
    if name:
        try:
            libatomic = ctypes.CDLL(name)
            cas = libatomic.__atomic_compare_exchange_8
            cas.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int)
            cas.restype = ctypes.c_bool
            base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            expected = ctypes.c_uint64()

            def atomic(off, old, new):
                expected.value = old
                return cas(base + off, ctypes.addressof(expected), new & 0xFFFFFFFFFFFFFFFF, 5, 5)
            return atomic
        except (OSError, AttributeError):
            pass

    def plain(off, old, new):
        if struct.unpack_from("=Q", mm, off)[0] != old:
            return False
        struct.pack_into("=Q", mm, off, new & 0xFFFFFFFFFFFFFFFF)
        return True
    return plain


# --- talking to the test ---------------------------------------------------------------


class State:
    def __init__(self, directory: str | None, max_wait: float):
        self.dir = directory
        self.max_wait = max_wait
        if directory:
            os.makedirs(directory, exist_ok=True)

    def say(self, event: str, **info) -> None:
        log(event, json.dumps(info, sort_keys=True))
        if self.dir:
            tmp = os.path.join(self.dir, f".{event}.tmp")
            with open(tmp, "w") as out:
                json.dump(info, out)
            os.rename(tmp, os.path.join(self.dir, event))

    def has(self, event: str) -> bool:
        return bool(self.dir) and os.path.exists(os.path.join(self.dir, event))

    def wait(self, event: str, timeout: float | None = None) -> bool:
        """Waits (bounded) for the test to create DIR/event; True if it did."""
        if not self.dir:
            return False
        deadline = time.monotonic() + (self.max_wait if timeout is None else timeout)
        while time.monotonic() < deadline:
            if self.has(event):
                return True
            time.sleep(0.05)
        log(f"gave up waiting for {event}")
        return False


# --- honest servers (check blob, fuzz mode's concurrent transfers) ------------------------


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _serve_connection(conn: socket.socket, body: bytes, stats: dict) -> None:
    try:
        conn.settimeout(20)
        request = b""
        while b"\r\n\r\n" not in request and len(request) < 8192:
            chunk = conn.recv(4096)
            if not chunk:
                break
            request += chunk
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        conn.shutdown(socket.SHUT_WR)
        # Wait (bounded) for the client's FIN, so our close does not reset it.
        while conn.recv(4096):
            pass
        stats["served"] += 1
    except OSError as err:
        stats["errors"] += 1
        stats["last_error"] = repr(err)
        log(f"serving a connection failed: {err!r}")
    finally:
        try:
            conn.close()
        except OSError:
            pass


def _listener(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", port))
        listener.listen(128)
        listener.settimeout(0.2)
    except OSError:
        listener.close()
        raise
    return listener


def _first_listener(port: int, attempts: int, stats: dict) -> socket.socket:
    """A listener, trying again with a new socket (so a new slot) when the
    stack refuses one: after the fuzzer, a slot the program's interposer
    hands out may be one the fuzzer had sent commands for."""
    for attempt in range(attempts):
        try:
            return _listener(port)
        except OSError as err:
            if attempt == attempts - 1:
                raise
            stats["listen_failures"] = stats.get("listen_failures", 0) + 1
            stats["last_listen_error"] = repr(err)
            log(f"a listener on port {port} failed: {err!r}; trying a new socket")
            time.sleep(0.1)
    raise AssertionError("unreachable")


def serve_blob(port: int, body: bytes, should_stop, max_seconds: float, on_ready=None,
               max_threads: int = 64, attempts: int = 1, stats=None) -> dict:
    """An HTTP/1.0 server for one body on 0.0.0.0:port, a thread per
    connection, until should_stop() or max_seconds."""
    stats = {} if stats is None else stats
    stats.update(served=0, errors=0, accepted=0)
    listener = _first_listener(port, attempts, stats)
    if on_ready:
        on_ready()
    deadline = time.monotonic() + max_seconds
    threads = []
    try:
        while not should_stop() and time.monotonic() < deadline:
            conn = _accept_one(listener, stats)
            if conn is None:
                continue
            threads = [t for t in threads if t.is_alive()]
            if len(threads) >= max_threads:
                conn.close()
                continue
            thread = threading.Thread(target=_serve_connection, args=(conn, body, stats), daemon=True)
            thread.start()
            threads.append(thread)
    finally:
        listener.close()
        for thread in threads:
            thread.join(5)
    return stats


def _accept_one(listener, stats: dict):
    """One accept, counted; None on a timeout or an error (after a pause)."""
    try:
        conn, _ = listener.accept()
    except (TimeoutError, socket.timeout):
        return None
    except OSError as err:
        stats["accept_errors"] = stats.get("accept_errors", 0) + 1
        stats["last_error"] = repr(err)
        time.sleep(0.1)
        return None
    stats["accepted"] += 1
    return conn


def serve_pool(port: int, body: bytes, should_stop, max_seconds: float, on_ready, workers: int = 8) -> dict:
    """The honest server beside the fuzzer: a fixed pool of threads, each
    accepting and serving on one listener.  Every thread has blocked in the
    interposer (so owns its waiter) before on_ready: no waiter is allocated
    or freed while the fuzzer writes."""
    stats = {"served": 0, "errors": 0, "accepted": 0}
    listener = _listener(port)
    deadline = time.monotonic() + max_seconds

    def worker():
        while not should_stop() and time.monotonic() < deadline:
            conn = _accept_one(listener, stats)
            if conn is not None:
                _serve_connection(conn, body, stats)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # each has waited in accept at least once
    on_ready()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 30)
    listener.close()
    return stats


def check_phase(region: Region, state: State, args) -> dict:
    """After the attack: the header's geometry back as it was (our own
    interposer reads it), then a fresh listener serving the check blob."""
    region.restore_geometry()
    log("check: a new listener")
    body = blob(args.check_size, args.seed + 1)
    stats = {}

    def ready():
        state.say("check-ready", port=args.check_port, size=len(body), sha256=hashlib.sha256(body).hexdigest(),
                  listen_failures=stats.get("listen_failures", 0))
    try:
        serve_blob(args.check_port, body, lambda: state.has("stop"), args.max_seconds, on_ready=ready,
                   attempts=20 if args.mode == "fuzz" else 1, stats=stats)
    except OSError as err:
        # Say so, and stay until told to stop: the test still looks at the stack.
        state.say("check-failed", error=repr(err))
        state.wait("stop", args.max_seconds)
        stats["error"] = repr(err)
    return stats


# --- the attacks ----------------------------------------------------------------------------


def listen(port: int, backlog: int = 16) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(backlog)
    return sock


def attack_nslots(region: Region, state: State, args) -> dict:
    region.set_header("nslots", 0xFFFFFFFF)
    pushed = region.push(lib.MTS_OP_BIND, HUGE_SLOT, 4242)
    region.wake_stack()
    state.say("attacked", slot=HUGE_SLOT, pushed=pushed)
    time.sleep(args.settle)
    return {"pushed": pushed}


def attack_cmdq(region: Region, state: State, args) -> dict:
    region.set_header("cmd_capacity", 1 << 31)
    region.write(region.cmdq_off + DEQUEUE_POS, 8, (1 << 62) | 0x7FFFFF00)
    # A well-formed command (in the real queue) with an op no handler has:
    # whoever takes it must count it as bad.
    pushed = region.push(0, 0, 0)
    region.wake_stack()
    state.say("attacked", pushed=pushed)
    time.sleep(args.settle)
    return {"pushed": pushed}


def attack_accept_indices(region: Region, state: State, args) -> dict:
    listener = listen(args.port)
    parts = region.listening_parts(args.port)
    region.set_header("rx_size", 1 << 31)
    moved = 1 << 40
    for slot_id in parts:                         # whichever worker gets the connection
        region.set_slot(slot_id, "rx.head", moved)
        region.set_slot(slot_id, "rx.tail", moved)
    slot_id = parts[0]
    state.say("attacked", slot=slot_id, port=args.port, head=moved, tail=moved)
    state.wait("go")  # the test's client has connected (or tried to)
    time.sleep(args.settle)
    listener.close()
    return {"slot": slot_id}


def attack_waiters(region: Region, state: State, args) -> dict:
    region.set_header("nwaiters", 0xFFFFFFFF)
    region.set_header("waiters_off", region.region_size + (1 << 40))
    region.register_waiter(HUGE_SLOT)
    state.say("attacked", waiter=HUGE_SLOT)
    time.sleep(args.settle)
    return {}


def parse_peer(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def data_off_pattern() -> bytes:
    out = b""
    counter = 0
    while len(out) < DATA_OFF_BYTES:
        out += hashlib.sha256(b"hostile data-off %d" % counter).digest()
        counter += 1
    return out[:DATA_OFF_BYTES]


def attack_data_off(region: Region, state: State, args) -> dict:
    # Where a new connection's TX area would lie for a stack that re-reads
    # data_off: just past the end of the region, in someone else's memory.
    region.set_header("data_off", region.region_size)
    conn = socket.create_connection(parse_peer(args.peer), timeout=10)
    local_port = conn.getsockname()[1]
    slot_id = region.find_slot(local_port)
    region.restore_geometry()  # our own interposer reads it
    # "Queue" 4096 bytes: into the TX area where it really is, head moved on.
    pattern = data_off_pattern()
    head = region.slot(slot_id, "tx.head")
    cap = region.tx_size
    start = head & (cap - 1)
    first = min(cap - start, DATA_OFF_BYTES)
    region.write_bytes(region.tx_data_off(slot_id) + start, pattern[:first])
    region.write_bytes(region.tx_data_off(slot_id), pattern[first:])
    region.set_slot(slot_id, "tx_pending", 1)
    region.set_slot(slot_id, "tx.head", head + DATA_OFF_BYTES)
    pushed = region.push(lib.MTS_OP_TX, slot_id, 0)
    region.wake_stack()
    state.say("attacked", slot=slot_id, local_port=local_port, pushed=pushed,
              sha256=hashlib.sha256(pattern).hexdigest())
    return _close_after(conn, args.settle, slot_id)


def _close_after(conn, seconds: float, slot_id: int) -> dict:
    """Let the stack take the attack for `seconds`, then close the victim."""
    time.sleep(seconds)
    try:
        conn.close()
    except OSError:
        pass
    return {"slot": slot_id}


def attack_fake_accept(region: Region, state: State, args) -> dict:
    """Made-up slot ids in the accept queue: one replacing the entry of a
    connection the stack queued and nobody accepted yet (the test's client
    connects after "ready"), one more past the head with the head bumped.
    Then the listener is closed: the stack takes back what was not accepted."""
    listener = listen(args.port)
    parts = region.listening_parts(args.port)
    state.say("ready", port=args.port, slot=parts[0])
    deadline = time.monotonic() + args.max_wait

    def queued(slot_id):
        return region.slot(slot_id, "rx.head") != region.slot(slot_id, "rx.tail")
    while not any(map(queued, parts)) and time.monotonic() < deadline:
        time.sleep(0.02)
    slot_id = next(filter(queued, parts), parts[0])   # the queue of the worker that took the connection
    head, tail = region.slot(slot_id, "rx.head"), region.slot(slot_id, "rx.tail")
    capacity = region.rx_size // 4
    queue = region.rx_data_off(slot_id)
    made_up = region.nslots - 1 if slot_id != region.nslots - 1 else region.nslots - 2
    replaced = region.read(queue + (tail % capacity) * 4, 4) if head != tail else None
    if head != tail:
        region.write(queue + (tail % capacity) * 4, 4, made_up)
    region.write(queue + (head % capacity) * 4, 4, made_up - 1)
    region.set_slot(slot_id, "rx.head", head + 1)
    state.say("attacked", slot=slot_id, entry=made_up, replaced=replaced, head=head, tail=tail)
    listener.close()
    time.sleep(args.settle)
    return {"slot": slot_id, "entry": made_up, "replaced": replaced}


def _receive_for(conn: socket.socket, seconds: float, limit: int) -> tuple[int, str]:
    got, outcome = 0, "time up"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and got < limit:
        try:
            conn.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
            chunk = conn.recv(65536)
        except (TimeoutError, socket.timeout):
            continue
        except OSError as err:
            return got, repr(err)
        if not chunk:
            return got, "eof"
        got += len(chunk)
    return got, outcome


def attack_rx_tail(region: Region, state: State, args) -> dict:
    conn = socket.create_connection(parse_peer(args.peer), timeout=10)
    local_port = conn.getsockname()[1]
    slot_id = region.find_slot(local_port)
    before, _ = _receive_for(conn, 10, 64 * 1024)
    head = region.slot(slot_id, "rx.head")
    region.set_slot(slot_id, "rx.tail", head + TEN_MB)
    state.say("attacked", slot=slot_id, head=head, tail=head + TEN_MB, received_before=before)
    after, outcome = _receive_for(conn, args.settle + 2, 1 << 30)
    try:
        conn.close()
    except OSError:
        pass
    time.sleep(args.settle)
    return {"slot": slot_id, "received_before": before, "received_after": after, "outcome": outcome}


def attack_sendfile_spans(region: Region, state: State, args) -> dict:
    """sendfile() through our own interposer registers a file with the stack
    and queues spans of it; then a span record the interposer never writes:
    from a file number never registered, over bytes the stack already took
    from the ring, longer than the ring, and the head moved past it."""
    with tempfile.TemporaryFile() as served:
        served.write(os.urandom(1 << 20))
        served.flush()
        conn = socket.create_connection(parse_peer(args.peer), timeout=10)
        slot_id = region.find_slot(conn.getsockname()[1])
        sent = os.sendfile(conn.fileno(), served.fileno(), 0, 256 * 1024)
        time.sleep(args.settle)
    head, spans = region.slot(slot_id, "tx.head"), region.slot(slot_id, "tx_span_head")
    record = ffi.new("struct mts_span *", {"pos": head - 100, "offset": 1 << 62, "len": region.tx_size + 1,
                                           "file": 0xFFFF})
    at = region.slot_off(slot_id) + SLOT_FIELDS["tx_spans"][0] + spans % lib.MTS_TX_SPANS * ffi.sizeof(record[0])
    region.write_bytes(at, ffi.buffer(record)[:])
    region.set_slot(slot_id, "tx_span_head", spans + 1)
    region.set_slot(slot_id, "tx.head", head + 4096)
    region.set_slot(slot_id, "tx_pending", 1)
    pushed = region.push(lib.MTS_OP_TX, slot_id, 0)
    region.wake_stack()
    state.say("attacked", slot=slot_id, sent=sent, pushed=pushed)
    return _close_after(conn, args.settle, slot_id)


def attack_keepalive_options(region: Region, state: State, args) -> dict:
    """Socket options written straight into the slot, past what setsockopt
    allows (Linux caps TCP_KEEPIDLE and TCP_KEEPINTVL at 32767 s): keep-alive
    on, idle and interval 0xFFFFFFFF seconds, then MTS_OP_SETOPT.  Found by
    the fuzzer: the keep-alive deadline, 136 years away, made the stack's
    poll() timeout overflow."""
    conn = socket.create_connection(parse_peer(args.peer), timeout=10)
    slot_id = region.find_slot(conn.getsockname()[1])
    for name in ("opt_keepidle", "opt_keepintvl", "opt_keepcnt", "opt_user_timeout_ms"):
        region.set_slot(slot_id, name, 0xFFFFFFFF)
    region.set_slot(slot_id, "opt_keepalive", 1)
    pushed = region.push(lib.MTS_OP_SETOPT, slot_id, lib.MTS_OPT_KEEPALIVE)
    region.wake_stack()
    state.say("attacked", slot=slot_id, pushed=pushed)
    # The stack goes idle: its next deadline is the keep-alive.
    return _close_after(conn, args.settle + 2, slot_id)


def attack_listener_close_handshake(region: Region, state: State, args) -> dict:
    """Not an attack: an honest program closes its listener while a client's
    handshake is still in flight (the test holds the client's ACK and data
    back with nftables).  The stack must not go on writing into the slot it
    freed when the held segments arrive."""
    listener = listen(args.port)
    state.say("ready", port=args.port)
    deadline = time.monotonic() + args.max_wait
    child = None
    while child is None and time.monotonic() < deadline:
        child = next((i for i in range(region.nslots) if region.slot(i, "in_use") == lib.MTS_SLOT_USED
                      and region.slot(i, "local_port") == args.port
                      and region.slot(i, "state") != lib.MTS_ST_LISTENING), None)
        time.sleep(0.01)
    if child is None:
        raise SystemExit("hostile: no half-open connection appeared")
    generation = region.slot(child, "generation")
    listener.close()
    while region.slot(child, "in_use") != lib.MTS_SLOT_FREE and time.monotonic() < deadline:
        time.sleep(0.01)
    at_free = {name: region.slot(child, name) for name in ("in_use", "generation", "rx.head", "tx.tail")}
    state.say("attacked", slot=child, **at_free)
    state.wait("go")  # the test released the held segments
    # The client's retransmissions (backed off meanwhile) and the stack's
    # SYN-ACK retransmissions get the held segments through within seconds.
    until = time.monotonic() + 15
    while time.monotonic() < until and region.slot(child, "rx.head") == at_free["rx.head"]:
        time.sleep(0.05)
    time.sleep(args.settle)
    after = {name: region.slot(child, name) for name in ("in_use", "generation", "rx.head", "tx.tail")}
    written = after["generation"] == generation and after["in_use"] == lib.MTS_SLOT_FREE \
        and after["rx.head"] != at_free["rx.head"]
    return {"slot": child, "at_free": at_free, "after": after, "freed_slot_written": written,
            "rx_data": bytes(region.mm[region.rx_data_off(child):region.rx_data_off(child) + 16]).hex()}


def tagged(tag: bytes, size: int) -> bytes:
    return (tag * (size // len(tag) + 1))[:size]


def attack_slot_free(region: Region, state: State, args) -> dict:
    listener = listen(args.port)
    listener.settimeout(args.max_wait)
    state.say("ready", port=args.port)
    first, first_peer = listener.accept()
    victim = region.find_slot(args.port, remote_port=first_peer[1])
    region.set_slot(victim, "in_use", lib.MTS_SLOT_FREE)
    region.set_worker("slot_hint", victim, region.worker_of_slot(victim))
    state.say("attacked", slot=victim, first_peer_port=first_peer[1])
    second, second_peer = listener.accept()
    second_slot = region.find_slot(args.port, remote_port=second_peer[1], timeout=2) \
        if _slot_exists(region, args.port, second_peer[1]) else None
    results = {}
    for name, conn, tag in (("first", first, b"<first connection>"), ("second", second, b"<second connection>")):
        try:
            conn.settimeout(10)
            conn.sendall(tagged(tag, args.tag_size))
            results[name] = "sent"
        except OSError as err:
            results[name] = repr(err)
    for conn in (first, second):
        try:
            conn.close()
        except OSError:
            pass
    listener.close()
    state.say("sent", **results)
    time.sleep(args.settle)
    return {"slot": victim, "second_slot": second_slot, "second_peer_port": second_peer[1], **results}


def attack_slot_taken(region: Region, state: State, args) -> dict:
    """The program marks its own connection's slot free, and its next socket
    (a listener on the same port) is given that slot; then it closes the old
    descriptor.  The new socket's first command makes the stack reset the
    old connection; the old descriptor's close must not close the new one."""
    listener = listen(args.port)
    listener.settimeout(args.max_wait)
    state.say("ready", port=args.port)
    first, first_peer = listener.accept()
    listener_slot = region.find_slot(args.port, state=lib.MTS_ST_LISTENING)
    listener.close()
    # The stack frees the listener's slot when it serves the close, and a
    # freed slot below the hint moves the hint there: wait for that first,
    # or the new listener may get the listener's old slot, not the victim's.
    deadline = time.monotonic() + args.max_wait
    while region.slot(listener_slot, "in_use") != lib.MTS_SLOT_FREE and time.monotonic() < deadline:
        time.sleep(0.01)
    victim = region.find_slot(args.port, remote_port=first_peer[1])
    region.set_slot(victim, "in_use", lib.MTS_SLOT_FREE)
    region.set_worker("slot_hint", victim, region.worker_of_slot(victim))
    region.move_to_worker_of(victim)
    taker = listen(args.port)
    taken = region.slot(victim, "state") == lib.MTS_ST_LISTENING
    first.close()
    taker.settimeout(args.max_wait)
    state.say("attacked", slot=victim, taken=taken, first_peer_port=first_peer[1])
    second, _ = taker.accept()
    try:
        second.settimeout(10)
        second.sendall(tagged(b"<second connection>", args.tag_size))
        sent = "sent"
    except OSError as err:
        sent = repr(err)
    second.close()
    taker.close()
    state.say("sent", second=sent)
    time.sleep(args.settle)
    return {"slot": victim, "taken": taken, "second": sent}


def _slot_exists(region: Region, port: int, remote_port: int) -> bool:
    return any(region.slot(i, "local_port") == port and region.slot(i, "remote_port") == remote_port
               for i in range(region.nslots))


# --- the fuzzer ---------------------------------------------------------------------------------


class Fuzzer:
    """Seeded hostile writes into every field of the region it can reach,
    sparing only what the program's honest connections stand on: the slots
    whose local port is protected (--protect-port), the waiters of protected
    processes (--protect-pid), and (unless --all-fields) the header fields
    only the program reads.  Command cells' sequence numbers and the
    producers' enqueue position are spared too (--all-fields writes them):
    the queue is the program's own, one bad sequence number stops every
    process of the program (not the stack) from being heard."""

    def __init__(self, region: Region, seed: int, protect_ports, protect_pids, all_fields: bool):
        self.r = region
        self.rng = random.Random(seed)
        self.protect_ports = set(protect_ports)
        self.protect_pids = set(protect_pids)
        self.all_fields = all_fields
        self.counts: dict[str, int] = {}
        self.writes = 0
        self.steps = 0
        self.live: list[int] = []
        self.connected: list[int] = []
        self.generation: dict[int, int] = {}
        self.listeners: list[int] = []
        self._next_refresh = 0
        self.header_fields = [name for name, (off, size, kind) in HEADER_FIELDS.items()
                              if not name.startswith("pad") and (
                                  all_fields or name not in PROGRAM_SIDE_HEADER_FIELDS)]
        self.slot_fields = [name for name in SLOT_FIELDS if not name.startswith(("pad", "rx.pad", "tx.pad"))]
        self.ring_fields = ["rx.head", "rx.tail", "tx.head", "tx.tail"]
        self.waiter_fields = list(WAITER_FIELDS)
        self.actions = [
            (self.header, 8), (self.slot_field, 20), (self.ring_index, 25), (self.accept_queue, 8),
            (self.waiter_entry, 6), (self.command, 20), (self.command_cell, 5), (self.data_bytes, 3),
            (self.dequeue_position, 2), (self.waiter_registration, 3),
        ]
        self._weights = [w for _, w in self.actions]

    # what may be touched
    def protected_slot(self, slot_id: int) -> bool:
        return 0 <= slot_id < self.r.nslots and self.r.slot(slot_id, "local_port") in self.protect_ports

    def protected_waiter(self, waiter_id: int) -> bool:
        return 0 <= waiter_id < self.r.nwaiters and self.r.waiter(waiter_id, "owner_pid") in self.protect_pids

    def refresh(self) -> None:
        r = self.r
        self.live = [i for i in range(r.nslots) if r.slot(i, "in_use") != lib.MTS_SLOT_FREE
                     and not self.protected_slot(i)]
        self.listeners = [i for i in self.live if r.slot(i, "state") == lib.MTS_ST_LISTENING]
        self.connected = [i for i in self.live if r.slot(i, "state") == lib.MTS_ST_CONNECTED]
        self.generation = {i: r.slot(i, "generation") for i in self.live}

    def still_ours(self, slot_id: int) -> bool:
        """A slot from the last refresh that has not been handed out again
        since (the allocation bumps its generation) and is not protected.
        Without this, a slot freed and given to an honest connection in the
        meantime would be written as if it were still the attacked one."""
        return self.generation.get(slot_id) == self.r.slot(slot_id, "generation") \
            and not self.protected_slot(slot_id)

    def pick_slot(self, live_bias: float = 0.8) -> int | None:
        if self.connected and self.rng.random() < 0.5:
            slot_id = self.rng.choice(self.connected)  # established connections moving data: the best targets
        elif self.live and self.rng.random() < live_bias:
            slot_id = self.rng.choice(self.live)
        else:
            slot_id = self.rng.randrange(self.r.nslots)
            if self.r.slot(slot_id, "in_use") != lib.MTS_SLOT_FREE and slot_id not in self.generation:
                return None  # in use since the last refresh: whose, we do not know yet
            return None if self.protected_slot(slot_id) else slot_id
        return slot_id if self.still_ours(slot_id) else None

    def wrote_slot(self, slot_id: int, generation: int) -> None:
        """After a write: if the slot was handed out meanwhile, the write may
        have landed on a fresh (possibly honest) connection; counted, so that
        a failure of an honest transfer can be told from a race of ours."""
        if self.r.slot(slot_id, "generation") != generation or self.protected_slot(slot_id):
            self.counts["raced"] = self.counts.get("raced", 0) + 1

    # values
    def value(self, size: int, current: int, related=()) -> int:
        bits = 8 * size
        mask = (1 << bits) - 1
        rng = self.rng
        choice = rng.randrange(12)
        if choice == 0:
            v = rng.choice((0, 1, mask, mask >> 1, 1 << (bits - 1), 0xFFFFFFFF, 1 << 63))
        elif choice == 1:
            v = current + rng.choice((1, -1, 2, -2))
        elif choice == 2 and related:
            v = rng.choice(related) + rng.choice((0, 1, -1))
        elif choice == 3:
            v = rng.choice((self.r.region_size, self.r.region_size + 4096, self.r.size, 1 << 40,
                            1 << 47, self.r.rx_size, self.r.rx_size + 1, self.r.nslots, self.r.nslots + 1))
        elif choice == 4:
            v = rng.randrange(4096)
        elif choice == 5:
            v = current + rng.choice((TEN_MB, -TEN_MB, self.r.rx_size, self.r.rx_size + 1, -self.r.rx_size - 1))
        else:
            v = rng.getrandbits(bits)
        return v & mask

    def count(self, kind: str) -> None:
        """Tallies what an action did; "spared" and "queue_full" wrote nothing."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if kind not in ("spared", "queue_full"):
            self.writes += 1

    # actions: each is one hostile operation
    def header(self) -> None:
        name = self.rng.choice(self.header_fields)
        off, size, kind = HEADER_FIELDS[name]
        if kind == "bytes":
            self.r.write_bytes(off, self.rng.randbytes(size))
        else:
            self.r.write(off, size, self.value(size, self.r.read(off, size), (self.r.start.get(name, 0),)))
        self.count("header")

    def slot_field(self) -> None:
        slot_id = self.pick_slot()
        if slot_id is None:
            return self.count("spared")
        name = self.rng.choice(self.slot_fields)
        off, size, kind = SLOT_FIELDS[name]
        at = self.r.slot_off(slot_id) + off
        generation = self.r.slot(slot_id, "generation")
        if kind == "bytes":
            self.r.write_bytes(at, self.rng.randbytes(size))
        elif name == "in_use" and self.r.read(at, 4) == lib.MTS_SLOT_FREE:
            return self.count("spared")  # marking a free slot used only leaks it (the program's own loss)
        else:
            self.r.write(at, size, self.value(size, self.r.read(at, size), (slot_id, self.r.nslots)))
        self.wrote_slot(slot_id, generation if name != "generation" else self.r.slot(slot_id, "generation"))
        self.count("slot")

    def ring_index(self) -> None:
        slot_id = self.pick_slot(0.9)
        if slot_id is None:
            return self.count("spared")
        name = self.rng.choice(self.ring_fields)
        ring = name.split(".")[0]
        other = self.r.slot(slot_id, f"{ring}.{'tail' if name.endswith('head') else 'head'}")
        current = self.r.slot(slot_id, name)
        cap = self.r.rx_size if ring == "rx" else self.r.tx_size
        related = (other, other + cap, other + cap + 1, other - 1, other + 1, other + TEN_MB, other - cap)
        generation = self.r.slot(slot_id, "generation")
        self.r.set_slot(slot_id, name, self.value(8, current, related))
        self.wrote_slot(slot_id, generation)
        self.count("ring")

    def accept_queue(self) -> None:
        if not self.listeners:
            return self.ring_index()
        slot_id = self.rng.choice(self.listeners)
        if not self.still_ours(slot_id):
            return self.count("spared")
        capacity = self.r.rx_size // 4
        head = self.r.slot(slot_id, "rx.head")
        entry = self.value(4, 0, tuple(self.live) + (slot_id, self.r.nslots, HUGE_SLOT))
        if self.live and self.rng.random() < 0.3:
            entry = self.rng.choice(self.live)
        if self.protected_slot(entry):
            return self.count("spared")
        self.r.write(self.r.rx_data_off(slot_id) + (head % capacity) * 4, 4, entry)
        if self.rng.random() < 0.7:
            self.r.set_slot(slot_id, "rx.head", head + self.rng.choice((1, 1, 2, capacity, capacity + 1)))
        self.count("accept")

    def waiter_entry(self) -> None:
        waiter_id = self.rng.randrange(self.r.nwaiters)
        if self.protected_waiter(waiter_id):
            return self.count("spared")
        name = self.rng.choice(self.waiter_fields)
        off, size, _ = WAITER_FIELDS[name]
        at = self.r.waiter_off(waiter_id) + off
        if name == "in_use" and self.r.waiter(waiter_id, "in_use") == 0:
            return self.count("spared")  # marking a free waiter owned only leaks it
        value = self.value(size, self.r.read(at, size), tuple(self.protect_pids))
        if name == "owner_pid" and value in self.protect_pids:
            value += 1  # would make it look protected: no difference to the stack
        self.r.write(at, size, value)
        self.count("waiter")

    def command(self) -> None:
        """A well-formed command with a random op, slot and argument.  In-range
        slot ids are live, unprotected ones only: a command for a free slot
        could still sit in the queue when that slot is handed to an honest
        connection, which no check of the stack can tell from the program's
        own command."""
        rng = self.rng
        op = rng.choice((rng.randrange(1, 10), rng.randrange(1, 10), rng.randrange(0, 16), rng.getrandbits(32)))
        if op == lib.MTS_OP_WAITER_FREE:
            slot_id = self.waiter_target()
            if slot_id is None:
                return self.count("spared")
        else:
            slot_id = rng.choice((rng.choice(self.live) if self.live else HUGE_SLOT, rng.getrandbits(32),
                                  self.r.nslots, self.r.nslots + 1, HUGE_SLOT, 0xFFFFFFFF))
            if slot_id < self.r.nslots and not self.still_ours(slot_id):
                return self.count("spared")
        arg = rng.choice((0, 1, rng.getrandbits(64), rng.getrandbits(16), self._connect_arg(), rng.randrange(9)))
        if op in (lib.MTS_OP_BIND, lib.MTS_OP_CONNECT) and (arg & 0xFFFF) in self.protect_ports:
            arg ^= 1  # not the honest servers' ports
        # The generation the last refresh saw (still_ours checked it is the
        # slot's now); now and then any other, which the stack must drop.
        generation = self.generation.get(slot_id, 0) if rng.random() < 0.9 else rng.getrandbits(32)
        if not self.r.push(op & 0xFFFFFFFF, slot_id & 0xFFFFFFFF, arg, generation):
            return self.count("queue_full")
        self.r.wake_stack()
        self.count("command")

    def waiter_target(self) -> int | None:
        """A waiter id for a forged registration or WAITER_FREE: out of range,
        or in range and not a protected process's."""
        rng = self.rng
        waiter_id = rng.choice((rng.randrange(self.r.nwaiters), rng.randrange(self.r.nwaiters),
                                self.r.nwaiters, self.r.nwaiters + 1, rng.getrandbits(32), HUGE_SLOT))
        return None if self.protected_waiter(waiter_id) else waiter_id

    def _connect_arg(self) -> int:
        # Somewhere on the test network's own /24 (198.18.0.0/15): no traffic leaves it.
        ip = (self.r.start["ip"] & 0xFFFFFF00) | self.rng.randrange(256)
        return ip << 16 | self.rng.randrange(65536)

    def command_cell(self) -> None:
        """Garbage in command cells.  Cells a producer will not reach for half
        a queue's turn are written freely (the stack must ignore them); or
        a command of ours is queued and rewritten in place before the stack
        takes it (if it is quicker, that is a plain forged command).  Pending
        cells hold the program's honest commands and are left alone.  The
        sequence numbers only with --all-fields: one bad sequence number
        stops the program's producers, not the stack."""
        rng = self.rng
        enqueue = self.r.read(self.r.cmdq_off + ENQUEUE_POS, 8)
        names = list(CMD_FIELDS) if self.all_fields else ["op", "slot", "arg", "generation", "pad"]
        name = rng.choice(names)
        off, size, _ = CMD_FIELDS[name]
        if rng.random() < 0.5:
            cell = self.r.cell_off(enqueue + self.r.cmd_capacity // 4 + rng.randrange(self.r.cmd_capacity // 2))
        else:
            target = rng.choice(self.live) if self.live else HUGE_SLOT
            # Not MTS_OP_WAITER_FREE: its slot field is a waiter id, and a
            # live slot's id is often a protected waiter's.
            if (target < self.r.nslots and not self.still_ours(target)) \
                    or not self.r.push(rng.randrange(1, lib.MTS_OP_WAITER_FREE), target, 0,
                                       self.generation.get(target, 0)):
                return self.count("spared")
            cell = self.r.cell_off(enqueue)
            if self.r.read(cell + CMD_FIELDS["slot"][0], 4) != target:
                return self.count("command")  # another producer took that position: ours went elsewhere
        value = self.value(size, self.r.read(cell + off, size), (self.r.nslots, HUGE_SLOT))
        if name == "slot" and value < self.r.nslots and not self.still_ours(value):
            return self.count("spared")
        # Whatever the stack may take from this cell must not free a protected
        # waiter (the honest server's thread would sleep on an eventfd nobody
        # writes any more: its next wait lasts its whole timeout).
        op = value if name == "op" else self.r.read(cell + CMD_FIELDS["op"][0], 4)
        slot = value if name == "slot" else self.r.read(cell + CMD_FIELDS["slot"][0], 4)
        if op == lib.MTS_OP_WAITER_FREE and self.protected_waiter(slot):
            return self.count("spared")
        self.r.write(cell + off, size, value)
        self.r.wake_stack()
        self.count("cell")

    def dequeue_position(self) -> None:
        at = self.r.cmdq_off + DEQUEUE_POS
        self.r.write(at, 8, self.value(8, self.r.read(at, 8), (self.r.cmd_capacity,)))
        self.count("dequeue")
        if self.all_fields and self.rng.random() < 0.5:
            at = self.r.cmdq_off + ENQUEUE_POS
            self.r.write(at, 8, self.value(8, self.r.read(at, 8), (self.r.cmd_capacity,)))
            self.count("enqueue")

    def data_bytes(self) -> None:
        slot_id = self.pick_slot()
        if slot_id is None:
            return self.count("spared")
        ring = self.rng.choice(("rx", "tx"))
        base = self.r.rx_data_off(slot_id) if ring == "rx" else self.r.tx_data_off(slot_id)
        cap = self.r.rx_size if ring == "rx" else self.r.tx_size
        n = self.rng.randrange(1, 64)
        generation = self.r.slot(slot_id, "generation")
        self.r.write_bytes(base + self.rng.randrange(cap - n), self.rng.randbytes(n))
        self.wrote_slot(slot_id, generation)
        self.count("data")

    def waiter_registration(self) -> None:
        waiter_id = self.waiter_target()
        if waiter_id is None:
            return self.count("spared")
        self.r.register_waiter(waiter_id)
        self.count("register")

    def step(self) -> None:
        """One hostile operation (an action that spared a protected target
        is drawn again, a bounded number of times)."""
        if self.steps >= self._next_refresh:
            self.refresh()
            self._next_refresh = self.steps + 100
        self.steps += 1
        before = self.writes
        for _ in range(20):
            self.rng.choices(self.actions, self._weights)[0][0]()
            if self.writes > before:
                return


def run_fuzz(region: Region, state: State, args) -> dict:
    """The fuzzer, beside an honest server (a child process: its slots, by
    port, and its waiters, by pid, are spared) and a decoy listener of ours
    that never accepts: the test's kernel clients keep connections to it
    open and sending, and those are what the fuzzer attacks.  No process of
    the program ever reads or closes a descriptor the fuzzer could have
    forged, so what happens to the honest connections is the stack's doing."""
    blob_body = blob(args.blob_size, args.seed + 2)
    child_state = os.path.join(state.dir, "blob") if state.dir else None
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "serve", "--port", str(args.blob_port),
         "--size", str(args.blob_size), "--seed", str(args.seed + 2), "--max-seconds", str(args.max_seconds)]
        + (["--state", child_state] if child_state else []), pass_fds=inherited_fds())
    children = {"blob": child}
    if state.dir and not State(child_state, args.max_wait).wait("check-ready"):
        raise SystemExit("hostile: the blob server did not start")
    decoys = []
    _new_decoy(region, args.victim_port, decoys)
    honest_listener = region.find_slot(args.blob_port, lib.MTS_ST_LISTENING)
    honest_generation = region.slot(honest_listener, "generation")
    state.say("ready", blob_port=args.blob_port, blob_sha256=hashlib.sha256(blob_body).hexdigest(),
              blob_size=len(blob_body), victim_port=args.victim_port, pids={"blob": child.pid})
    state.wait("go")
    fuzzer = Fuzzer(region, args.seed, [args.blob_port, args.check_port], [child.pid], args.all_fields)
    honest_waiters = _waiters_of(region, child.pid)
    started = time.monotonic()
    done = 0
    deadline = started + args.max_seconds
    next_decoy_check = 0.0
    try:
        while done < args.count and fuzzer.steps < 2 * args.count:
            if time.monotonic() > deadline or state.has("stop"):
                break
            if time.monotonic() >= next_decoy_check:
                _keep_a_decoy(region, args.victim_port, decoys, fuzzer.counts)
                next_decoy_check = time.monotonic() + 0.5
            fuzzer.step()
            done = fuzzer.writes
            if args.rate and fuzzer.steps % 50 == 0:
                ahead = started + done / args.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
    finally:
        seconds = time.monotonic() - started
        region.restore_geometry()
    log(f"writes: {done} in {seconds:.1f} s")
    _close_decoys(region, args.victim_port, decoys)
    result = {"writes": done, "steps": fuzzer.steps, "seconds": round(seconds, 2), "by_kind": fuzzer.counts,
              "blob_server_alive": child.poll() is None,
              # The honest server's waiters: a change means one was allocated
              # while the fuzzer wrote (free ids are fair game for forgeries).
              "honest_waiters": {"before": honest_waiters, "after": _waiters_of(region, child.pid)},
              # The honest listener's slot as the fuzzer leaves it (it never writes there).
              "honest_listener": {"slot": honest_listener, "generation_before": honest_generation,
                                  **{name: region.slot(honest_listener, name) for name in (
                                      "in_use", "generation", "state", "events", "so_error", "local_port",
                                      "refcnt", "rx.head", "rx.tail")}}}
    state.say("fuzzed", **result)
    return {"fuzz": result, "children": children}


def _waiters_of(region: Region, pid: int) -> list[int]:
    return [i for i in range(region.nwaiters) if region.waiter(i, "in_use") and region.waiter(i, "owner_pid") == pid]


def _new_decoy(region: Region, port: int, decoys: list) -> None:
    """A decoy listener, remembered with its slot and that slot's generation."""
    sock = listen(port, backlog=128)
    known = {slot_id for _, slot_id, _ in decoys}
    slot_id = next((i for i in range(region.nslots) if i not in known and _is_decoy(region, i, port)), None)
    decoys.append((sock, slot_id, region.slot(slot_id, "generation") if slot_id is not None else None))


def _is_decoy(region: Region, slot_id: int, port: int) -> bool:
    return (region.slot(slot_id, "in_use") == lib.MTS_SLOT_USED and region.slot(slot_id, "state") == lib.MTS_ST_LISTENING
            and region.slot(slot_id, "local_port") == port)


def _keep_a_decoy(region: Region, port: int, decoys: list, counts: dict) -> None:
    """A new decoy listener when the fuzzer has killed the last one.  The old
    descriptor stays open: its slot may already serve someone else (closing
    it would close that); the program's exit lets it go."""
    if any(_is_decoy(region, i, port) for i in range(region.nslots)):
        return
    try:
        _new_decoy(region, port, decoys)
        counts["decoys"] = counts.get("decoys", 0) + 1
    except OSError:
        counts["decoy_failures"] = counts.get("decoy_failures", 0) + 1


def _close_decoys(region: Region, port: int, decoys: list) -> None:
    """Closes each decoy whose slot is still its own (same generation, still
    listening on the decoy port): the stack then takes back what it queued
    there, from a fuzzed queue.  The others stay open until the program exits."""
    for sock, slot_id, generation in decoys:
        if slot_id is not None and _is_decoy(region, slot_id, port) \
                and region.slot(slot_id, "generation") == generation:
            try:
                sock.close()
            except OSError:
                pass


def serve_main(args) -> int:
    state = State(args.state, args.max_wait)
    body = blob(args.size, args.seed)
    stats = serve_pool(args.port, body, lambda: state.has("stop"), args.max_seconds,
                       on_ready=lambda: state.say("check-ready", port=args.port, pid=os.getpid()))
    state.say("served", **stats)
    return 0


ATTACKS = {
    "nslots": attack_nslots,
    "cmdq": attack_cmdq,
    "accept-indices": attack_accept_indices,
    "waiters": attack_waiters,
    "data-off": attack_data_off,
    "fake-accept": attack_fake_accept,
    "rx-tail": attack_rx_tail,
    "slot-free": attack_slot_free,
    "slot-taken": attack_slot_taken,
    "listener-close-handshake": attack_listener_close_handshake,
    "keepalive-options": attack_keepalive_options,
    "sendfile-spans": attack_sendfile_spans,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=list(ATTACKS) + ["fuzz", "serve"])
    parser.add_argument("--state", help="directory for the conversation with the test")
    parser.add_argument("--port", type=int, default=9100, help="the attacked listener's port")
    parser.add_argument("--peer", help="IP:PORT of a kernel peer to connect to (data-off, rx-tail)")
    parser.add_argument("--check-port", type=int, default=9200, help="the check server's port")
    parser.add_argument("--check-size", type=int, default=256 * 1024)
    parser.add_argument("--tag-size", type=int, default=64 * 1024, help="bytes sent per connection (slot-free)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds the stack gets to react")
    parser.add_argument("--max-wait", type=float, default=60.0, help="the longest wait for the test")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="the longest any phase runs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--count", type=int, default=20000, help="fuzz: hostile operations")
    parser.add_argument("--rate", type=float, default=1000.0, help="fuzz: operations per second (0: flat out)")
    parser.add_argument("--blob-port", type=int, default=9300, help="fuzz: the honest server's port")
    parser.add_argument("--blob-size", type=int, default=1024 * 1024)
    parser.add_argument("--victim-port", type=int, default=9400,
                        help="fuzz: the decoy listener's port (its connections are attacked)")
    parser.add_argument("--all-fields", action="store_true",
                        help="fuzz: also the program-side header fields and the queue's sequence numbers")
    parser.add_argument("--size", type=int, default=1024 * 1024, help="serve: body size")
    args = parser.parse_args(argv)

    if args.mode == "serve":
        return serve_main(args)
    state = State(args.state, args.max_wait)
    region = Region()
    log(f"region: {region.size} bytes, {region.nslots} slots, {region.nwaiters} waiters, "
        f"cmdq {region.cmd_capacity}, rx/tx {region.rx_size}/{region.tx_size}")
    result = {"mode": args.mode, "pid": os.getpid()}
    children = {}
    try:
        if args.mode == "fuzz":
            fuzzed = run_fuzz(region, state, args)
            children = fuzzed.pop("children")
            result.update(fuzzed)
        else:
            result["attack"] = ATTACKS[args.mode](region, state, args)
        result["check"] = check_phase(region, state, args)
    finally:
        for name in children:
            if state.dir:
                State(os.path.join(state.dir, name), args.max_wait).say("stop")
        for child in children.values():
            try:
                result.setdefault("children_status", {})[str(child.pid)] = child.wait(10)
            except subprocess.TimeoutExpired:
                child.terminate()
                try:
                    child.wait(5)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        if args.mode == "fuzz":
            log(f"writes: {result.get('fuzz', {}).get('writes', 0)}")
        state.say("result", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
