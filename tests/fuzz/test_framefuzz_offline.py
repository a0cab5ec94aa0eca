"""The fuzzer's frames fed straight into the stack's receive path (Interface
and TcpHost, no network): nothing raises, and every frame a correct stack
must discard is discarded and counted exactly once, under its own reason."""
import collections
import random

from framefuzz import FrameFuzzer, Target
from mtcpshim.stack.host import TcpHost
from mtcpshim.stack.iface import Interface
from mtcpshim.stack.wire import vnet
from mtcpshim.stack.wire.errors import WireError

STACK_MAC, CLIENT_MAC = bytes.fromhex("020000000002"), bytes.fromhex("020000000001")
STACK_IP, CLIENT_IP = 0xC6120002, 0xC6120001
TARGET = Target(STACK_MAC, CLIENT_MAC, STACK_IP, CLIENT_IP, fuzz_port=8081, protected_port=8080,
                protected_client_ports=range(40000, 41000))
# Totals, not drops: what the interface counts for frames it handled.
NOT_DROPS = {"rx_frames", "tx_frames", "arp_request_rx", "arp_reply_rx", "arp_request_tx",
             "arp_reply_tx", "icmp_echo", "icmp_frag_needed"}


def drops(iface, host) -> int:
    return (sum(v for k, v in iface.counters.items() if k not in NOT_DROPS)
            + sum(host.counters.values()))


def test_the_same_seed_gives_the_same_frames():
    first = list(FrameFuzzer(TARGET, seed=3).frames(500))
    assert first == list(FrameFuzzer(TARGET, seed=3).frames(500))
    assert first != list(FrameFuzzer(TARGET, seed=4).frames(500))


def test_every_kind_and_every_tcp_flag_combination_is_produced():
    fuzzer = FrameFuzzer(TARGET, seed=1)
    kinds = collections.Counter(kind for kind, _, _ in fuzzer.frames(20000))
    assert set(kinds) == {kind.__name__ for kind, _ in fuzzer._kinds}
    assert kinds["tcp_flags"] >= 256   # they cycle through all 256 combinations


def test_every_frame_that_must_be_dropped_is_dropped_and_counted_once():
    iface = Interface(STACK_MAC, STACK_IP, 24)
    host = TcpHost(STACK_IP, rng=random.Random(1))
    host.listen(8081, 16, lambda ip, port: None)    # a listener that has no room
    now = 0.0
    uncounted = []
    for kind, frame, must_drop in FrameFuzzer(TARGET, seed=1).frames(20000):
        before = drops(iface, host)
        tcp = iface.receive(frame, now)
        if tcp is not None:
            host.receive(*tcp, now)
        host.take_output()
        iface.take_frames()
        if must_drop and drops(iface, host) != before + 1:
            uncounted.append((kind, frame.hex()))
        now += 0.0001
    assert uncounted == []


def test_fuzzed_vnet_headers_are_counted_drops_never_crashes():
    """A TAP with IFF_VNET_HDR puts a virtio_net_hdr before each frame: every
    header, random or near-valid, ahead of the fuzzer's frames either passes
    (and the frame goes on as usual) or is refused with a WireError reason."""
    iface = Interface(STACK_MAC, STACK_IP, 24)
    host = TcpHost(STACK_IP, rng=random.Random(2))
    rng = random.Random(9)
    reasons = collections.Counter()
    for _, frame, _ in FrameFuzzer(TARGET, seed=2).frames(20000):
        if rng.random() < 0.5:
            header = rng.randbytes(vnet.HEADER.size)
        else:  # the fields that matter, near their edges
            header = vnet.HEADER.pack(rng.choice((0, 1, 2, 3, 4)), rng.choice((0, 1, 3, 4, 0x81)),
                                      rng.randrange(0, 100), rng.choice((0, 1, 1448, 65535)),
                                      rng.choice((0, 13, 14, 34, len(frame) - 2, len(frame), 65535)),
                                      rng.choice((0, 6, 16, 1, 65535)))
        try:
            received = vnet.received_frame(header + frame)
        except WireError as error:
            reasons[error.reason] += 1
            continue
        reasons["passed"] += 1
        tcp = iface.receive(received, 0.0)
        if tcp is not None:
            host.receive(*tcp, 0.0)
    assert {"passed", "vnet_bad_flags", "vnet_bad_gso", "vnet_bad_csum_offset"} <= set(reasons)
