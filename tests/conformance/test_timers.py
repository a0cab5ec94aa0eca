"""The sender's timers, seen from a peer that stops cooperating: a peer that
stops ACKing gets the oldest segment again with exponential backoff
(RFC 6298 5.5), and a peer that closes its window gets window probes
(RFC 9293 3.8.6.1) until it opens again, then the data resumes where it
stopped.  The bulk server sends bulk_pattern() as soon as it accepts."""
import time

from peer_server import BULK_PORT, bulk_pattern
from probe import ACK, seq_add
from mtcpshim.stack.seq import seq_diff

ISN = 20000
INITIAL_FLIGHT = 10 * 1460          # RFC 6928 initial window, at our MSS
PATTERN = bulk_pattern(4 * INITIAL_FLIGHT)
PERSIST_WATCH = 4.0                 # seconds of zero window


def bulk_connection(open_probe):
    probe = open_probe(BULK_PORT)
    synack = probe.handshake(isn=ISN, mss=1460, wscale=7, sack_perm=True)
    return probe, seq_add(synack.seq, 1)


def test_unacked_data_is_retransmitted_with_exponential_backoff(open_probe):
    probe, first_byte = bulk_connection(open_probe)
    flight = probe.collect(0.15)
    assert flight and flight[0][1].seq == first_byte
    # Say nothing more: only the oldest segment should come again, ever later.
    arrivals = [at for at, segment in probe.collect(7.0) if segment.seq == first_byte]
    assert len(arrivals) >= 3, f"only {len(arrivals)} retransmissions in 7 s"
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    for shorter, longer in zip(gaps, gaps[1:]):
        assert longer > 1.5 * shorter, f"retransmission gaps {gaps} do not back off"
    # An ACK for everything lets the transfer go on, byte-exact.
    offset = seq_diff(probe.rcv_nxt, first_byte)
    probe.send(ACK)
    assert probe.read_stream(len(PATTERN) - offset) == PATTERN[offset:]


def test_zero_window_is_probed_until_it_opens(open_probe):
    probe, first_byte = bulk_connection(open_probe)
    probe.collect(0.15)
    closed_at = probe.rcv_nxt
    probe.send(ACK, window=0)
    # Nothing new may come but window probes: a zero-length segment just
    # below the window (as Linux sends) or one byte at its edge.  Each is
    # answered as a real receiver would: still closed, the probe byte not
    # taken.  (A retransmission of data the ACK covers may cross it.)
    probes = []
    deadline = time.monotonic() + PERSIST_WATCH
    while (segment := probe.receive(deadline - time.monotonic())) is not None:
        one_byte_probe = segment.seq == closed_at and len(segment.payload) == 1
        beyond = seq_diff(seq_add(segment.seq, len(segment.payload)), closed_at)
        assert beyond <= 0 or one_byte_probe, f"{segment} sent into a zero window at {closed_at}"
        if one_byte_probe or (segment.seq == seq_add(closed_at, 0xFFFFFFFF) and not segment.payload):
            probes.append(segment)
            probe.rcv_nxt = closed_at
            probe.send(ACK, window=0)
    assert len(probes) >= 2, f"{len(probes)} window probes in {PERSIST_WATCH} s"
    # Open the window: the data resumes at the first byte not yet accepted.
    probe.rcv_nxt = closed_at
    probe.send(ACK)
    offset = seq_diff(closed_at, first_byte)
    assert probe.read_stream(len(PATTERN) - offset) == PATTERN[offset:]
