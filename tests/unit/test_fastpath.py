"""The receive fast path (stack/csrc/fastpath.h): which segments header
prediction takes, and that taking them changes nothing.  Every trace of
the TCP core in this directory also runs through the fast path
(conftest.py); here, traces that say which way a segment went, and a
seeded random differential of the two paths."""
import os
import random

import pytest

from mtcpshim.stack import native
from mtcpshim.stack.fastpath import FlowTable
from mtcpshim.stack.tcp import EV_READABLE, TcpConfig, TcpState
from mtcpshim.stack.wire.tcp import ACK, FIN, PSH, RST, SYN, URG

MSS = 1460


@pytest.fixture
def fast(make_fast_trace):
    t = make_fast_trace()
    t.establish()
    return t


def test_an_in_order_segment_takes_the_fast_path(fast):
    t = fast
    t.send(t.rx(ACK | PSH, t.R + 1, t.L + 1, b"GET / HTTP/1.1\r\n\r\n"))
    assert t.fast_taken == 1
    assert t.events() == EV_READABLE
    assert t.recv() == []                      # the ACK waits for the delayed-ACK timer
    assert t.wait_for_timer() == pytest.approx(t.config.delayed_ack)
    (ack,) = t.recv()
    assert ack.ack == t.R + 1 + 18
    assert t.read() == b"GET / HTTP/1.1\r\n\r\n"


def test_the_ack_it_carries_releases_what_it_acknowledges(fast):
    t = fast
    t.write(b"response")
    (data,) = t.recv()
    t.send(t.rx(ACK | PSH, t.R + 1, t.L + 1 + 8, b"next request"))
    assert t.fast_taken == 1
    assert t.conn.snd_una == t.L + 1 + 8 and len(t.send_buf) == 0
    assert t.read() == b"next request"


def test_a_second_segment_of_the_batch_waits_for_the_core_to_finish_the_first(fast):
    t = fast
    t.send(t.rx(ACK, t.R + 1, t.L + 1, b"a" * MSS), t.rx(ACK, t.R + 1 + MSS, t.L + 1, b"b" * MSS))
    assert t.fast_taken == 1
    (ack,) = t.recv()                          # the second full segment: ACK at once
    assert ack.ack == t.R + 1 + 2 * MSS
    assert t.read() == b"a" * MSS + b"b" * MSS


@pytest.mark.parametrize("flags, seq_offset, ack_offset, payload", [
    (ACK | FIN, 0, 0, b"bye"),                 # a FIN
    (RST, 0, 0, b""),                          # a reset
    (ACK | SYN, 0, 0, b""),                    # a SYN on a synchronized connection
    (ACK | URG, 0, 0, b"x"),                   # urgent data
    (ACK, 10, 0, b"later"),                    # out of order
    (ACK, -5, 0, b"again"),                    # a retransmission of what we have
    (ACK, 0, 100, b"x"),                       # acknowledges data never sent
    (PSH, 0, 0, b"x"),                         # no ACK
], ids=["fin", "rst", "syn", "urg", "out-of-order", "old-data", "ack-beyond", "no-ack"])
def test_segments_beyond_the_common_case_go_to_the_core(fast, flags, seq_offset, ack_offset, payload):
    t = fast
    t.send(t.rx(flags, t.R + 1 + seq_offset, t.L + 1 + ack_offset, payload))
    assert t.fast_taken == 0


def test_options_other_than_timestamps_go_to_the_core(make_fast_trace):
    t = make_fast_trace(config=TcpConfig(sack=True))
    t.establish(sack_permitted=True)
    t.send(t.rx(ACK, t.R + 1, t.L + 1, b"x", sack_blocks=((t.L + 1, t.L + 1),)))
    assert t.fast_taken == 0
    t.send(t.rx(ACK, t.R + 2, t.L + 1, b"y"))
    assert t.fast_taken == 1
    assert t.read() == b"xy"


def test_with_timestamps_only_segments_carrying_one_that_paws_accepts(make_fast_trace):
    t = make_fast_trace(config=TcpConfig(timestamps=True))
    t.establish(timestamp=(1000, 0))
    t.recv()
    t.send(t.rx(ACK, t.R + 1, t.L + 1, b"a", timestamp=(1010, 0)))
    assert t.fast_taken == 1 and t.conn.ts_recent == 1010
    t.send(t.rx(ACK, t.R + 2, t.L + 1, b"b"))                          # none: the core takes it
    t.send(t.rx(ACK, t.R + 3, t.L + 1, b"c", timestamp=(900, 0)))      # older: PAWS drops it
    assert t.fast_taken == 1
    t.send(t.rx(ACK, t.R + 3, t.L + 1, b"c", timestamp=(1020, 0)))
    assert t.fast_taken == 2 and t.read() == b"abc"


def test_nothing_takes_the_fast_path_while_a_hole_waits_to_be_filled(fast):
    t = fast
    t.send(t.rx(ACK, t.R + 1 + 100, t.L + 1, b"b" * 100))
    t.recv()
    t.send(t.rx(ACK, t.R + 1, t.L + 1, b"a" * 100))         # fills the hole
    assert t.fast_taken == 0
    assert t.read() == b"a" * 100 + b"b" * 100
    t.send(t.rx(ACK, t.R + 201, t.L + 1, b"c"))
    assert t.fast_taken == 1


def test_after_the_peer_closes_its_side_segments_go_to_the_core(fast):
    t = fast
    t.send(t.rx(ACK | FIN, t.R + 1, t.L + 1))
    assert t.conn.state == TcpState.CLOSE_WAIT
    t.send(t.rx(ACK, t.R + 2, t.L + 1))
    assert t.fast_taken == 0


def test_data_beyond_the_window_goes_to_the_core(make_fast_trace):
    t = make_fast_trace(buffer_size=1000)
    t.establish()
    t.send(t.rx(ACK, t.R + 1, t.L + 1, b"x" * 1001))
    assert t.fast_taken == 0
    assert t.read() == b"x" * 1000


# ---------------------------------------------------------------- differential

# Per variant; set more to run longer (scripts/test.sh runs the default).
SEGMENTS = int(os.environ.get("MTCPSHIM_FASTPATH_SEGMENTS", "6000"))


def _random_batch(rng: random.Random, t, sent_by_peer: int, acked_by_us: int):
    """Segments a peer might send next: mostly the next in-order data or a
    pure ACK, sometimes a duplicate, a gap, an odd flag or ACK, a stale
    timestamp."""
    batch = []
    seq = t.R + 1 + sent_by_peer
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        roll = rng.random()
        payload = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 10, 100, MSS))))
        flags = ACK | (PSH if rng.random() < 0.5 else 0)
        offset = 0
        if roll < 0.05:
            offset = rng.randrange(1, 3 * MSS)
        elif roll < 0.10:
            offset = -rng.randrange(1, 200)
        elif roll < 0.12:
            flags |= rng.choice((FIN, RST, SYN, URG))
        elif roll < 0.14:
            flags = PSH
        ack = t.L + 1 + acked_by_us
        if rng.random() < 0.05:
            ack += rng.choice((-1, 1, 1000, -100000, 1 << 31))
        options = {}
        if t.config.timestamps:
            stale = rng.randrange(5000) if rng.random() < 0.05 else 0
            options["timestamp"] = ((1000 + int(t.now * 1000) - stale) & 0xFFFFFFFF, rng.randrange(1 << 32))
            if rng.random() < 0.02:
                del options["timestamp"]
        batch.append(t.rx(flags, seq + offset, ack, payload, window=rng.choice((65535, 65535, 1000, 0)),
                          **options))
        if offset == 0 and not flags & (SYN | RST):
            seq += len(payload)
    return batch


def _state(t) -> tuple:
    c = t.conn
    return (c.state, c.error, c.rcv_nxt, c.rcv_adv, c.snd_una, c.snd_nxt, c.snd_max, c.snd_wnd,
            c.ts_recent, c.deadline(), len(t.recv_buf), len(t.send_buf))


@pytest.mark.parametrize("options", [
    {"timestamps": False, "sack": False}, {"timestamps": True, "sack": False},
    {"timestamps": True, "sack": True},
], ids=["plain", "timestamps", "timestamps-sack"])
def test_the_fast_path_and_the_core_answer_random_segments_alike(make_core_trace, make_fast_trace, options):
    """Pairs of connections, one fed through the fast path, one straight
    into the core, get the same seeded random segments, reads, writes and
    clock: after every step their segments, events, buffers and state
    agree.  A pair that leaves ESTABLISHED (a FIN, a reset) is replaced."""
    rng = random.Random(11)
    peer_syn = {"timestamp": (1000, 0)} if options["timestamps"] else {}
    if options["sack"]:
        peer_syn["sack_permitted"] = True
    sent = taken = 0
    while sent < SEGMENTS:
        traces = [make(config=TcpConfig(**options), buffer_size=20000)
                  for make in (make_core_trace, make_fast_trace)]
        core, fast = traces
        for t in traces:
            t.establish(**peer_syn)
        while sent < SEGMENTS and core.conn.state == TcpState.ESTABLISHED:
            step_seed = rng.random()
            for t in traces:
                step = random.Random(step_seed)
                t.now += step.choice((0.0, 0.001, 0.01, 0.2))
                t.wait(0)
                acked = (t.conn.snd_max if step.random() < 0.7 else t.conn.snd_una) - t.L - 1
                batch = _random_batch(step, t, t.conn.rcv_nxt - t.R - 1, acked)
                t.send(*batch)
                size = min(step.choice((1, 100, 3000)), t.send_buf.space())
                if step.random() < 0.3 and size:
                    t.write(bytes(step.randrange(256) for _ in range(size)))
                if step.random() < 0.5:
                    t.read(step.choice((1, 1000, 1 << 30)))
            sent += len(batch)
            outputs = [[seg.emit(0, 0) for seg in t.recv()] for t in traces]
            assert outputs[0] == outputs[1]
            assert core.events() == fast.events()
            assert _state(core) == _state(fast)
            assert core.recv_buf.peek(0, 1 << 20) == fast.recv_buf.peek(0, 1 << 20)
        taken += fast.fast_taken
    assert taken > SEGMENTS // 4, f"the fast path took {taken} of {sent} segments"


def test_the_flow_table_finds_every_flow_across_growth_and_removals():
    """Thousands of flows in and out (growth past the first size, and
    tombstones): every live one is found once, a removed one never."""
    if not native.ACCELERATED:
        pytest.skip("the flow table is C")

    class Flow:
        def __init__(self):
            self.tcb = native.new_tcb()

    table = FlowTable()
    keys = [(80, 0xC6120001 + i // 1000, 1024 + i % 1000) for i in range(5000)]
    for key in keys:
        table.add(key, Flow())
    assert len(table) == 5000
    with pytest.raises(KeyError):
        table.add(keys[0], Flow())
    for key in keys[::2]:
        table.remove(key)
    with pytest.raises(KeyError):
        table.remove(keys[0])
    for key in keys[::2]:
        table.add(key, Flow())
    for key in keys:
        table.remove(key)
    assert len(table) == 0 and not any(table.conns)
