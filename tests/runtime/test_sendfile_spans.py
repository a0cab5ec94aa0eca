"""Sendfile spans, played as the interposer plays them: the program passes
a file over the control socket and registers it for one socket
(MTS_OP_FILE), then puts stretches of the file into the TX stream as span
records instead of ring bytes.  The peer must receive exactly the stream the
program meant; every impossible record, and a file truncated under a span,
resets that socket and nothing else."""
import errno
import os
import socket
import time

import pytest

from mtcpshim._shm import ffi, lib
from mtcpshim.stack import native
from world import RING, World, listening_socket, peer_connects

FILE_SIZE = 200_000
GARBAGE = b"\xaa"       # what the ring holds under a span: never sent


@pytest.fixture
def content(tmp_path):
    path = tmp_path / "served.bin"
    path.write_bytes(os.urandom(FILE_SIZE))
    return path


@pytest.fixture(params=[0, 65_000], ids=["mss-segments", "segmented-frames"])
def world(request):
    """Spans through both paths: pieces read with pread (segments of an MSS),
    and views of the mapping the kernel would gather (longer segments)."""
    w = World(gso_max_size=request.param)
    w.runtime.sockets.gathers = True    # as over a packet socket with vnet headers
    yield w
    w.close()


def connection(world, port=8080):
    listener = listening_socket(world, port)
    conn, (peer_tx, peer_rx) = peer_connects(world, port)
    child = lib.mts_accept_pop(world.g, listener, 0)
    lib.mts_slot_at(world.g, child).refcnt = 1
    return child, conn, peer_rx


def register(world, slot, path, number):
    """The file goes ahead on the control socket, then the sync command."""
    fd = os.open(path, os.O_RDONLY)
    msg = ffi.new("struct mts_ctl_msg *", {"op": lib.MTS_CTL_SEND_FILE, "id": slot, "arg": number})
    socket.send_fds(world.ctl_app, [ffi.buffer(msg)[:]], [fd])
    os.close(fd)                        # the stack holds its own
    lib.mts_ctl_post(world.g, 0)
    return world.sync(lib.MTS_OP_FILE, slot, number)


def send_span(world, slot, number, offset, length, pos=None):
    """A span record at the head (or `pos`), then the head moved past it,
    its ring bytes left as garbage.  The ring must have the room."""
    s = lib.mts_slot_at(world.g, slot)
    head = s.tx.head
    record = s.tx_spans[s.tx_span_head % lib.MTS_TX_SPANS]
    record.pos, record.offset, record.len, record.file = head if pos is None else pos, offset, length, number
    s.tx_span_head += 1
    lib.mts_ring_write(ffi.addressof(s.tx), lib.mts_tx_data(world.g, slot), world.g.tx_size,
                       GARBAGE * length, length)
    world.command(lib.MTS_OP_TX, slot)


def receive_all(world, peer_rx, n):
    got = bytearray()
    for _ in range(200):
        world.settle()
        got += peer_rx.read(RING)
        if len(got) >= n:
            break
    return bytes(got)


def reset(world, slot):
    return lib.mts_slot_at(world.g, slot).so_error == errno.ECONNRESET


def test_the_peer_receives_the_file_where_the_spans_are_and_ring_bytes_around_them(world, content):
    slot, _, peer_rx = connection(world)
    data = content.read_bytes()
    assert register(world, slot, content, 1) == 0
    world.write(slot, b"HTTP/1.1 200 OK\r\n\r\n")
    send_span(world, slot, 1, 0, 20_000)
    send_span(world, slot, 1, 20_000, 10_000)            # back to back
    world.write(slot, b"--between--")
    send_span(world, slot, 1, 170_000, 30_000)           # all within the ring's room
    expected = b"HTTP/1.1 200 OK\r\n\r\n" + data[:30_000] + b"--between--" + data[170_000:]
    assert receive_all(world, peer_rx, len(expected)) == expected
    assert not reset(world, slot)


def test_spans_may_come_from_several_files_on_one_socket(world, content, tmp_path):
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(70_000))
    slot, _, peer_rx = connection(world)
    assert register(world, slot, content, 1) == 0
    assert register(world, slot, other, 2) == 0
    send_span(world, slot, 2, 0, 40_000)
    send_span(world, slot, 1, 100, 20_000)
    expected = other.read_bytes()[:40_000] + content.read_bytes()[100:20_100]
    assert receive_all(world, peer_rx, len(expected)) == expected


def descriptors_of(path):
    fds = "/proc/self/fd"
    return [fd for fd in os.listdir(fds) if os.path.realpath(f"{fds}/{fd}") == str(path)]


def test_the_stacks_descriptors_for_a_file_go_when_the_connection_is_done(world, content):
    slot, _, peer_rx = connection(world)
    assert register(world, slot, content, 1) == 0
    assert descriptors_of(content)       # its own, and the mapping's
    send_span(world, slot, 1, 0, 50_000)
    assert len(receive_all(world, peer_rx, 50_000)) == 50_000
    world.command(lib.MTS_OP_CLOSE, slot)
    for _ in range(5):
        world.now += 1.0
        world.settle()
    assert slot not in world.runtime.sockets
    assert descriptors_of(content) == []


def test_a_file_that_is_not_a_regular_file_is_refused_and_the_socket_goes_on(world):
    slot, _, peer_rx = connection(world)
    r, w = os.pipe()
    msg = ffi.new("struct mts_ctl_msg *", {"op": lib.MTS_CTL_SEND_FILE, "id": slot, "arg": 1})
    socket.send_fds(world.ctl_app, [ffi.buffer(msg)[:]], [r])
    lib.mts_ctl_post(world.g, 0)
    assert world.sync(lib.MTS_OP_FILE, slot, 1) == -errno.EBADF
    os.close(r), os.close(w)
    world.write(slot, b"still fine")
    assert receive_all(world, peer_rx, 10) == b"still fine"


def test_a_file_number_nobody_sent_is_refused(world):
    slot, _, _ = connection(world)
    assert world.sync(lib.MTS_OP_FILE, slot, 7) == -errno.EBADF


def test_files_are_refused_where_the_link_reads_what_it_sends(content):
    world = World()                     # a link that copies frames: no spans
    try:
        slot, _, _ = connection(world)
        assert register(world, slot, content, 1) == -errno.EOPNOTSUPP
    finally:
        world.close()


@pytest.mark.parametrize("record", [
    dict(number=9, offset=0, length=1000),                  # a file never registered
    dict(number=1, offset=0, length=0),                     # empty
    dict(number=1, offset=0, length=RING + 1),              # longer than the ring
    dict(number=1, offset=0, length=1000, pos_back=5),      # over bytes already taken from the ring
    dict(number=1, offset=(1 << 64) - 500, length=1000),    # past any file offset
], ids=["unregistered", "empty", "beyond-ring", "over-ring-bytes", "beyond-off_t"])
def test_an_impossible_span_record_resets_that_socket_only(world, content, record):
    slot, _, _ = connection(world)
    assert register(world, slot, content, 1) == 0
    world.write(slot, b"abcdefgh")
    world.settle()
    s = lib.mts_slot_at(world.g, slot)
    send_span(world, slot, record["number"], record["offset"], min(record["length"], RING - 64),
              pos=s.tx.head - record.get("pos_back", 0))
    s.tx_spans[(s.tx_span_head - 1) % lib.MTS_TX_SPANS].len = record["length"]
    world.settle()
    assert reset(world, slot)
    assert world.runtime.stats()["shm"]["sockets_reset"] == 1


def test_more_span_records_than_slots_at_once_reset_the_socket(world, content):
    slot, _, _ = connection(world)
    assert register(world, slot, content, 1) == 0
    lib.mts_slot_at(world.g, slot).tx_span_head += lib.MTS_TX_SPANS + 1
    world.write(slot, b"x")
    world.settle()
    assert reset(world, slot)


def test_a_file_truncated_under_its_span_resets_the_socket_and_the_stack_serves_on(world, content):
    slot, _, _ = connection(world)
    other, _, other_rx = connection(world, 8081)
    assert register(world, slot, content, 1) == 0
    os.truncate(content, 1000)
    send_span(world, slot, 1, 0, 60_000)
    for _ in range(20):                  # a segment that fails in the "kernel" is sent again...
        time.sleep(0.002)                # ...after the stack stopped believing the file's size
        world.now += 0.5
        world.settle()
    assert reset(world, slot)
    world.write(other, b"unaffected")
    assert receive_all(world, other_rx, 10) == b"unaffected"


def test_a_guarded_copy_of_a_mapping_whose_file_was_truncated_fails_instead_of_faulting(content):
    import mmap
    with open(content, "rb") as f:
        mapping = mmap.mmap(f.fileno(), FILE_SIZE, prot=mmap.PROT_READ)
    view = memoryview(mapping)[100_000:150_000]
    assert native.copy_guarded(view) == content.read_bytes()[100_000:150_000]
    os.truncate(content, 4096)
    assert native.copy_guarded(view) is None          # a plain bytes(view) would raise SIGBUS
    view.release()
    mapping.close()


def test_ring_bytes_where_the_ring_wraps_reach_the_peer_whole(world):
    """Where the ring wraps, a long segment goes as two views of it."""
    slot, _, peer_rx = connection(world)
    first, second = os.urandom(50_000), os.urandom(50_000)
    for data in (first, second):         # the second wraps the 64 KiB ring
        world.write(slot, data)
        assert receive_all(world, peer_rx, len(data)) == data
