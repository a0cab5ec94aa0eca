"""The stack runtime driven step by step: a real region, interface, host and
TCP core on our side; on the far side of an in-memory Ethernet link, a peer
host built from the same stack pieces.  The application's half of the ABI is
played with the same mts_shm.h operations the interposer uses."""
import os
import socket

from mtcpshim._shm import ffi, lib
from mtcpshim.region import Region, RegionSize
from mtcpshim.runtime import Runtime
from mtcpshim.stack.host import TcpHost
from mtcpshim.stack.iface import Interface
from mtcpshim.stack.node import Node
from mtcpshim.stack.storage import RingBuffer
from mtcpshim.stack.tcp import TcpConfig
from mtcpshim.stack.wire.vnet import SegmentedFrame
from support.link import MemoryLink

STACK_IP, PEER_IP = 0xC6120002, 0xC6120001
STACK_MAC, PEER_MAC = bytes.fromhex("020000000002"), bytes.fromhex("020000000001")
RING = 64 * 1024


class Peer(Node):
    """A node on the other end of the link, from the same stack pieces."""

    def __init__(self):
        super().__init__(Interface(PEER_MAC, PEER_IP, 24), TcpHost(PEER_IP))


class World:
    """`gso_max_size`: the link takes segments of that much payload whole
    (as a veth does), and the stack sends them."""

    def __init__(self, gso_max_size=0):
        self.region = Region.create(RegionSize(nslots=16, nwaiters=4, cmd_capacity=64, rx_size=RING,
                                               tx_size=RING), STACK_IP, 24)
        self.g = self.region.geom
        self.ctl_stack, self.ctl_app = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.wake = os.eventfd(0, os.EFD_NONBLOCK)
        self.link = MemoryLink(STACK_MAC, gso_max_size, device_segments=gso_max_size > 0)
        host = TcpHost(STACK_IP, TcpConfig(gso_max_size=gso_max_size))
        self.runtime = Runtime(self.region, self.link, Node(Interface(STACK_MAC, STACK_IP, 24), host),
                               self.ctl_stack.detach(), self.wake)
        self.peer = Peer()
        self.now = 1000.0

    def close(self):
        self.runtime.close()
        self.ctl_app.close()
        self.link.close()
        os.close(self.wake)
        self.region.close()
        os.close(self.region.fd)

    def settle(self, rounds=50, advance=0.001):
        """Runs both sides until the link is quiet."""
        for _ in range(rounds):
            self.now += advance
            self.runtime.step(self.now)
            self.peer.on_timers(self.now)
            out = self.take_wire_frames()
            self.peer.ingest(out, self.now)
            back = self.peer.egress(self.now)
            self.link.inbound.extend(back)
            if not out and not back and not lib.mts_cmd_pending(self.g, 0, self.runtime.sockets.cmd_position):
                return

    def take_wire_frames(self):
        """What the stack sent, as the wire carries it: segmented frames cut."""
        out, self.link.outbound = self.link.outbound, []
        return [piece for frame in out for piece in (frame.cut() if type(frame) is SegmentedFrame else (frame,))]

    # -- the application's side of the ABI ------------------------------

    def command(self, op, slot, arg=0):
        # As the interposer queues it: for the slot's current holder.
        generation = lib.mts_slot_at(self.g, slot).generation if op != lib.MTS_OP_WAITER_FREE and slot < self.g.nslots else 0
        assert lib.mts_cmd_push(self.g, 0, op, slot, generation, arg) == 0

    def sync(self, op, slot, arg=0):
        lib.mts_slot_at(self.g, slot).op_done = 0
        self.command(op, slot, arg)
        self.settle()
        s = lib.mts_slot_at(self.g, slot)
        assert s.op_done == 1
        return s.op_result

    def new_socket(self):
        slot = lib.mts_slot_alloc(self.g, 0, ffi.NULL)
        lib.mts_slot_at(self.g, slot).refcnt = 1
        return slot

    def write(self, slot, data):
        s = lib.mts_slot_at(self.g, slot)
        n = lib.mts_ring_write(ffi.addressof(s.tx), lib.mts_tx_data(self.g, slot), self.g.tx_size, data, len(data))
        if not s.tx_pending:
            s.tx_pending = 1
            self.command(lib.MTS_OP_TX, slot)
        return n

    def read(self, slot, n=RING):
        s = lib.mts_slot_at(self.g, slot)
        buf = ffi.new("uint8_t[]", n)
        got = lib.mts_ring_read(ffi.addressof(s.rx), lib.mts_rx_data(self.g, slot), self.g.rx_size, buf, n)
        if lib.mts_rx_take_notify(s):
            self.command(lib.MTS_OP_RXWIN, slot)
        return ffi.buffer(buf, got)[:]


def addr(ip, port):
    return ip << 16 | port


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


U32_MAX, U64_MAX = (1 << 32) - 1, (1 << 64) - 1


def hostile_storm(world, rng, writes, connections=3):
    """The program turned hostile: `writes` seeded words of adversarial or
    random values over the whole region (slots most often), well-formed
    commands of random ops, slots and arguments, while the peer keeps
    sending on `connections` connections; the loop and the peer run
    between writes.  Most writes land in the slots of sockets the stack
    serves.  Returns the stack's "shm" counters."""
    g = world.g
    listener = listening_socket(world)
    conns = [peer_connects(world)[0] for _ in range(connections)]
    base = ffi.cast("char *", world.region.header)
    words = ffi.cast("uint64_t *", base)
    cells = ffi.cast("struct mts_cmd *", base + g.cmdq_off + ffi.sizeof("struct mts_cmdq"))
    values = (0, 1, U32_MAX, U64_MAX, 1 << 63, 1 << 40, g.nslots, g.nslots - 1, listener,
              g.rx_size + 1, g.tx_size - 1, g.size)
    for _ in range(writes):
        live = list(world.runtime.sockets)
        if rng.random() < 0.3 or not live:
            offset = rng.randrange(g.size // 8)
        else:  # the slot of a socket the stack serves
            offset = (g.slots_off + rng.choice(live) * ffi.sizeof("struct mts_slot")
                      + rng.randrange(ffi.sizeof("struct mts_slot"))) // 8
        words[offset] = rng.choice(values) if rng.random() < 0.5 else rng.getrandbits(64)
        if rng.random() < 0.2:
            pos = world.runtime.sockets.cmd_position
            cell = cells + (pos & (g.cmd_capacity - 1))
            cell.op = rng.randrange(12)
            cell.slot = rng.choice((rng.randrange(g.nslots), U32_MAX, listener))
            cell.arg = rng.choice((rng.getrandbits(64), rng.randrange(1 << 16), addr(PEER_IP, 80)))
            cell.seq = pos + 1
        if rng.random() < 0.05:
            for i, conn in enumerate(conns):
                if conn.state.name == "CLOSED":  # reset: the peer connects again (listener willing)
                    conns[i] = conn = peer_connects(world)[0]
                conn.send_buf.write(b"x" * 100)
                conn.send_ready(world.now)
                world.peer.host.collect(conn, world.now)
        world.now += 0.001
        world.runtime.step(world.now)
        world.peer.on_timers(world.now)
        world.peer.ingest(world.take_wire_frames(), world.now)
        world.link.inbound.extend(world.peer.egress(world.now))
    return world.runtime.stats()["shm"]
