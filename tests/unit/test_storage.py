from mtcpshim.stack.storage import Assembler, RingBuffer


def test_ring_write_read_wraps():
    ring = RingBuffer(8)
    assert ring.write(b"abcdef") == 6
    assert ring.read(4) == b"abcd"
    assert ring.write(b"ghijklmn") == 6          # only 6 bytes free
    assert len(ring) == 8 and ring.space() == 0
    assert ring.read(100) == b"efghijkl"
    assert len(ring) == 0


def test_ring_as_send_buffer_peeks_across_wrap_and_consumes():
    ring = RingBuffer(8)
    ring.write(b"012345")
    ring.consume(5)
    ring.write(b"6789ab")
    assert ring.peek(0, 7) == b"56789ab"
    assert ring.peek(2, 3) == b"789"
    assert ring.peek(6, 5) == b"b"
    assert ring.peek(7, 5) == b""
    ring.consume(100)
    assert len(ring) == 0


def test_assembler_holds_out_of_order_until_gap_fills():
    asm = Assembler()
    assert asm.add(4, b"efgh")
    assert asm.pop_contiguous() == b""
    asm.add(0, b"abcd")
    assert asm.pop_contiguous() == b"abcdefgh"
    assert not asm


def test_assembler_overlaps_keep_existing_bytes():
    asm = Assembler()
    asm.add(2, b"CD")
    asm.add(6, b"GH")
    asm.add(1, b"bcdefghij")                   # bridges both ranges
    assert asm.sack_blocks() == [(1, 10)]
    asm.add(0, b"a")
    assert asm.pop_contiguous() == b"abCDefGHij"


def test_assembler_overlap_names_the_first_stretch_already_held():
    asm = Assembler()
    asm.add(100, b"x" * 50)
    asm.add(200, b"y" * 50)
    assert asm.overlap(0, 100) is None
    assert asm.overlap(150, 200) is None
    assert asm.overlap(120, 220) == (120, 150)
    assert asm.overlap(0, 1000) == (100, 150)
    assert asm.overlap(210, 220) == (210, 220)
    asm.advance(120)
    assert asm.overlap(0, 10) == (0, 10)


def test_assembler_advance_trims_and_offsets_follow_reader():
    asm = Assembler()
    asm.add(10, b"0123456789")
    asm.advance(12)
    assert asm.sack_blocks() == [(0, 8)]
    assert asm.pop_contiguous(3) == b"234"
    assert asm.pop_contiguous() == b"56789"


def test_assembler_sack_blocks_latest_first():
    asm = Assembler()
    asm.add(10, b"x" * 5)
    asm.add(30, b"y" * 5)
    asm.add(20, b"z" * 5)
    assert asm.sack_blocks() == [(20, 25), (10, 15), (30, 35)]
    assert asm.sack_blocks(2) == [(20, 25), (10, 15)]


def test_assembler_range_limit_prefers_data_near_reader():
    asm = Assembler(max_ranges=2)
    asm.add(10, b"a")
    asm.add(20, b"b")
    assert not asm.add(30, b"c")               # beyond everything: dropped
    assert asm.add(5, b"d")                    # nearer: evicts offset 20
    assert sorted(asm.sack_blocks()) == [(5, 6), (10, 11)]
