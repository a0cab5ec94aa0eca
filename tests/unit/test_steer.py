"""Steering frames to stack workers (issue 14): the reference
worker_of_frame against what the frames are, and the classic BPF program
each worker attaches against the reference, run by tests/support/cbpf.py
(tests/integration/test_steering_kernel.py checks the kernel agrees)."""
import random
import struct

import pytest

from mtcpshim.stack.io import afpacket
from mtcpshim.stack.io.base import MAX_FRAME_LEN
from mtcpshim.stack.io.steer import ALL_WORKERS, steering_program, worker_of_frame, worker_of_ports
from support import cbpf
from support.frames import arp, ethernet, icmp_echo, icmp_error, ipv4, quote, tcp, tcp_frame

ACCEPT = 0x40000
WORKER_COUNTS = (2, 3, 4, 16)


def options(rng: random.Random) -> bytes:
    return bytes(rng.randrange(256) for _ in range(4 * rng.randrange(11)))


def steered(port_a: int, port_b: int, workers: int) -> int:
    """The steering function as specified: the high half of Knuth's
    multiplicative hash of the ports' XOR, modulo the workers."""
    return (((port_a ^ port_b) * 2654435761) % 2**32 // 2**16) % workers


def generated_frames(seed: int = 14):
    """(frame, workers -> its worker) pairs, the worker stated from how the
    frame was made; and odd frames (truncated, random) for the filter alone."""
    rng = random.Random(seed)
    cases = []

    def flow(sport, dport):
        return lambda workers: steered(sport, dport, workers)

    def zero(workers):
        return 0

    def everyone(workers):
        return ALL_WORKERS

    for _ in range(120):
        sport, dport = rng.randrange(65536), rng.choice([80, 443, 8080, rng.randrange(65536)])
        payload = bytes(rng.randrange(64))
        cases.append((tcp_frame(sport, dport, payload=payload), flow(sport, dport)))
        cases.append((tcp_frame(dport, sport, options(rng), payload), flow(sport, dport)))
        # The first fragment (offset 0, more fragments) has the ports; a later one has not.
        cases.append((tcp_frame(sport, dport, fragment=0x2000), flow(sport, dport)))
        cases.append((tcp_frame(sport, dport, fragment=0x2000 | rng.randrange(1, 0x2000)), zero))
        for icmp_type, code in ((3, 4), (3, 3), (11, 0), (12, 0)):
            cases.append((icmp_error(icmp_type, quote(sport, dport, options(rng)), code, options(rng)),
                          flow(sport, dport)))
        cases.append((icmp_error(3, quote(sport, dport, protocol=17), 3), zero))     # quotes UDP
        cases.append((icmp_error(5, quote(sport, dport)), zero))                     # redirect
        cases.append((icmp_echo(sport, dport), zero))
        cases.append((ethernet(0x0800, ipv4(17, struct.pack("!HHHH", sport, dport, 8, 0))), zero))
    cases += [(arp(1), everyone), (arp(2), everyone),
              (ethernet(0x86DD, bytes(40) + tcp(1, 2)), zero),                       # IPv6
              (ethernet(0x88B5, bytes(46)), zero)]
    # Truncated frames: every length of a few, a random length of the rest.
    odd = []
    for frame, _ in cases[:14] + cases[-4:]:
        odd += [frame[:length] for length in range(len(frame))]
    odd += [frame[:rng.randrange(len(frame))] for frame, _ in cases]
    # IPv4 of random bytes, header lengths below 5 and all: TCP, and ICMP errors quoting TCP.
    for _ in range(600):
        garbage = bytearray(rng.randbytes(rng.randrange(34, 140)))
        garbage[12:14] = b"\x08\x00"
        if rng.random() < 0.9:
            garbage[20:22] = bytes([garbage[20] & 0xE0, 0])      # not a later fragment
        garbage[23] = rng.choice([1, 6])
        icmp = 14 + 4 * (garbage[14] & 0xF)
        if icmp + 17 < len(garbage):
            garbage[icmp], garbage[icmp + 17] = rng.choice([3, 11, 12]), 6
        odd.append(bytes(garbage))
    return cases, odd


CASES, ODD = generated_frames()


def test_a_flow_s_worker_is_the_same_both_ways():
    rng = random.Random(1)
    for workers in WORKER_COUNTS:
        for _ in range(1000):
            a, b = rng.randrange(65536), rng.randrange(65536)
            assert worker_of_ports(a, b, workers) == worker_of_ports(b, a, workers)
            assert 0 <= worker_of_ports(a, b, workers) < workers
    assert worker_of_ports(40000, 80, 4) == steered(40000, 80, 4)


@pytest.mark.parametrize("workers", WORKER_COUNTS)
def test_the_reference_steers_each_kind_of_frame(workers):
    for frame, expected in CASES:
        assert worker_of_frame(frame, workers) == expected(workers), frame.hex()
    # Both directions of a flow, and the ICMP error about it, meet on one worker.
    outbound, inbound = tcp_frame(45000, 80), tcp_frame(80, 45000)
    error = icmp_error(3, quote(45000, 80), 4)
    assert worker_of_frame(outbound, workers) == worker_of_frame(inbound, workers) \
        == worker_of_frame(error, workers) == steered(45000, 80, workers)


def test_frames_too_short_to_tell_are_worker_0_s():
    assert worker_of_frame(b"", 4) == worker_of_frame(arp()[:33], 4) == 0
    assert worker_of_frame(arp()[:34], 4) == ALL_WORKERS
    segment = tcp_frame(45001, 80)
    assert {worker_of_frame(segment[:length], 4) for length in range(38)} == {0}   # up to the ports
    assert worker_of_frame(segment[:38], 4) == steered(45001, 80, 4)
    error = icmp_error(3, quote(45001, 80), 4)
    assert {worker_of_frame(error[:length], 4) for length in range(14 + 20 + 8 + 20 + 4)} == {0}
    assert worker_of_frame(error[:66], 4) == steered(45001, 80, 4)


def accepting_workers(frame, programs) -> list[int]:
    verdicts = [cbpf.run(program, frame) for program in programs]
    assert set(verdicts) <= {0, ACCEPT}
    return [worker for worker, verdict in enumerate(verdicts) if verdict]


@pytest.mark.parametrize("workers", WORKER_COUNTS)
def test_the_filter_decides_as_the_reference(workers):
    programs = [steering_program(worker, workers, ACCEPT) for worker in range(workers)]
    assert all(len(program) < 64 for program in programs)
    for frame in [frame for frame, _ in CASES] + ODD:
        expected = worker_of_frame(frame, workers)
        taken = accepting_workers(frame, programs)
        assert taken == (list(range(workers)) if expected == ALL_WORKERS else [expected]), frame.hex()


def test_the_comparison_catches_a_filter_that_drifts():
    """A program one byte off in the ports it reads, or with the wrong
    modulus, disagrees with the reference on the generated frames."""
    programs = [steering_program(worker, 4, ACCEPT) for worker in range(4)]
    for mutate in (lambda code, jt, jf, k: (code, jt, jf, k + 1 if code == 0x48 else k),
                   lambda code, jt, jf, k: (code, jt, jf, 3 if code == 0x94 else k)):
        broken = [[mutate(*instruction) for instruction in program] for program in programs]
        assert any(accepting_workers(frame, broken) != [worker_of_frame(frame, 4)]
                   for frame, expected in CASES if expected(4) != ALL_WORKERS)


def test_one_worker_takes_everything():
    assert [cbpf.run(steering_program(0, 1, ACCEPT), frame) for frame, _ in CASES[:20]] == [ACCEPT] * 20
    for worker, workers in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError):
            steering_program(worker, workers, ACCEPT)


@pytest.mark.parametrize("steering", [None, (0, 3), (2, 3)])
def test_receive_sockets_sort_by_length_after_steering(steering):
    """afpacket's two receive filters: each frame of this worker's reaches
    exactly one of them, by its length; another worker's reaches neither."""
    small = afpacket.receive_filter(longer=False, steering=steering)
    large = afpacket.receive_filter(longer=True, steering=steering)
    for sport in range(40000, 40060):
        for frame in (tcp_frame(sport, 80), tcp_frame(sport, 80, payload=bytes(MAX_FRAME_LEN)), arp()):
            kept = (cbpf.run(small, frame) > 0, cbpf.run(large, frame) > 0)
            if steering is not None and worker_of_frame(frame, 3) not in (steering[0], ALL_WORKERS):
                assert kept == (False, False)
            else:
                assert kept == (len(frame) <= MAX_FRAME_LEN, len(frame) > MAX_FRAME_LEN)


@pytest.mark.parametrize("workers", WORKER_COUNTS)
def test_a_linux_clients_even_ports_spread_over_every_worker(workers):
    """Linux's connect() takes even local ports: the hash must spread them
    over the workers, not send them all to the even ones."""
    counts = [0] * workers
    for port in range(32768, 32768 + 4000 * workers, 2):
        counts[worker_of_ports(port, 8080, workers)] += 1
    assert min(counts) > 0.8 * max(counts), counts
