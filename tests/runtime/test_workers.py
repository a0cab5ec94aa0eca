"""Two stack workers serving one region, driven step by step: each its own
runtime, host and link, the peer's frames steered between them as the
packet sockets' filter steers them (stack/io/steer.py), and the program's
half of the ABI played with the operations the interposer uses."""
import os
import socket

import pytest

from mtcpshim._shm import ffi, lib
from mtcpshim.region import Region, RegionSize
from mtcpshim.runtime import Runtime
from mtcpshim.stack.host import TcpHost
from mtcpshim.stack.iface import Interface
from mtcpshim.stack.io.steer import worker_of_frame, worker_of_ports
from mtcpshim.stack.node import Node
from mtcpshim.stack.storage import RingBuffer
from support.link import MemoryLink
from world import PEER_IP, RING, STACK_IP, STACK_MAC, Peer, addr

WORKERS = 2
PORT = 8080


class Workers:
    def __init__(self):
        self.region = Region.create(RegionSize(nslots=32, nworkers=WORKERS, nwaiters=4, cmd_capacity=64,
                                               rx_size=RING, tx_size=RING), STACK_IP, 24)
        self.g = self.region.geom
        self.wakes = tuple(os.eventfd(0, os.EFD_NONBLOCK) for _ in range(WORKERS))
        self.ctl_apps, self.links, self.runtimes = [], [], []
        for worker in range(WORKERS):
            ctl_stack, ctl_app = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            link = MemoryLink(STACK_MAC)
            host = TcpHost(STACK_IP, steering=(worker, WORKERS))
            runtime = Runtime(self.region, link, Node(Interface(STACK_MAC, STACK_IP, 24), host),
                              ctl_stack.detach(), self.wakes[worker], worker=worker, wake_fds=self.wakes)
            self.ctl_apps.append(ctl_app)
            self.links.append(link)
            self.runtimes.append(runtime)
        self.peer = Peer()
        self.received = [0] * WORKERS  # frames each worker was handed
        self.now = 1000.0

    def close(self):
        for runtime, link, ctl_app in zip(self.runtimes, self.links, self.ctl_apps):
            runtime.close()
            link.close()
            ctl_app.close()
        for fd in self.wakes:
            os.close(fd)
        self.region.close()
        os.close(self.region.fd)

    def settle(self, rounds=60):
        for _ in range(rounds):
            self.now += 0.001
            for runtime in self.runtimes:
                runtime.step(self.now)
            self.peer.on_timers(self.now)
            out = [frame for link in self.links for frame in link.outbound]
            for link in self.links:
                link.outbound = []
            self.peer.ingest(out, self.now)
            back = self.peer.egress(self.now)
            for frame in back:
                frame = bytes(frame)
                steered = worker_of_frame(frame, WORKERS)
                for worker in range(WORKERS) if steered < 0 else (steered,):
                    self.links[worker].inbound.append(frame)
                    self.received[worker] += 1
            pending = any(lib.mts_cmd_pending(self.g, worker, runtime.sockets.cmd_position)
                          for worker, runtime in enumerate(self.runtimes))
            if not out and not back and not pending:
                return

    # -- the program's side, as the interposer plays it -------------------

    def sync(self, worker, op, slot, arg=0):
        s = lib.mts_slot_at(self.g, slot)
        s.op_done = 0
        assert lib.mts_cmd_push(self.g, worker, op, slot, s.generation, arg) == 0
        self.settle()
        assert s.op_done == 1
        return s.op_result

    def command(self, op, slot, arg=0):
        s = lib.mts_slot_at(self.g, slot)
        assert lib.mts_cmd_push(self.g, lib.mts_slot_worker(self.g, slot), op, slot, s.generation, arg) == 0

    def new_socket(self, worker):
        slot = lib.mts_slot_alloc(self.g, worker, ffi.NULL)
        lib.mts_slot_at(self.g, slot).refcnt = 1
        return slot

    def listen(self, worker, port=PORT):
        """bind and listen as shim_socket.c does: the owner, then every other worker."""
        slot = self.new_socket(worker)
        assert self.sync(worker, lib.MTS_OP_BIND, slot, addr(0, port)) == 0
        for other in [worker] + [w for w in range(WORKERS) if w != worker]:
            assert self.sync(other, lib.MTS_OP_LISTEN, slot, 16) == 0
        return slot

    def write(self, slot, data):
        s = lib.mts_slot_at(self.g, slot)
        lib.mts_ring_write(ffi.addressof(s.tx), lib.mts_tx_data(self.g, slot), self.g.tx_size, data, len(data))
        if not s.tx_pending:
            s.tx_pending = 1
            self.command(lib.MTS_OP_TX, slot)

    def read(self, slot):
        s = lib.mts_slot_at(self.g, slot)
        buf = ffi.new("uint8_t[]", RING)
        got = lib.mts_ring_read(ffi.addressof(s.rx), lib.mts_rx_data(self.g, slot), self.g.rx_size, buf, RING)
        return ffi.buffer(buf, got)[:]


@pytest.fixture
def workers():
    w = Workers()
    yield w
    w.close()


def peer_connects_from(workers, local_port):
    buffers = RingBuffer(RING), RingBuffer(RING)
    conn = workers.peer.host.connect(local_port, STACK_IP, PORT, *buffers, None, workers.now)
    workers.settle()
    return conn, buffers


def test_a_listener_is_every_workers_and_each_connection_belongs_to_the_worker_its_syn_reached(workers):
    listener = workers.listen(worker=0)
    sibling = lib.mts_slot_at(workers.g, listener).siblings[1] - 1
    assert lib.mts_slot_worker(workers.g, sibling) == 1
    assert lib.mts_slot_at(workers.g, sibling).state == lib.MTS_ST_LISTENING

    peer_ports = range(40000, 40008)
    conns = [peer_connects_from(workers, port)[0] for port in peer_ports]
    assert all(conn.state.name == "ESTABLISHED" for conn in conns)
    assert lib.mts_accept_pending(workers.g, listener) == len(peer_ports)

    accepted = []
    while (child := lib.mts_accept_pop(workers.g, listener, 1)) >= 0:
        accepted.append(child)
    assert len(accepted) == len(peer_ports)
    for child in accepted:
        s = lib.mts_slot_at(workers.g, child)
        owner = lib.mts_slot_worker(workers.g, child)
        assert owner == worker_of_ports(s.remote_port, PORT, WORKERS)
        # The flow lives in its worker's host alone.
        key = (PORT, PEER_IP, s.remote_port)
        assert [key in runtime.host.connections for runtime in workers.runtimes] == [w == owner for w in range(WORKERS)]
    assert {lib.mts_slot_worker(workers.g, child) for child in accepted} == {0, 1}
    assert all(workers.received)


def test_connections_on_both_workers_carry_bytes_both_ways(workers):
    listener = workers.listen(worker=1)
    peers = {port: peer_connects_from(workers, port) for port in (40000, 40001, 40002, 40003)}
    children = []
    while (child := lib.mts_accept_pop(workers.g, listener, 0)) >= 0:
        lib.mts_slot_at(workers.g, child).refcnt = 1
        children.append(child)
    for child in children:
        port = lib.mts_slot_at(workers.g, child).remote_port
        workers.write(child, b"to %d" % port)
        conn, (tx, rx) = peers[port]
        tx.write(b"from %d" % port)
        conn.send_ready(workers.now)
        workers.peer.host.collect(conn, workers.now)
    workers.settle()
    for child in children:
        port = lib.mts_slot_at(workers.g, child).remote_port
        _, (tx, rx) = peers[port]
        assert workers.read(child) == b"from %d" % port
        assert bytes(rx.read(100)) == b"to %d" % port


def test_closing_the_listener_closes_its_siblings_and_resets_what_they_queued(workers):
    listener = workers.listen(worker=0)
    sibling = lib.mts_slot_at(workers.g, listener).siblings[1] - 1
    port_on_1 = next(p for p in range(40000, 40100) if worker_of_ports(p, PORT, WORKERS) == 1)
    conn, _ = peer_connects_from(workers, port_on_1)
    assert conn.state.name == "ESTABLISHED"

    lib.mts_slot_at(workers.g, listener).refcnt = 0
    workers.command(lib.MTS_OP_CLOSE, listener)          # the program's last close, to the owner
    workers.settle()
    assert lib.mts_slot_at(workers.g, sibling).in_use == lib.MTS_SLOT_FREE
    assert conn.state.name == "CLOSED"                   # the unaccepted connection was reset
    assert not workers.runtimes[1].host.listeners


def test_an_active_open_takes_a_port_that_steers_its_replies_to_its_own_worker(workers):
    server = RingBuffer(RING), RingBuffer(RING)
    workers.peer.host.listen(9000, 8, lambda ip, port: (*server, None))
    for worker in range(WORKERS):
        slot = workers.new_socket(worker)
        assert workers.sync(worker, lib.MTS_OP_CONNECT, slot, addr(PEER_IP, 9000)) == 0
        workers.settle()
        s = lib.mts_slot_at(workers.g, slot)
        assert worker_of_ports(s.local_port, 9000, WORKERS) == worker
        assert s.events & lib.MTS_EV_CONNECTED


def test_a_waiter_is_registered_with_every_worker_and_freed_by_the_last(workers):
    waiter_id = lib.mts_waiter_alloc(workers.g, os.getpid())
    waiter_fd = os.eventfd(0, os.EFD_NONBLOCK)
    msg = ffi.new("struct mts_ctl_msg *", {"op": lib.MTS_CTL_REGISTER_WAITER, "id": waiter_id})
    for worker, ctl_app in enumerate(workers.ctl_apps):
        socket.send_fds(ctl_app, [ffi.buffer(msg)[:]], [waiter_fd])
        lib.mts_ctl_post(workers.g, worker)
    os.close(waiter_fd)
    workers.settle()
    waiter = lib.mts_waiter_at(workers.g, waiter_id)
    assert waiter.registered == 0b11

    assert lib.mts_cmd_push(workers.g, 0, lib.MTS_OP_WAITER_FREE, waiter_id, 0, 0) == 0
    workers.runtimes[0].step(workers.now)
    assert waiter.in_use == 1 and waiter.registered == 0b10   # worker 1 still holds its copy
    assert lib.mts_cmd_push(workers.g, 1, lib.MTS_OP_WAITER_FREE, waiter_id, 0, 0) == 0
    workers.runtimes[1].step(workers.now)
    assert waiter.in_use == 0


def test_a_worker_refuses_commands_for_another_workers_slots_but_a_listeners(workers):
    slot = workers.new_socket(0)
    s = lib.mts_slot_at(workers.g, slot)
    assert lib.mts_cmd_push(workers.g, 1, lib.MTS_OP_BIND, slot, s.generation, addr(0, 7000)) == 0
    workers.settle()
    assert workers.runtimes[1].shm_counters["cmd_bad"] == 1
    assert s.op_done == 0 and 7000 not in workers.runtimes[1].host.bound_ports
