"""A ring's pages go back to the kernel once it sits empty between small
writes (mts_ring_release): a connection of small messages walks its rings
round and would otherwise hold every page of them until it closes.  A bulk
flow keeps its pages (they would only be faulted straight back).  What is
resident is read from the memfd itself (SEEK_DATA/SEEK_HOLE)."""
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


def exchange(world, message_size, rounds):
    """The peer sends `rounds` messages, the program reads each, then sends
    as much back, and the peer reads it: both rings walk round."""
    listener = listening_socket(world)
    conn, (peer_tx, peer_rx) = peer_connects(world)
    child = lib.mts_accept_pop(world.g, listener, 0)
    slot = lib.mts_slot_at(world.g, child)
    message = b"m" * message_size
    for _ in range(rounds):
        peer_tx.write(message)
        conn.send_ready(world.now)
        world.peer.host.collect(conn, world.now)
        world.settle()
        assert world.read(child) == message
        # The program's side, as the interposer writes.
        tx, pages = ffi.addressof(slot.tx), ffi.addressof(slot.tx, "pages")
        lib.mts_ring_pages_before_write(pages, lib.mts_tx_data(world.g, child), world.g.tx_size, slot.tx.head,
                                        lib.mts_ring_used(tx))
        assert world.write(child, message) == message_size
        lib.mts_ring_pages_wrote(pages, lib.mts_ring_used(tx))
        world.settle()
        assert peer_rx.read(len(peer_rx)) == message
        conn.recv_consumed(world.now)
        world.peer.host.collect(conn, world.now)
    return child


def test_small_messages_leave_their_rings_holding_few_pages(world):
    # 1000 x 100 bytes each way: each 64 KiB ring wraps; nothing is given
    # back before 32 KiB pass, and after that only pages written since.
    child = exchange(world, 100, 1000)
    limit = (lib.MTS_RING_RELEASE_AFTER + PAGE) // PAGE + 1
    assert resident_pages(world, lib.mts_rx_data(world.g, child)) <= limit
    assert resident_pages(world, lib.mts_tx_data(world.g, child)) <= limit


def test_a_bulk_flow_keeps_its_ring_pages(world):
    child = exchange(world, lib.MTS_RING_SMALL_FLOW + 1000, 8)
    assert resident_pages(world, lib.mts_rx_data(world.g, child)) == RING // PAGE
    assert resident_pages(world, lib.mts_tx_data(world.g, child)) == RING // PAGE
