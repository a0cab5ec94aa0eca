"""The stack runtime driven step by step: a real region, interface, host and
TCP core on our side; on the far side of an in-memory Ethernet link, a peer
host built from the same stack pieces.  The application's half of the ABI is
played with the same mts_shm.h operations the interposer uses."""
import errno
import os
import socket

import pytest

from mtcpshim._shm import ffi, lib
from mtcpshim.region import Region, RegionSize
from mtcpshim.runtime import Runtime
from stack.host import TcpHost
from stack.iface import Interface
from stack.storage import RingBuffer

STACK_IP, PEER_IP = 0xC6120002, 0xC6120001
STACK_MAC, PEER_MAC = bytes.fromhex("020000000002"), bytes.fromhex("020000000001")
RING = 64 * 1024


class MemoryLink:
    """The stack's packet I/O: frames it sends go to the peer; frames the
    peer sends wait in `inbound`."""

    mac = STACK_MAC

    def __init__(self):
        self.inbound, self.outbound = [], []
        self._fd = os.eventfd(0, os.EFD_NONBLOCK)

    def fileno(self):
        return self._fd

    def recv_batch(self, max_frames):
        batch, self.inbound = self.inbound[:max_frames], self.inbound[max_frames:]
        return batch

    def send_batch(self, frames):
        self.outbound.extend(bytes(f) for f in frames)
        return len(frames)


class Peer:
    """A host on the other end of the link, from the same stack pieces."""

    def __init__(self):
        self.iface = Interface(PEER_MAC, PEER_IP, 24)
        self.host = TcpHost(PEER_IP)

    def deliver(self, frames, now):
        for frame in frames:
            tcp = self.iface.receive(frame, now)
            if tcp is not None:
                self.host.receive(*tcp, now)

    def transmit(self, now):
        frames = []
        for dst, seg in self.host.take_output():
            frame = self.iface.frame_tcp(dst, seg, now)
            if frame is not None:
                frames.append(bytes(frame))
        return frames + [bytes(f) for f in self.iface.take_frames()]


class World:
    def __init__(self):
        self.region = Region.create(RegionSize(nslots=16, nwaiters=4, cmd_capacity=64, rx_size=RING,
                                               tx_size=RING), STACK_IP, 24)
        self.h = self.region.header
        self.ctl_stack, self.ctl_app = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.wake = os.eventfd(0, os.EFD_NONBLOCK)
        self.link = MemoryLink()
        self.runtime = Runtime(self.region, self.link, Interface(STACK_MAC, STACK_IP, 24), TcpHost(STACK_IP),
                               self.ctl_stack.detach(), self.wake)
        self.peer = Peer()
        self.now = 1000.0

    def settle(self, rounds=50, advance=0.001):
        """Runs both sides until the link is quiet."""
        for _ in range(rounds):
            self.now += advance
            self.runtime.step(self.now)
            self.peer.host.on_timers(self.now)
            out, self.link.outbound = self.link.outbound, []
            self.peer.deliver(out, self.now)
            back = self.peer.transmit(self.now)
            self.link.inbound.extend(back)
            if not out and not back and not lib.mts_cmd_pending(self.h):
                return

    # -- the application's side of the ABI ------------------------------

    def command(self, op, slot, arg=0):
        assert lib.mts_cmd_push(self.h, op, slot, arg) == 0

    def sync(self, op, slot, arg=0):
        lib.mts_slot_at(self.h, slot).op_done = 0
        self.command(op, slot, arg)
        self.settle()
        s = lib.mts_slot_at(self.h, slot)
        assert s.op_done == 1
        return s.op_result

    def new_socket(self):
        slot = lib.mts_slot_alloc(self.h)
        lib.mts_slot_at(self.h, slot).refcnt = 1
        return slot

    def write(self, slot, data):
        s = lib.mts_slot_at(self.h, slot)
        n = lib.mts_ring_write(ffi.addressof(s.tx), lib.mts_tx_data(self.h, slot), self.h.tx_size, data, len(data))
        if not s.tx_pending:
            s.tx_pending = 1
            self.command(lib.MTS_OP_TX, slot)
        return n

    def read(self, slot, n=RING):
        s = lib.mts_slot_at(self.h, slot)
        buf = ffi.new("uint8_t[]", n)
        got = lib.mts_ring_read(ffi.addressof(s.rx), lib.mts_rx_data(self.h, slot), self.h.rx_size, buf, n)
        if lib.mts_rx_take_notify(s):
            self.command(lib.MTS_OP_RXWIN, slot)
        return ffi.buffer(buf, got)[:]


def addr(ip, port):
    return ip << 16 | port


@pytest.fixture
def world():
    w = World()
    yield w
    w.region.close()


def listening_socket(world, port=8080):
    slot = world.new_socket()
    assert world.sync(lib.MTS_OP_BIND, slot, addr(0, port)) == 0
    assert world.sync(lib.MTS_OP_LISTEN, slot, 16) == 0
    return slot


def peer_connects(world, port=8080):
    buffers = RingBuffer(RING), RingBuffer(RING)
    conn = world.peer.host.connect_ephemeral(STACK_IP, port, *buffers, None, world.now)
    world.settle()
    return conn, buffers


def test_passive_open_data_both_ways_and_close_frees_the_slot(world):
    listener = listening_socket(world)
    conn, (peer_tx, peer_rx) = peer_connects(world)
    assert conn.state.name == "ESTABLISHED"

    child = lib.mts_accept_pop(world.h, listener)
    assert child >= 0
    child_slot = lib.mts_slot_at(world.h, child)
    assert child_slot.state == lib.MTS_ST_CONNECTED
    assert (child_slot.remote_ip, child_slot.remote_port) == (PEER_IP, conn.local_port)
    assert lib.mts_slot_poll(world.h, listener) == 0  # queue drained

    request = b"GET / HTTP/1.1\r\n\r\n"
    peer_tx.write(request)
    conn.send_ready(world.now)
    world.peer.host.after(conn, world.now)
    world.settle()
    assert world.read(child) == request

    response = os.urandom(200_000)  # more than the ring: flow control
    sent = 0
    received = b""
    for _ in range(100):
        sent += world.write(child, response[sent:])
        world.settle()
        received += peer_rx.read(len(peer_rx))
        conn.recv_consumed(world.now)
        world.peer.host.after(conn, world.now)
        if received == response:
            break
    assert received == response

    lib.mts_slot_at(world.h, child).refcnt = 0
    world.command(lib.MTS_OP_CLOSE, child)
    world.settle()
    assert conn.state.name == "CLOSE_WAIT"
    conn.close(world.now)
    world.peer.host.after(conn, world.now)
    world.settle()
    assert lib.mts_slot_at(world.h, child).in_use == lib.MTS_SLOT_FREE


def test_active_open_refused_publishes_econnrefused(world):
    slot = world.new_socket()
    assert world.sync(lib.MTS_OP_CONNECT, slot, addr(PEER_IP, 9)) == 0
    s = lib.mts_slot_at(world.h, slot)
    assert s.state == lib.MTS_ST_CLOSED
    assert s.so_error == errno.ECONNREFUSED
    assert s.events & lib.MTS_EV_HUP


def test_active_open_to_peer_listener_then_peer_reset(world):
    accepted = []
    world.peer.host.listen(80, 8, lambda ip, port: (RingBuffer(RING), RingBuffer(RING), accepted))
    slot = world.new_socket()
    assert world.sync(lib.MTS_OP_CONNECT, slot, addr(PEER_IP, 80)) == 0
    world.settle()
    s = lib.mts_slot_at(world.h, slot)
    assert s.state == lib.MTS_ST_CONNECTED and s.events & lib.MTS_EV_CONNECTED
    assert s.local_ip == STACK_IP and s.local_port != 0

    peer_conn = next(iter(world.peer.host.connections.values()))
    peer_conn.abort(world.now)
    world.peer.host.after(peer_conn, world.now)
    world.settle()
    assert s.so_error == errno.ECONNRESET
    assert s.events & lib.MTS_EV_HUP


def test_bind_conflicts_and_foreign_addresses_fail(world):
    first, second, third = world.new_socket(), world.new_socket(), world.new_socket()
    assert world.sync(lib.MTS_OP_BIND, first, addr(0, 8080)) == 0
    assert world.sync(lib.MTS_OP_BIND, second, addr(STACK_IP, 8080)) == -errno.EADDRINUSE
    assert world.sync(lib.MTS_OP_BIND, third, addr(0x0A000001, 80)) == -errno.EADDRNOTAVAIL


def test_connect_off_prefix_without_gateway_is_unreachable(world):
    slot = world.new_socket()
    assert world.sync(lib.MTS_OP_CONNECT, slot, addr(0x08080808, 80)) == -errno.ENETUNREACH


def test_armed_waiter_is_woken_once_by_new_readiness(world):
    listener = listening_socket(world)
    waiter_id = lib.mts_waiter_alloc(world.h, os.getpid())
    waiter_fd = os.eventfd(0, os.EFD_NONBLOCK)
    msg = ffi.new("struct mts_ctl_msg *", {"op": lib.MTS_CTL_REGISTER_WAITER, "waiter": waiter_id})
    socket.send_fds(world.ctl_app, [ffi.buffer(msg)[:]], [waiter_fd])
    world.settle()
    waiter = lib.mts_waiter_at(world.h, waiter_id)
    assert waiter.registered == 1

    waiter.armed = 1
    peer_connects(world)
    assert os.eventfd_read(waiter_fd) == 1
    assert waiter.armed == 0
    assert lib.mts_accept_pending(world.h, listener) == 1


def test_accepted_socket_is_published_established_before_it_is_queued(world, monkeypatch):
    """Another process may accept the instant the child is queued: the child's
    state must already read as connected then (a FRESH state read as EOF)."""
    import mtcpshim.runtime as runtime_module

    states_when_queued = []

    class RecordingLib:
        def __getattr__(self, name):
            return getattr(lib, name)

        def mts_accept_push(self, header, listener, child):
            states_when_queued.append(lib.mts_slot_at(header, child).state)
            return lib.mts_accept_push(header, listener, child)

    monkeypatch.setattr(runtime_module, "lib", RecordingLib())
    listening_socket(world)
    peer_connects(world)
    assert states_when_queued == [lib.MTS_ST_CONNECTED]


def test_socket_options_reach_the_connection(world):
    world.peer.host.listen(80, 8, lambda ip, port: (RingBuffer(RING), RingBuffer(RING), None))
    slot = world.new_socket()
    s = lib.mts_slot_at(world.h, slot)
    s.opt_nodelay, s.opt_user_timeout_ms = 1, 2500
    s.opt_congestion = b"reno"
    assert world.sync(lib.MTS_OP_CONNECT, slot, addr(PEER_IP, 80)) == 0
    conn = world.runtime.sockets[slot].conn
    assert (conn.nodelay, conn.user_timeout, conn.congestion) == (True, 2.5, "reno")
