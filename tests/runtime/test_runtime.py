"""The stack runtime's loop, commands and readiness, step by step (world.py
has the harness)."""
import errno
import os
import socket

import pytest

from mtcpshim._shm import ffi, lib
from mtcpshim.runtime import Runtime
from mtcpshim.stack.tcp import TcpConnection
from mtcpshim.stack.storage import RingBuffer
from mtcpshim.stack.wire.ethernet import EthernetHeader
from mtcpshim.stack.wire.ipv4 import Ipv4Header
from mtcpshim.stack.wire.tcp import ACK, FIN, PSH, TcpSegment
from world import PEER_IP, RING, STACK_IP, addr, listening_socket, peer_connects

def test_passive_open_data_both_ways_and_close_frees_the_slot(world):
    listener = listening_socket(world)
    conn, (peer_tx, peer_rx) = peer_connects(world)
    assert conn.state.name == "ESTABLISHED"

    child = lib.mts_accept_pop(world.g, listener, 0)
    assert child >= 0
    child_slot = lib.mts_slot_at(world.g, child)
    assert child_slot.state == lib.MTS_ST_CONNECTED
    assert (child_slot.remote_ip, child_slot.remote_port) == (PEER_IP, conn.local_port)
    assert lib.mts_slot_poll(world.g, listener) == 0  # queue drained

    request = b"GET / HTTP/1.1\r\n\r\n"
    peer_tx.write(request)
    conn.send_ready(world.now)
    world.peer.host.collect(conn, world.now)
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
        world.peer.host.collect(conn, world.now)
        if received == response:
            break
    assert received == response

    lib.mts_slot_at(world.g, child).refcnt = 0
    world.command(lib.MTS_OP_CLOSE, child)
    world.settle()
    assert conn.state.name == "CLOSE_WAIT"
    conn.close(world.now)
    world.peer.host.collect(conn, world.now)
    world.settle()
    assert lib.mts_slot_at(world.g, child).in_use == lib.MTS_SLOT_FREE
    # The slot carried a transfer: its ring pages went back to the kernel.
    assert world.runtime.stats()["runtime"]["rings_released"] == 1
    assert not any(bytes(ffi.buffer(lib.mts_tx_data(world.g, child), world.g.tx_size)))
    assert not any(bytes(ffi.buffer(lib.mts_rx_data(world.g, child), world.g.rx_size)))


def _tcp_segments(frames):
    segments = []
    for frame in frames:
        _, packet = EthernetHeader.parse(bytes(frame))
        ip, payload = Ipv4Header.parse(packet)
        segments.append(TcpSegment.parse(payload, ip.src, ip.dst))
    return segments


def test_a_write_then_shutdown_in_one_batch_leaves_as_one_segment_with_data_and_fin(world):
    listener = listening_socket(world)
    conn, (peer_tx, peer_rx) = peer_connects(world)
    child = lib.mts_accept_pop(world.g, listener, 0)
    response = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 64

    # What lighttpd does with `Connection: close`: write, shutdown, close,
    # all before the stack's next pass.
    world.write(child, response)
    world.command(lib.MTS_OP_SHUTDOWN, child, socket.SHUT_WR)
    world.now += 0.001
    world.runtime.step(world.now)

    [segment] = _tcp_segments(world.take_wire_frames())
    assert segment.flags == ACK | PSH | FIN
    assert bytes(segment.payload) == response


def test_stat_counts_sockets_by_holder_and_state(world):
    listener = listening_socket(world)
    peer_connects(world)
    child = lib.mts_accept_pop(world.g, listener, 0)
    assert world.runtime.stats()["sockets"] == {"program: LISTEN": 1, "program: ESTABLISHED": 1}

    lib.mts_slot_at(world.g, child).refcnt = 0
    world.command(lib.MTS_OP_CLOSE, child)
    world.now += 0.001
    world.runtime.step(world.now)                 # our FIN is out, not yet acknowledged
    assert world.runtime.stats()["sockets"] == {"program: LISTEN": 1, "stack: FIN_WAIT_1": 1}
    world.settle()                                # acknowledged: the slot is free
    assert world.runtime.stats()["sockets"] == {"program: LISTEN": 1}


def test_a_closed_socket_is_freed_when_the_fins_cross(world):
    # wrk ends a run by closing connections whose answer (data and FIN) is
    # on its way: both FINs cross, we go CLOSING, then TIME_WAIT when ours
    # is acknowledged.  That step frees the slot, though it frees no data.
    listener = listening_socket(world)
    conn, _ = peer_connects(world)
    child = lib.mts_accept_pop(world.g, listener, 0)
    lib.mts_slot_at(world.g, child).refcnt = 0
    world.command(lib.MTS_OP_CLOSE, child)
    world.now += 0.001
    world.runtime.step(world.now)
    our_fin = world.take_wire_frames()                # on its way, not there yet
    conn.close(world.now)                             # the peer closes meanwhile
    world.peer.host.collect(conn, world.now)
    world.link.inbound.extend(world.peer.egress(world.now))
    world.now += 0.001
    world.runtime.step(world.now)                     # their FIN: CLOSING
    assert world.runtime.stats()["sockets"] == {"program: LISTEN": 1, "stack: CLOSING": 1}
    world.peer.ingest(our_fin, world.now)             # ours arrives; they acknowledge it
    world.settle()
    assert world.runtime.stats()["connections"] == {"TIME_WAIT": 1}
    assert world.runtime.stats()["sockets"] == {"program: LISTEN": 1}
    assert lib.mts_slot_at(world.g, child).in_use == lib.MTS_SLOT_FREE


def test_a_fault_while_sending_what_was_written_resets_that_socket_only(world, monkeypatch):
    listener = listening_socket(world)
    peer_connects(world)
    child = lib.mts_accept_pop(world.g, listener, 0)
    conn = world.runtime.sockets[child].conn

    send_ready = TcpConnection.send_ready

    def broken_for_this_one(self, now):
        if self is conn:
            raise AssertionError("a bug reached through the send ring")
        send_ready(self, now)
    monkeypatch.setattr(TcpConnection, "send_ready", broken_for_this_one)
    world.write(child, b"x" * 100)
    world.settle()
    assert world.runtime.stats()["shm"]["handler_faults"] == 1
    assert lib.mts_slot_at(world.g, child).state == lib.MTS_ST_CLOSED   # reset, not the stack
    assert lib.mts_slot_at(world.g, listener).state == lib.MTS_ST_LISTENING


def test_active_open_refused_publishes_econnrefused(world):
    slot = world.new_socket()
    assert world.sync(lib.MTS_OP_CONNECT, slot, addr(PEER_IP, 9)) == 0
    s = lib.mts_slot_at(world.g, slot)
    assert s.state == lib.MTS_ST_CLOSED
    assert s.so_error == errno.ECONNREFUSED
    assert s.events & lib.MTS_EV_HUP


def test_active_open_to_peer_listener_then_peer_reset(world):
    accepted = []
    world.peer.host.listen(80, 8, lambda ip, port: (RingBuffer(RING), RingBuffer(RING), accepted))
    slot = world.new_socket()
    assert world.sync(lib.MTS_OP_CONNECT, slot, addr(PEER_IP, 80)) == 0
    world.settle()
    s = lib.mts_slot_at(world.g, slot)
    assert s.state == lib.MTS_ST_CONNECTED and s.events & lib.MTS_EV_CONNECTED
    assert s.local_ip == STACK_IP and s.local_port != 0

    peer_conn = next(iter(world.peer.host.connections.values()))
    peer_conn.abort(world.now)
    world.peer.host.collect(peer_conn, world.now)
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


def registered_waiter(world):
    waiter_id = lib.mts_waiter_alloc(world.g, os.getpid())
    waiter_fd = os.eventfd(0, os.EFD_NONBLOCK)
    msg = ffi.new("struct mts_ctl_msg *", {"op": lib.MTS_CTL_REGISTER_WAITER, "id": waiter_id})
    socket.send_fds(world.ctl_app, [ffi.buffer(msg)[:]], [waiter_fd])
    lib.mts_ctl_post(world.g, 0)                      # as the interposer does
    world.settle()
    waiter = lib.mts_waiter_at(world.g, waiter_id)
    assert waiter.registered == 1
    return waiter_id, waiter, waiter_fd


def test_armed_waiter_is_woken_once_by_new_readiness(world):
    listener = listening_socket(world)
    waiter_id, waiter, waiter_fd = registered_waiter(world)
    lib.mts_slot_interest_add(world.g, listener, waiter_id)   # it will wait for the listener
    waiter.armed = 1
    peer_connects(world)
    assert os.eventfd_read(waiter_fd) == 1
    assert waiter.armed == 0
    assert lib.mts_accept_pending(world.g, listener) == 1


def test_a_change_wakes_only_the_waiters_that_wait_for_its_socket(world):
    """Two processes of a server, each asleep on its own socket: a SYN for
    one listener wakes its waiter, not the other's (it stays armed)."""
    first, second = listening_socket(world, port=8080), listening_socket(world, port=8081)
    (first_id, first_waiter, first_fd), (second_id, second_waiter, second_fd) = \
        registered_waiter(world), registered_waiter(world)
    lib.mts_slot_interest_add(world.g, first, first_id)
    lib.mts_slot_interest_add(world.g, second, second_id)
    first_waiter.armed = second_waiter.armed = 1
    peer_connects(world, port=8081)
    assert os.eventfd_read(second_fd) == 1 and second_waiter.armed == 0
    assert first_waiter.armed == 1
    with pytest.raises(BlockingIOError):
        os.eventfd_read(first_fd)


def test_a_registration_the_interposer_did_not_count_is_taken_at_housekeeping(world):
    """The busy loop reads the control socket only when the region's count
    of posted messages moves; what came without it still gets read."""
    world.settle()
    waiter_id = lib.mts_waiter_alloc(world.g, os.getpid())
    waiter_fd = os.eventfd(0, os.EFD_NONBLOCK)
    msg = ffi.new("struct mts_ctl_msg *", {"op": lib.MTS_CTL_REGISTER_WAITER, "id": waiter_id})
    socket.send_fds(world.ctl_app, [ffi.buffer(msg)[:]], [waiter_fd])
    waiter = lib.mts_waiter_at(world.g, waiter_id)
    world.runtime.step(world.now)
    assert waiter.registered == 0
    world.now += Runtime.HOUSEKEEPING_INTERVAL
    world.runtime.step(world.now)          # housekeeping: look at the socket next time
    world.runtime.step(world.now)
    assert waiter.registered == 1


def test_accepted_socket_is_published_established_before_it_is_queued(world, monkeypatch):
    """Another process may accept the instant the child is queued: the child's
    state must already read as connected then (a FRESH state read as EOF)."""
    import mtcpshim.sockets as sockets_module

    states_when_queued = []

    class RecordingLib:
        def __getattr__(self, name):
            return getattr(lib, name)

        def mts_accept_put(self, geom, listener, pos, child):
            states_when_queued.append(lib.mts_slot_at(geom, child).state)
            return lib.mts_accept_put(geom, listener, pos, child)

    monkeypatch.setattr(sockets_module, "lib", RecordingLib())
    listening_socket(world)
    peer_connects(world)
    assert states_when_queued == [lib.MTS_ST_CONNECTED]


def test_socket_options_reach_the_connection(world):
    world.peer.host.listen(80, 8, lambda ip, port: (RingBuffer(RING), RingBuffer(RING), None))
    slot = world.new_socket()
    s = lib.mts_slot_at(world.g, slot)
    s.opt_nodelay, s.opt_user_timeout_ms = 1, 2500
    s.opt_congestion = b"reno"
    assert world.sync(lib.MTS_OP_CONNECT, slot, addr(PEER_IP, 80)) == 0
    conn = world.runtime.sockets[slot].conn
    assert (conn.nodelay, conn.user_timeout, conn.congestion) == (True, 2.5, "reno")


def test_so_rcvbuf_set_before_listen_bounds_what_an_accepted_connection_takes(world):
    """As on Linux: the listener's SO_RCVBUF (the slot holds twice the
    request) passes to the connections it accepts; their window scale and
    window follow it, and the ring holds no more than the request."""
    listener = world.new_socket()
    lib.mts_slot_at(world.g, listener).opt_rcvbuf = 2 * 16384
    assert world.sync(lib.MTS_OP_BIND, listener, addr(0, 8080)) == 0
    assert world.sync(lib.MTS_OP_LISTEN, listener, 16) == 0
    conn, (peer_tx, _) = peer_connects(world)
    assert (conn.state.name, conn.snd_wscale, conn.snd_wnd) == ("ESTABLISHED", 0, 16384)
    child = lib.mts_accept_pop(world.g, listener, 0)

    peer_tx.write(bytes(100_000))
    conn.send_ready(world.now)
    world.peer.host.collect(conn, world.now)
    world.settle(rounds=200)
    # Full segments only fit, so up to one MSS short of the request.
    assert 16384 - conn.send_mss < len(world.read(child)) <= 16384
    world.settle(rounds=200)
    assert 16384 - conn.send_mss < len(world.read(child)) <= 16384   # the read reopened it


def test_truncated_frames_are_reported_once(world, capsys):
    world.link.counters = lambda: {"rx_truncated": 3}
    for _ in range(3):
        world.now += world.runtime.HOUSEKEEPING_INTERVAL
        world.runtime.step(world.now)
    assert capsys.readouterr().err.count("rx_truncated") == 1


def test_the_region_lists_the_tcp_core_s_congestion_controls_for_the_interposer(world):
    from mtcpshim.stack import cc
    from mtcpshim.stack.tcp import TcpConfig
    names = ffi.string(world.region.header.congestion).decode().split()
    assert names[0] == TcpConfig.congestion and sorted(names) == sorted(cc.ALGORITHMS)


def test_a_lost_segment_shows_in_the_loss_recovery_counters(world):
    listening_socket(world)
    conn, (_, peer_rx) = peer_connects(world)
    child = lib.mts_accept_pop(world.g, 0, 0)
    assert world.runtime.stats()["tcp_recovery"] == {}
    link_send, lost = world.link.send_batch, []

    def lose_the_first_data_frame(frames):
        frames = [bytes(f) for f in frames]
        if not lost:
            lost.extend(f for f in frames if len(f) > 100)
            frames = [f for f in frames if len(f) <= 100]
        return link_send(frames)

    world.link.send_batch = lose_the_first_data_frame
    data = os.urandom(1000)
    world.write(child, data)
    for _ in range(100):                       # until the timer resends it
        world.settle()
        if len(peer_rx):
            break
        world.now += 0.01
    assert len(lost) == 1 and peer_rx.read(len(peer_rx)) == data
    # A lone segment gets no probe (the peer may be delaying its ACK): the
    # timeout resends it.
    assert world.runtime.stats()["tcp_recovery"] == {"timeouts": 1, "retransmitted_segments": 1}


def test_stat_reports_the_stack_s_cpu_per_packet_per_command_and_per_loop(world):
    listening_socket(world)
    peer_connects(world)
    world.write(lib.mts_accept_pop(world.g, 0, 0), b"x" * 100)
    world.settle()
    cost = world.runtime.stats()["cost"]
    assert cost["cpu_ms"] >= 0
    assert {"cpu_ns_per_packet", "cpu_ns_per_command", "cpu_ns_per_loop"} <= cost.keys()
    assert all(cost[name] > 0 for name in ("cpu_ns_per_packet", "cpu_ns_per_command", "cpu_ns_per_loop"))
    assert {"wakeups_per_1000_packets", "sleeps_per_1000_packets", "syscalls_per_1000_packets"} <= cost.keys()


def test_stat_reports_the_share_of_received_frames_the_fast_path_took(world):
    listener = listening_socket(world)
    conn, (peer_tx, _) = peer_connects(world)
    child = lib.mts_accept_pop(world.g, listener, 0)
    before = world.runtime.stats()["tcp"].get("tcp_fast_path", 0)
    peer_tx.write(b"GET / HTTP/1.1\r\n\r\n")
    conn.send_ready(world.now)
    world.peer.host.collect(conn, world.now)
    world.settle()
    assert world.read(child) == b"GET / HTTP/1.1\r\n\r\n"
    stats = world.runtime.stats()
    assert stats["tcp"]["tcp_fast_path"] == before + 1     # the request went through header prediction
    assert 0 < stats["cost"]["fast_path_hit_percent"] < 100  # the handshake did not
