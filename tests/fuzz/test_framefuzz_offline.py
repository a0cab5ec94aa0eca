"""The fuzzer's frames fed straight into the stack's receive path (Interface
and TcpHost, no network): nothing raises, and every frame a correct stack
must discard is discarded and counted exactly once, under its own reason."""
import collections
import random

from framefuzz import FrameFuzzer, Target
from stack.host import TcpHost
from stack.iface import Interface

STACK_MAC, CLIENT_MAC = bytes.fromhex("020000000002"), bytes.fromhex("020000000001")
STACK_IP, CLIENT_IP = 0xC6120002, 0xC6120001
TARGET = Target(STACK_MAC, CLIENT_MAC, STACK_IP, CLIENT_IP, fuzz_port=8081, protected_port=8080,
                protected_client_ports=range(40000, 41000))
# Totals, not drops: what the interface counts for frames it handled.
NOT_DROPS = {"rx_frames", "tx_frames", "arp_request_rx", "arp_reply_rx", "arp_request_tx",
             "arp_reply_tx", "icmp_echo"}


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
