"""A connection's timers on their own, then as a connection arms them."""
from mtcpshim.stack.timers import Timer, Timers

MSS = 1460


def test_the_earliest_deadline_counts_every_timer_and_keepalive():
    timers = Timers()
    assert timers.earliest() is None
    timers.delayed_ack, timers.persist = 5.0, 3.0
    assert timers.earliest() == 3.0
    assert timers.earliest(keepalive=2.0) == 2.0
    timers.linger = 1.0
    assert timers.earliest(keepalive=2.0) == 1.0


def test_an_expired_timer_is_disarmed_and_a_pending_one_stays():
    timers = Timers()
    timers.rack, timers.delayed_ack = 1.0, 2.0
    assert not timers.expired(Timer.DELAYED_ACK, 1.5)
    assert timers.expired(Timer.RACK, 1.5)
    assert not timers.expired(Timer.RACK, 1.5)          # once
    assert timers.armed() == {Timer.DELAYED_ACK: 2.0}


def test_the_tail_probe_and_the_retransmission_timeout_share_one_timer():
    timers = Timers()
    timers.arm_tail_probe(1.0)
    assert timers.retransmit_armed() and timers.armed() == {Timer.TAIL_PROBE: 1.0}
    timers.arm_retransmit(2.0)
    assert timers.armed() == {Timer.RETRANSMIT: 2.0}
    timers.arm_tail_probe(1.5)
    assert timers.armed() == {Timer.TAIL_PROBE: 1.5}


def test_time_wait_keeps_only_its_linger():
    timers = Timers()
    timers.rack, timers.persist, timers.delayed_ack, timers.linger = 1.0, 2.0, 3.0, 60.0
    timers.arm_retransmit(4.0)
    timers.stop_sending()
    assert timers.armed() == {Timer.LINGER: 60.0}


def test_a_flight_is_probed_once_then_timed_out(make_tcp_trace):
    t = make_tcp_trace()
    t.establish(sack_permitted=True)
    t.write(bytes(4 * MSS))
    t.recv()
    assert list(t.conn.timers.armed()) == [Timer.TAIL_PROBE]
    t.wait_for_timer()
    assert len(t.recv()) == 1                            # the probe
    assert list(t.conn.timers.armed()) == [Timer.RETRANSMIT]
    t.wait_for_timer()
    assert len(t.recv()) == 1 and t.conn.recovery_counts["timeouts"] == 1
