"""A ring's pages go back to the kernel once it sits empty between small
writes (mts_ring_release): a connection of small messages walks its rings
round and would otherwise hold every page of them until it closes.  A bulk
flow keeps its pages (they would only be faulted straight back) until it
goes quiet: then the stack gives its receive ring back.  What is resident
is read from the memfd itself (SEEK_DATA/SEEK_HOLE)."""
import os

from mtcpshim._shm import ffi, lib

from world import RING, listening_socket, peer_connects

PAGE = 4096


def resident_pages(world, data) -> int:
    """Pages of the ring at `data` that the memfd holds."""
    start = int(ffi.cast("uintptr_t", data)) - int(ffi.cast("uintptr_t", world.region.base))
    fd, pages, pos = world.region.fd, 0, start
    while pos < start + RING:
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:                    # ENXIO: nothing past pos
            break
        if pos >= start + RING:
            break
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), start + RING)
        pages += (hole - pos) // PAGE
        pos = hole
    return pages


class Exchange:
    """A connection between the peer and the program (the interposer's ring
    operations played here) that trades messages: the peer sends one, the
    program reads it and sends as much back, the peer reads it."""

    def __init__(self, world):
        self.world = world
        listener = listening_socket(world)
        self.conn, (self.peer_tx, self.peer_rx) = peer_connects(world)
        self.child = lib.mts_accept_pop(world.g, listener)
        self.slot = lib.mts_slot_at(world.g, self.child)

    def round(self, message: bytes) -> None:
        world, conn, slot, child = self.world, self.conn, self.slot, self.child
        self.peer_tx.write(message)
        conn.send_ready(world.now)
        world.peer.host.collect(conn, world.now)
        world.settle()
        assert world.read(child) == message
        # The program's side, as the interposer writes.
        tx, pages = ffi.addressof(slot.tx), ffi.addressof(slot.tx, "pages")
        lib.mts_ring_pages_before_write(pages, lib.mts_tx_data(world.g, child), world.g.tx_size, slot.tx.head,
                                        lib.mts_ring_used(tx))
        assert world.write(child, message) == len(message)
        lib.mts_ring_pages_wrote(pages, lib.mts_ring_used(tx))
        world.settle()
        assert self.peer_rx.read(len(self.peer_rx)) == message
        conn.recv_consumed(world.now)
        world.peer.host.collect(conn, world.now)


def exchange(world, message_size, rounds):
    """`rounds` messages of `message_size` each way: both rings walk round."""
    pair = Exchange(world)
    for _ in range(rounds):
        pair.round(b"m" * message_size)
    return pair


def look_later(world):
    """One housekeeping interval on, the stack's loop runs (and looks)."""
    world.now += world.runtime.HOUSEKEEPING_INTERVAL
    world.runtime.step(world.now)


def test_small_messages_leave_their_rings_holding_few_pages(world):
    # 1000 x 100 bytes each way: each 64 KiB ring wraps; nothing is given
    # back before 32 KiB pass, and after that only pages written since.
    child = exchange(world, 100, 1000).child
    limit = (lib.MTS_RING_RELEASE_AFTER + PAGE) // PAGE + 1
    assert resident_pages(world, lib.mts_rx_data(world.g, child)) <= limit
    assert resident_pages(world, lib.mts_tx_data(world.g, child)) <= limit


def test_a_bulk_flow_keeps_its_ring_pages(world):
    child = exchange(world, lib.MTS_RING_SMALL_FLOW + 1000, 8).child
    assert resident_pages(world, lib.mts_rx_data(world.g, child)) == RING // PAGE
    assert resident_pages(world, lib.mts_tx_data(world.g, child)) == RING // PAGE


def test_a_bulk_flow_that_goes_quiet_gives_its_receive_ring_back(world):
    child = exchange(world, lib.MTS_RING_SMALL_FLOW + 1000, 8).child
    rx = lib.mts_rx_data(world.g, child)
    look_later(world)                      # the first look finds it empty
    assert resident_pages(world, rx) == RING // PAGE
    look_later(world)                      # still empty, nothing written since
    assert resident_pages(world, rx) == 0
    assert world.runtime.sockets.idle_rings_released == 1
    # The program gives its send ring back at its next write, not before.
    assert resident_pages(world, lib.mts_tx_data(world.g, child)) == RING // PAGE


def test_a_bulk_flow_busy_between_looks_keeps_its_pages(world):
    pair = exchange(world, lib.MTS_RING_SMALL_FLOW + 1000, 8)
    for _ in range(3):
        look_later(world)
        pair.round(b"m" * (lib.MTS_RING_SMALL_FLOW + 1000))
    assert resident_pages(world, lib.mts_rx_data(world.g, pair.child)) == RING // PAGE
    assert world.runtime.sockets.idle_rings_released == 0
