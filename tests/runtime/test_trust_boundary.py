"""The shared region is a trust boundary: each test is the program writing
something impossible into it (issue 8's table, row by row), then what the
stack must do: stay up, touch nothing outside the region, reset and count
the socket concerned, and go on serving everyone else."""
import errno
import os
import random
import socket

from mtcpshim._shm import ffi, lib
from mtcpshim.shmbuf import DETACHED
from mtcpshim.stack.storage import RingBuffer
from world import RING, STACK_IP, hostile_storm, listening_socket, peer_connects

U32_MAX = (1 << 32) - 1


def header_field(world, name):
    """The address of a header word, as the program sees it: raw memory."""
    return ffi.addressof(world.region.header[0], name)


def counted(world, name):
    return world.runtime.stats()["shm"].get(name, 0)


def still_serves(world, port=9090):
    """A new connection completes and carries data both ways."""
    listener = listening_socket(world, port)
    conn, (peer_tx, peer_rx) = peer_connects(world, port)
    assert conn.state.name == "ESTABLISHED"
    child = lib.mts_accept_pop(world.g, listener, 0)
    assert child >= 0
    exchanges_both_ways(world, child, conn, peer_tx, peer_rx)


def exchanges_both_ways(world, child, conn, peer_tx, peer_rx):
    """The peer's bytes reach the program's socket, and its bytes the peer."""
    peer_tx.write(b"ping")
    conn.send_ready(world.now)
    world.peer.host.collect(conn, world.now)
    world.settle()
    assert world.read(child) == b"ping"
    world.write(child, b"pong")
    world.settle()
    assert peer_rx.read(4) == b"pong"


def accepted_connection(world, listener, port=8080):
    conn, buffers = peer_connects(world, port)
    child = lib.mts_accept_pop(world.g, listener, 0)
    assert child >= 0
    lib.mts_slot_at(world.g, child).refcnt = 1
    return child, conn, buffers


def test_a_command_for_a_slot_past_the_real_ones_is_refused_whatever_nslots_says(world):
    ffi.cast("uint32_t *", header_field(world, "nslots"))[0] = U32_MAX
    world.command(lib.MTS_OP_LISTEN, 0x7FFFFFF0, 16)
    world.command(lib.MTS_OP_CLOSE, world.g.nslots)
    world.settle()
    assert counted(world, "cmd_bad") == 2
    still_serves(world)


def test_the_command_queue_is_read_at_the_stacks_own_position(world):
    ffi.cast("uint32_t *", header_field(world, "cmd_capacity"))[0] = U32_MAX
    cmdq = ffi.cast("char *", world.region.header) + world.g.cmdq_off
    ffi.cast("uint64_t *", cmdq + 64)[0] = 1 << 62  # where the dequeue position once was
    still_serves(world)


def test_a_moved_accept_queue_resets_the_listener_and_no_other(world):
    listener = listening_socket(world)
    ffi.cast("uint32_t *", header_field(world, "rx_size"))[0] = 1 << 31
    rx = lib.mts_slot_at(world.g, listener).rx
    rx.head, rx.tail = 1 << 40, (1 << 40) + 12345  # tail ahead of head
    conn, _ = peer_connects(world)
    assert counted(world, "sockets_reset") == 1
    slot = lib.mts_slot_at(world.g, listener)
    assert (slot.state, slot.so_error) == (lib.MTS_ST_CLOSED, errno.ECONNRESET)
    assert conn.state.name in ("CLOSED", "SYN_SENT")  # reset, or never answered again
    still_serves(world)


def test_a_waiter_id_past_the_real_waiters_is_refused_whatever_nwaiters_says(world):
    ffi.cast("uint32_t *", header_field(world, "nwaiters"))[0] = U32_MAX
    ffi.cast("uint64_t *", header_field(world, "waiters_off"))[0] = 1 << 40
    efd = os.eventfd(0)
    msg = ffi.new("struct mts_ctl_msg *", {"op": lib.MTS_CTL_REGISTER_WAITER, "id": 0x10000000})
    socket.send_fds(world.ctl_app, [ffi.buffer(msg)[:]], [efd])
    lib.mts_ctl_post(world.g, 0)                      # as the interposer does
    os.close(efd)
    world.settle()
    assert counted(world, "ctl_bad") == 1
    assert len(world.runtime.waiters) == 0
    still_serves(world)


def register_process(world, table_fd, pidfd, words=1024):
    msg = ffi.new("struct mts_ctl_msg *", {"op": lib.MTS_CTL_REGISTER_PROCESS, "id": os.getpid(), "arg": words})
    socket.send_fds(world.ctl_app, [ffi.buffer(msg)[:]], [table_fd, pidfd])
    lib.mts_ctl_post(world.g, 0)
    world.settle()


def test_a_process_registration_must_be_a_memfd_and_a_pidfd(world):
    """Anything else is refused and counted: a pipe as the table (its reads
    could block the stack), an eventfd as the pidfd, a table past the
    largest one, all handed back closed."""
    pidfd = os.pidfd_open(os.getpid())
    memfd = os.memfd_create("table")
    read_end, write_end = os.pipe()
    efd = os.eventfd(0)
    register_process(world, read_end, pidfd)
    register_process(world, memfd, efd)
    register_process(world, memfd, pidfd, words=lib.MTS_FD_TABLE_MAX + 1)
    assert counted(world, "ctl_bad") == 3
    assert len(world.runtime.processes) == 0
    register_process(world, memfd, pidfd)
    assert world.runtime.processes.holdings() == {os.getpid(): []}
    for fd in (pidfd, memfd, read_end, write_end, efd):
        os.close(fd)
    still_serves(world)


def test_a_dead_process_s_table_full_of_lies_takes_no_reference_it_did_not_name(world):
    """The table says what it likes: words naming slots past the region,
    slots with another generation, kinds that are no stack socket.  Only
    the one true word (this socket, its generation) lets go of a
    reference."""
    slot = world.new_socket()
    generation = lib.mts_slot_at(world.g, slot).generation
    lib.mts_slot_at(world.g, slot).refcnt = 2                     # this process and the one that dies
    stack_word = lambda slot_id, gen: gen << 32 | lib.MTS_FD_STACK << lib.MTS_FD_KIND_SHIFT | slot_id  # noqa: E731
    words = [stack_word(slot, generation), stack_word(slot, generation + 1), stack_word(0xFFFFFF, generation),
             stack_word(world.g.nslots, 0), 1 << lib.MTS_FD_KIND_SHIFT | slot, U32_MAX << 32 | U32_MAX]
    memfd = os.memfd_create("table")
    os.write(memfd, b"".join(w.to_bytes(8, "little") for w in words))
    ours = os.pidfd_open(os.getpid())
    register_process(world, memfd, ours, words=len(words))
    os.close(ours)
    assert world.runtime.processes.holdings() == {os.getpid(): [slot]}   # who holds what, for stat
    child = os.fork()
    if child == 0:
        os._exit(0)
    pidfd = os.pidfd_open(child)
    register_process(world, memfd, pidfd, words=len(words) + 100)   # longer than the file: read short
    os.waitpid(child, 0)
    os.close(memfd)
    os.close(pidfd)
    world.settle(advance=0.2)                                      # housekeeping looks
    assert world.runtime.processes.ended == 1
    assert lib.mts_slot_at(world.g, slot).refcnt == 1
    still_serves(world)


def test_a_moved_data_offset_does_not_move_a_send_buffer(world):
    ffi.cast("uint64_t *", header_field(world, "data_off"))[0] = 1 << 44
    listener = listening_socket(world)
    child, conn, (_, peer_rx) = accepted_connection(world, listener)
    payload = os.urandom(4096)
    assert world.write(child, payload) == len(payload)  # the program's side: the real ring
    world.settle()
    assert peer_rx.read(len(peer_rx)) == payload      # exactly what the program queued


def test_made_up_accept_queue_entries_are_never_taken_for_connections(world):
    listener = listening_socket(world)
    bystander = world.new_socket()
    conn, _ = peer_connects(world)
    queue = ffi.cast("uint32_t *", lib.mts_rx_data(world.g, listener))
    queue[0] = bystander                          # over the real entry
    queue[1] = 12345                              # past the stack's head
    lib.mts_slot_at(world.g, listener).rx.head = 2
    world.command(lib.MTS_OP_CLOSE, listener)
    world.settle()
    assert counted(world, "accept_entry_bad") == 1
    assert lib.mts_slot_at(world.g, bystander).in_use == lib.MTS_SLOT_USED
    assert conn.state.name == "CLOSED"            # the real one, never accepted, was reset
    still_serves(world)


def test_a_receive_tail_past_its_head_resets_that_connection_only(world):
    listener = listening_socket(world)
    victim, victim_conn, (victim_tx, _) = accepted_connection(world, listener)
    other, other_conn, (other_tx, _) = accepted_connection(world, listener)
    rx = lib.mts_slot_at(world.g, victim).rx
    rx.tail = rx.head + 10 * 1024 * 1024
    fast_before = world.runtime.stats()["tcp"].get("tcp_fast_path", 0)
    for conn, tx in ((victim_conn, victim_tx), (other_conn, other_tx)):
        tx.write(b"more data")
        conn.send_ready(world.now)
        world.peer.host.collect(conn, world.now)
    world.settle()
    # The fast path took the other's segment and left the victim's, whose
    # ring it found impossible, to the core, which reports it.
    assert world.runtime.stats()["tcp"]["tcp_fast_path"] == fast_before + 1
    assert counted(world, "sockets_reset") == 1
    victim_slot = lib.mts_slot_at(world.g, victim)
    assert victim_slot.so_error == errno.ECONNRESET and victim_slot.events & lib.MTS_EV_HUP
    assert victim_conn.state.name == "CLOSED"  # our RST reached the peer
    assert world.read(other) == b"more data"
    world.command(lib.MTS_OP_CLOSE, victim)
    world.settle()
    assert victim not in world.runtime.sockets


def test_a_live_slot_marked_free_is_never_handed_out_twice(world):
    listener = listening_socket(world)
    first, first_conn, (first_tx, _) = accepted_connection(world, listener)
    lib.mts_slot_at(world.g, first).in_use = lib.MTS_SLOT_FREE
    lib.mts_worker_at(world.g, 0).slot_hint = first  # the next search starts right there
    second, _, _ = accepted_connection(world, listener)
    assert second != first
    first_tx.write(b"x")
    first_conn.send_ready(world.now)
    world.peer.host.collect(first_conn, world.now)
    world.settle()
    assert counted(world, "sockets_reset") == 1
    assert lib.mts_slot_at(world.g, first).in_use == lib.MTS_SLOT_USED  # the stack took it back


def test_a_command_queued_for_a_slots_earlier_holder_never_reaches_the_next(world):
    """A command that sat in the queue while its slot was freed and handed
    to a new connection carries the old generation: dropped and counted,
    the new connection untouched (the hostile-region fuzzer's forged CLOSE
    once cut an honest download short this way)."""
    listener = listening_socket(world)
    first, _, _ = accepted_connection(world, listener)
    old_generation = lib.mts_slot_at(world.g, first).generation
    world.command(lib.MTS_OP_CLOSE, first, 1)            # aborted: the slot is free at once
    world.settle()
    assert lib.mts_slot_at(world.g, first).in_use == lib.MTS_SLOT_FREE
    lib.mts_worker_at(world.g, 0).slot_hint = first               # the next connection takes it
    second, conn, (peer_tx, peer_rx) = accepted_connection(world, listener)
    assert second == first
    assert lib.mts_cmd_push(world.g, 0, lib.MTS_OP_CLOSE, first, old_generation, 1) == 0
    world.settle()
    assert counted(world, "cmd_stale") == 1
    exchanges_both_ways(world, second, conn, peer_tx, peer_rx)
    assert conn.state.name == "ESTABLISHED"


def test_a_slot_the_program_allocates_again_under_a_live_connection_is_the_new_sockets(world):
    """The program marks a connection's slot free and allocates it for a
    new socket before the stack notices: the new socket's first command
    resets the old connection, which lets the slot go untouched, and the
    new socket works (the hostile-region fuzzer's check listener once
    waited forever on such a slot, freed under it by the old socket)."""
    listener = listening_socket(world)
    first, conn, _ = accepted_connection(world, listener)
    lib.mts_slot_at(world.g, first).in_use = lib.MTS_SLOT_FREE
    lib.mts_worker_at(world.g, 0).slot_hint = first
    assert listening_socket(world, port=9191) == first
    assert counted(world, "sockets_reset") == 1
    assert conn.state.name == "CLOSED"                    # the peer was reset
    assert lib.mts_slot_at(world.g, first).in_use == lib.MTS_SLOT_USED
    peer_connects(world, port=9191)
    assert lib.mts_accept_pop(world.g, first, 0) >= 0


def test_random_writes_anywhere_in_the_region_never_escape_the_runtime(world):
    """A seeded storm of hostile words over the whole region with
    well-formed commands mixed in (world.hostile_storm): every step of the
    loop returns, and the stack refused or reset something."""
    counters = hostile_storm(world, random.Random(8), writes=4000)
    assert counters["cmd_bad"] and counters["sockets_reset"]


def test_closing_a_listener_mid_handshake_leaves_its_freed_slot_alone(world):
    """Not an attack (the hostile-region fuzzer found it): the listener goes
    while a handshake is half done; the late ACK and data must not land in
    the slot the half-open connection had."""
    listener = listening_socket(world)
    peer_connects(world)                                 # both sides know each other's MAC now
    before = set(world.runtime.sockets)
    conn = world.peer.host.connect_ephemeral(world.runtime.host.ip, 8080, RingBuffer(1 << 16),
                                             RingBuffer(1 << 16), None, world.now)
    world.link.inbound.extend(world.peer.egress(world.now))
    world.runtime.step(world.now)                        # SYN in, SYN-ACK out (held back)
    syn_ack, world.link.outbound = world.link.outbound, []
    (child,) = set(world.runtime.sockets) - before
    world.command(lib.MTS_OP_CLOSE, listener)
    world.settle()
    assert lib.mts_slot_at(world.g, child).in_use == lib.MTS_SLOT_FREE
    conn.send_buf.write(b"late data")
    world.peer.ingest(syn_ack, world.now)              # the peer completes, sends ACK and data
    world.link.inbound.extend(world.peer.egress(world.now))
    world.settle()
    assert lib.mts_slot_at(world.g, child).rx.head == 0  # nothing written into the freed slot
    assert conn.state.name == "CLOSED"                   # reset: nobody listens any more


def test_a_listener_reset_in_the_loop_that_took_a_syn_takes_the_new_connection_with_it(world):
    """The connection a SYN made meets its socket only when the loop
    publishes; a listener reset for corruption before that (its accept
    queue found impossible in the same loop) must still end it.  Left
    alive, it kept views of a slot freed under it, and once that slot was
    an honest connection's it read and wrote that connection's rings."""
    listener = listening_socket(world)
    peer_connects(world)                                 # both sides know each other's MAC now
    runtime, sockets = world.runtime, world.runtime.sockets
    before = set(sockets)
    world.peer.host.connect_ephemeral(runtime.host.ip, 8080, RingBuffer(1 << 16), RingBuffer(1 << 16),
                                      None, world.now)
    world.link.inbound.extend(world.peer.egress(world.now))
    runtime._receive(world.now)                          # the SYN: a child and its connection, not met yet
    (child,) = set(sockets) - before
    (conn,) = [c for c in runtime.host.connections.values() if c.owner is sockets[child]]
    sockets._corrupted(sockets[listener], "found impossible in this loop")
    runtime._output(world.now)                           # the reset, then the publish
    assert conn.state.name == "CLOSED" and conn.send_buf is DETACHED and conn.recv_buf is DETACHED
    assert lib.mts_slot_at(world.g, child).in_use == lib.MTS_SLOT_FREE


def test_option_values_past_the_kernels_bounds_are_clamped(world):
    """Keep-alive and user-timeout words of 0xFFFFFFFF once put the next
    deadline 136 years out, past what poll() takes (the fuzzer found it)."""
    listener = listening_socket(world)
    child, conn, _ = accepted_connection(world, listener)
    slot = lib.mts_slot_at(world.g, child)
    slot.opt_keepalive = 1
    slot.opt_keepidle = slot.opt_keepintvl = slot.opt_keepcnt = slot.opt_user_timeout_ms = U32_MAX
    world.command(lib.MTS_OP_SETOPT, child, lib.MTS_OPT_KEEPALIVE)
    world.settle()
    stack_conn = world.runtime.sockets[child].conn
    assert (stack_conn.keepidle, stack_conn.keepintvl, stack_conn.keepcnt) == (32767.0, 32767.0, 127)
    world.runtime._sleep(world.now, max_ms=0)  # a deadline poll() can take
    still_serves(world)


def test_a_lost_tx_command_does_not_stall_the_connection(world):
    """The program overwrote its own MTS_OP_TX: tx_pending stays set and it
    never queues another.  The stack's periodic look sends the bytes."""
    listener = listening_socket(world)
    child, conn, (_, peer_rx) = accepted_connection(world, listener)
    slot = lib.mts_slot_at(world.g, child)
    lib.mts_ring_write(ffi.addressof(slot.tx), lib.mts_tx_data(world.g, child), world.g.tx_size, b"lost", 4)
    slot.tx_pending = 1                                   # ...and no command
    world.settle()
    assert len(peer_rx) == 0
    world.now += world.runtime.HOUSEKEEPING_INTERVAL
    world.settle()
    assert peer_rx.read(4) == b"lost"


def test_commands_for_slots_nobody_allocated_are_refused(world):
    free_slot = world.g.nslots - 1
    assert lib.mts_slot_at(world.g, free_slot).in_use == lib.MTS_SLOT_FREE
    world.command(lib.MTS_OP_LISTEN, free_slot, 16)
    world.command(lib.MTS_OP_CONNECT, free_slot, 0)
    world.settle()
    assert counted(world, "cmd_bad") == 2
    assert free_slot not in world.runtime.sockets


def test_a_reset_for_corruption_names_the_program(world, capsys):
    """The launcher says `program PID` on its link; a reset names that pid."""
    launcher, world.runtime.launcher = socket.socketpair()
    world.runtime.launcher.setblocking(False)
    launcher.sendall(b"program 4321\n")
    world.now += world.runtime.HOUSEKEEPING_INTERVAL
    listener = listening_socket(world)
    victim, victim_conn, (victim_tx, _) = accepted_connection(world, listener)
    lib.mts_slot_at(world.g, victim).rx.tail = 1 << 40
    victim_tx.write(b"data")
    victim_conn.send_ready(world.now)
    world.peer.host.collect(victim_conn, world.now)
    world.settle()
    assert "the program (pid 4321) corrupted socket" in capsys.readouterr().err
    launcher.close()


def test_a_connection_reset_for_corruption_as_its_handshake_completes_is_published_closed(world):
    """Found by the fuzzer: the ACK that completes a handshake and a TX head
    the program made impossible meet in one loop pass; the connection is
    established and reset in the same pass, its rings already let go."""
    world.runtime.sockets.gathers = True          # the establishment then touches the send buffer
    listening_socket(world)
    conn = world.peer.host.connect_ephemeral(STACK_IP, 8080, RingBuffer(RING), RingBuffer(RING), None,
                                             world.now)
    child = None
    while child is None:                   # ARP, then the SYN: the stack answers it from a new slot
        world.link.inbound.extend(world.peer.egress(world.now))
        world.runtime.step(world.now)
        child = next((i for i in world.runtime.sockets if i != 0), None)
        world.peer.ingest(world.take_wire_frames(), world.now)            # ...its SYN-ACK included
    lib.mts_slot_at(world.g, child).tx.head = 1 << 40                      # impossible
    world.link.inbound.extend(world.peer.egress(world.now))               # the ACK
    world.now += 0.001
    world.runtime.step(world.now)
    slot = lib.mts_slot_at(world.g, child)
    assert counted(world, "sockets_reset") == 1
    assert (slot.state, slot.so_error) == (lib.MTS_ST_CLOSED, errno.ECONNRESET)
    world.settle()
    assert conn.state.name == "CLOSED"     # our RST reached the peer
    still_serves(world, 9091)
