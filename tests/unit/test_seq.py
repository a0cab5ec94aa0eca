from mtcpshim.stack.seq import seq_add, seq_diff, seq_ge, seq_gt, seq_le, seq_lt

TOP = 0xFFFFFFFF


def test_ordering_without_wrap():
    assert seq_lt(1, 2) and seq_le(1, 2) and seq_le(2, 2)
    assert seq_gt(2, 1) and seq_ge(2, 1) and seq_ge(2, 2)
    assert not seq_lt(2, 2) and not seq_gt(2, 2)


def test_ordering_across_wrap():
    assert seq_lt(TOP, 0)
    assert seq_lt(TOP - 5, 10)
    assert seq_gt(10, TOP - 5)
    assert seq_le(TOP, 0) and seq_ge(0, TOP)


def test_add_wraps():
    assert seq_add(TOP, 1) == 0
    assert seq_add(TOP - 1, 10) == 8
    assert seq_add(3, -5) == TOP - 1


def test_diff_is_signed_distance():
    assert seq_diff(5, 3) == 2
    assert seq_diff(3, 5) == -2
    assert seq_diff(2, TOP - 1) == 4
    assert seq_diff(TOP - 1, 2) == -4
    assert seq_diff(0x80000000, 0) == -0x80000000
    assert seq_diff(0x7FFFFFFF, 0) == 0x7FFFFFFF
