"""Data transfer: delayed ACKs, windows, Nagle, reassembly, SACK, wraparound."""
import pytest

from mtcpshim.stack.tcp import EV_READABLE, EV_WRITABLE, TcpConfig
from mtcpshim.stack.wire.tcp import ACK, PSH


def test_in_order_data_acked_after_delayed_ack_timeout(tcp_established):
    t = tcp_established
    t.send(t.rx(ACK | PSH, t.R + 1, t.L + 1, b"abcdef"))
    assert t.events() == EV_READABLE
    assert t.recv() == []
    assert t.wait_for_timer() == pytest.approx(0.040)
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 7, window=59994)]
    assert t.read() == b"abcdef"


def test_second_full_segment_acked_at_once_with_one_ack_per_batch(tcp_established):
    t = tcp_established
    t.send(t.rx(ACK, t.R + 1, t.L + 1, b"a" * 1460),
           t.rx(ACK, t.R + 1461, t.L + 1, b"b" * 1460),
           t.rx(ACK, t.R + 2921, t.L + 1, b"c" * 1460))
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 4381, window=60000 - 4380)]
    assert t.conn.deadline() is None


def test_duplicate_segment_acked_at_once(tcp_established):
    t = tcp_established
    segment = t.rx(ACK | PSH, t.R + 1, t.L + 1, b"abc")
    t.send(segment)
    assert t.recv() == []
    t.send(segment)
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 4, window=59997)]
    assert t.read() == b"abc"


def test_send_splits_into_mss_segments_and_acks_free_the_buffer(tcp_established):
    t = tcp_established
    data = bytes(range(256)) * 12                                  # 3072 bytes
    t.write(data)
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1, data[:1460]),
                        t.tx(ACK, t.L + 1461, t.R + 1, data[1460:2920]),
                        t.tx(ACK | PSH, t.L + 2921, t.R + 1, data[2920:])]
    t.send(t.rx(ACK, t.R + 1, t.L + 1461))
    assert t.events() == EV_WRITABLE
    assert len(t.send_buf) == 3072 - 1460
    t.send(t.rx(ACK, t.R + 1, t.L + 3073))
    assert len(t.send_buf) == 0
    assert t.conn.deadline() is None                               # nothing in flight


def test_piggybacked_ack_replaces_the_delayed_one(tcp_established):
    t = tcp_established
    t.send(t.rx(ACK | PSH, t.R + 1, t.L + 1, b"GET /"))
    t.read()
    t.write(b"200 OK")
    assert t.recv() == [t.tx(ACK | PSH, t.L + 1, t.R + 6, b"200 OK", window=59995)]
    assert t.conn.deadline() == pytest.approx(t.now + t.conn.rtt.rto)  # only the RTO


def test_nagle_holds_a_second_small_segment_until_the_first_is_acked(tcp_established):
    t = tcp_established
    t.write(b"a" * 100)
    assert t.recv() == [t.tx(ACK | PSH, t.L + 1, t.R + 1, b"a" * 100)]
    t.write(b"b" * 100)
    t.write(b"c" * 100)
    assert t.recv() == []
    t.send(t.rx(ACK, t.R + 1, t.L + 101))
    assert t.recv() == [t.tx(ACK | PSH, t.L + 101, t.R + 1, b"b" * 100 + b"c" * 100)]


def test_nagle_lets_the_tail_of_a_large_write_go_at_once(tcp_established):
    t = tcp_established
    t.write(b"x" * 1500)
    assert [len(s.payload) for s in t.recv()] == [1460, 40]        # Minshall, as Linux


def test_nodelay_sends_small_segments_at_once(tcp_established):
    t = tcp_established
    t.conn.nodelay = True
    t.write(b"a" * 100)
    t.write(b"b" * 100)
    assert t.recv() == [t.tx(ACK | PSH, t.L + 1, t.R + 1, b"a" * 100),
                        t.tx(ACK | PSH, t.L + 101, t.R + 1, b"b" * 100)]


def test_window_scaling_beyond_64k_both_ways(make_tcp_trace):
    t = make_tcp_trace(config=TcpConfig(timestamps=False, initial_window_segments=100),
                       buffer_size=1 << 20)
    t.establish(wscale=7)
    assert (t.conn.rcv_wscale, t.conn.snd_wscale) == (5, 7)

    # Sending: a raw window of 1000 << 7 lets 127020 bytes (87 full segments) fly.
    t.send(t.rx(ACK, t.R + 1, t.L + 1, window=1000))
    t.write(bytes(200000))
    sent = t.recv()
    assert [len(s.payload) for s in sent] == [1460] * 87
    assert sent[-1].seq == t.L + 1 + 86 * 1460

    # Receiving: the SYN-ACK offered 65535 unscaled; the first ACK opens the
    # scaled window, after which more than 64 KiB is accepted at once.
    t.send(*[t.rx(ACK, t.R + 1 + i * 1460, t.L + 1, bytes(1460), window=1000)
             for i in range(40)])
    # The free space in 32-byte units, rounded up where rounding down would
    # move the right edge left.
    ack = t.recv()[-1]
    assert 0 <= (ack.window << 5) - ((1 << 20) - 58400) < 32
    t.send(*[t.rx(ACK, t.R + 1 + i * 1460, t.L + 1, bytes(1460), window=1000)
             for i in range(40, 100)])
    ack = t.recv()[-1]
    assert ack.ack == t.R + 1 + 100 * 1460
    assert len(t.recv_buf) == 146000


def test_receive_window_closes_and_reopens_without_silly_updates(make_tcp_trace):
    t = make_tcp_trace(buffer_size=4000)
    t.establish()
    t.send(t.rx(ACK, t.R + 1, t.L + 1, b"a" * 1460), t.rx(ACK, t.R + 1461, t.L + 1, b"b" * 1460))
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 2921, window=1080)]
    # More than the window: the excess is cut off and acknowledged at once.
    t.send(t.rx(ACK, t.R + 2921, t.L + 1, b"c" * 1460))
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 4001, window=0)]
    # Reading 100 bytes would open a silly window: stay quiet.
    assert len(t.read(100)) == 100
    assert t.recv() == []
    # Zero window: a probe of one byte is not accepted, only acknowledged.
    t.send(t.rx(ACK, t.R + 4001, t.L + 1, b"c"))
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 4001, window=0)]
    # Reading enough to open a full segment announces the new window.
    t.read(2000)
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 4001, window=2100)]


def test_out_of_order_data_is_reassembled_and_sacked(make_tcp_trace):
    t = make_tcp_trace()
    t.establish(sack_permitted=True)
    one = t.rx(ACK, t.R + 1, t.L + 1, b"1" * 100)
    two = t.rx(ACK, t.R + 101, t.L + 1, b"2" * 100)
    three = t.rx(ACK, t.R + 201, t.L + 1, b"3" * 100)
    five = t.rx(ACK, t.R + 401, t.L + 1, b"5" * 100)
    t.send(three)
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1, sack_blocks=((t.R + 201, t.R + 301),))]
    t.send(five)
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1,
                             sack_blocks=((t.R + 401, t.R + 501), (t.R + 201, t.R + 301)))]
    t.send(two)
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1,
                             sack_blocks=((t.R + 101, t.R + 301), (t.R + 401, t.R + 501)))]
    assert t.read() == b""
    t.send(one)                                  # fills the first hole: ACK at once
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 301, window=59700,
                             sack_blocks=((t.R + 401, t.R + 501),))]
    assert t.read() == b"1" * 100 + b"2" * 100 + b"3" * 100


def test_data_received_twice_is_reported_once_in_a_dsack_block(make_tcp_trace):
    """RFC 2883: a retransmission of what we already hold is answered at
    once, its range first among the SACK blocks, and only in that ACK."""
    t = make_tcp_trace()
    t.establish(sack_permitted=True)
    one = t.rx(ACK, t.R + 1, t.L + 1, b"1" * 100)
    t.send(one, t.rx(ACK, t.R + 101, t.L + 1, b"2" * 100))
    t.wait_for_timer()
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 201, window=59800)]
    t.send(one)                                  # already acknowledged
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 201, window=59800,
                             sack_blocks=((t.R + 1, t.R + 101),))]
    # Half old, half new: the old half is the duplicate.
    t.send(t.rx(ACK, t.R + 151, t.L + 1, b"2" * 50 + b"3" * 50))
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 251, window=59750,
                             sack_blocks=((t.R + 151, t.R + 201),))]
    t.send(t.rx(ACK, t.R + 251, t.L + 1, b"4" * 50))
    t.wait_for_timer()
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 301, window=59700)]
    assert t.read() == b"1" * 100 + b"2" * 100 + b"3" * 50 + b"4" * 50


def test_out_of_order_data_received_twice_is_dsacked_before_its_block(make_tcp_trace):
    """RFC 2883 section 4: the D-SACK block, then the SACK block holding it."""
    t = make_tcp_trace()
    t.establish(sack_permitted=True)
    t.send(t.rx(ACK, t.R + 201, t.L + 1, b"3" * 100))
    t.send(t.rx(ACK, t.R + 401, t.L + 1, b"5" * 100))
    t.recv()
    t.send(t.rx(ACK, t.R + 151, t.L + 1, b"2" * 50 + b"3" * 100))
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1,
                             sack_blocks=((t.R + 201, t.R + 301), (t.R + 151, t.R + 301),
                                          (t.R + 401, t.R + 501)))]


def test_no_dsack_without_sack_permitted(tcp_established):
    t = tcp_established
    segment = t.rx(ACK, t.R + 1, t.L + 1, b"x" * 100)
    t.send(segment)
    t.send(segment)
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 101, window=59900)]


def test_out_of_order_without_sack_gives_plain_duplicate_acks(tcp_established):
    t = tcp_established
    t.send(t.rx(ACK, t.R + 101, t.L + 1, b"x" * 100))
    t.send(t.rx(ACK, t.R + 201, t.L + 1, b"y" * 100))
    # One duplicate ACK per out-of-order segment, even within a batch.
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 1), t.tx(ACK, t.L + 1, t.R + 1)]
    t.send(t.rx(ACK, t.R + 1, t.L + 1, b"w" * 100))
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 301, window=59700)]
    assert t.read() == b"w" * 100 + b"x" * 100 + b"y" * 100


def test_zero_window_is_probed_with_backoff_until_it_opens(tcp_established):
    t = tcp_established
    t.write(b"a" * 100)
    t.recv()
    t.send(t.rx(ACK, t.R + 1, t.L + 101, window=0))
    t.write(b"b" * 100)
    assert t.recv() == []
    probe = t.tx(ACK, t.L + 100, t.R + 1)          # an old sequence number
    first = t.wait_for_timer()
    assert t.recv() == [probe]
    t.send(t.rx(ACK, t.R + 1, t.L + 101, window=0))
    assert t.wait_for_timer() == pytest.approx(2 * first)
    assert t.recv() == [probe]
    t.send(t.rx(ACK, t.R + 1, t.L + 101, window=1000))
    assert t.recv() == [t.tx(ACK | PSH, t.L + 101, t.R + 1, b"b" * 100)]
    assert t.conn.timers.persist is None


def test_transfer_across_sequence_wraparound(make_tcp_trace):
    t = make_tcp_trace(local_iss=2**32 - 50, remote_iss=2**32 - 20)
    t.establish()
    t.send(t.rx(ACK, t.R + 1, t.L + 1, b"x" * 60))           # crosses 2**32
    t.send(t.rx(ACK, t.R + 61, t.L + 1, b"y" * 60))
    assert t.recv() == []
    t.send(t.rx(ACK, t.R + 161, t.L + 1, b"w" * 40))         # out of order, past the wrap
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 121, window=60000 - 120)]
    t.send(t.rx(ACK, t.R + 121, t.L + 1, b"v" * 40))
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 201, window=60000 - 200)]
    assert t.read() == b"x" * 60 + b"y" * 60 + b"v" * 40 + b"w" * 40

    t.write(b"z" * 1600)
    # Reading 200 bytes moved the right edge too little to announce (SWS).
    assert t.recv() == [t.tx(ACK, t.L + 1, t.R + 201, b"z" * 1460, window=59800),
                        t.tx(ACK | PSH, t.L + 1461, t.R + 201, b"z" * 140, window=59800)]
    assert t.conn.snd_nxt == (t.L + 1601) % 2**32
    t.send(t.rx(ACK, t.R + 201, t.L + 1601))
    assert len(t.send_buf) == 0
    assert t.conn.snd_una == (t.L + 1601) % 2**32


def test_sack_blocks_ride_only_where_the_mss_leaves_room(make_tcp_trace):
    """A full-sized segment with SACK blocks would outgrow the path MTU."""
    t = make_tcp_trace()
    t.establish(sack_permitted=True)
    t.send(t.rx(ACK, t.R + 101, t.L + 1, b"o" * 50))          # out of order
    (dup_ack,) = t.recv()
    assert dup_ack.sack_blocks == ((t.R + 101, t.R + 151),)
    t.write(b"x" * 1460)
    (full,) = t.recv()
    assert len(full.payload) == 1460 and full.sack_blocks == ()
    t.send(t.rx(ACK, t.R + 1, t.L + 1461))
    t.write(b"y" * 100)
    (small,) = t.recv()
    assert small.sack_blocks == ((t.R + 101, t.R + 151),)
