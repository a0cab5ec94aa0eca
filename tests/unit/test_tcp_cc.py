"""Congestion control: NewReno (RFC 5681) and CUBIC (RFC 9438) through the
controller interface, then selection per connection."""
from types import SimpleNamespace

import pytest

from mtcpshim.stack import cc
from mtcpshim.stack.tcp import TcpConfig
from mtcpshim.stack.wire.tcp import ACK

MSS = 1000


def window(segments, ssthresh_segments=1 << 20, srtt=0.1):
    """The fields of a connection a controller reads and writes."""
    return SimpleNamespace(cwnd=segments * MSS, ssthresh=ssthresh_segments * MSS,
                           send_mss=MSS, rtt=SimpleNamespace(srtt=srtt))


def run_rtts(controller, conn, rtts, start=0.0):
    """Every round trip, one ACK per segment of the window, all at once."""
    now = start
    for _ in range(rtts):
        for _ in range(conn.cwnd // MSS):
            controller.on_ack(conn, MSS, now)
        now += conn.rtt.srtt
    return now


@pytest.mark.parametrize("name", ["reno", "cubic"])
def test_slow_start_doubles_per_round_trip_up_to_ssthresh(name):
    controller, conn = cc.create(name), window(10, ssthresh_segments=30)
    run_rtts(controller, conn, 1)
    assert conn.cwnd == 20 * MSS
    controller.on_ack(conn, 15 * MSS, 0.2)               # crosses ssthresh
    assert 30 * MSS <= conn.cwnd < 31 * MSS               # the rest goes to avoidance


def test_reno_avoidance_adds_one_segment_per_window():
    controller, conn = cc.NewReno(), window(20, ssthresh_segments=10)
    run_rtts(controller, conn, 5)
    assert conn.cwnd == 25 * MSS


def test_reno_halves_the_flight_on_loss():
    controller, conn = cc.NewReno(), window(20)
    controller.on_congestion(conn, 16 * MSS, 0.0)
    assert conn.ssthresh == 8 * MSS
    controller.on_congestion(conn, MSS, 0.0)
    assert conn.ssthresh == 2 * MSS                      # never below two segments


def test_cubic_reduces_by_beta_and_regrows_to_the_old_window_after_k():
    controller, conn = cc.Cubic(), window(100)
    controller.on_congestion(conn, 100 * MSS, 0.0)
    assert conn.ssthresh == 70 * MSS
    conn.cwnd = conn.ssthresh
    # K = cbrt((W_max - cwnd) / C) = cbrt(30 / 0.4), about 4.2 s.
    now = run_rtts(controller, conn, 42, start=1.0)
    assert controller._k == pytest.approx(75 ** (1 / 3))
    assert 97 * MSS <= conn.cwnd <= 103 * MSS
    # Concave then convex: slow near W_max, faster again beyond it.
    near_plateau = conn.cwnd
    now = run_rtts(controller, conn, 10, start=now)
    plateau_growth = conn.cwnd - near_plateau
    before = conn.cwnd
    run_rtts(controller, conn, 10, start=now)
    assert conn.cwnd - before > 2 * plateau_growth


def test_cubic_fast_convergence_lowers_w_max_after_consecutive_losses():
    controller, conn = cc.Cubic(), window(100)
    controller.on_congestion(conn, 100 * MSS, 0.0)
    conn.cwnd = 80 * MSS                                 # lost again below W_max
    controller.on_congestion(conn, 80 * MSS, 10.0)
    assert controller._w_max == pytest.approx(80 * (1 + 0.7) / 2)
    assert conn.ssthresh == 56 * MSS


def test_cubic_is_never_slower_than_reno_at_short_round_trips():
    controller, conn = cc.Cubic(), window(10, srtt=0.001)
    controller.on_congestion(conn, 10 * MSS, 0.0)
    conn.cwnd = conn.ssthresh
    # 100 round trips of 1 ms: the cubic curve has barely moved (K is 2 s),
    # the Reno estimate gained about a segment per round trip.
    run_rtts(controller, conn, 100, start=0.0)
    assert 90 * MSS <= conn.cwnd <= 110 * MSS


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError):
        cc.create("vegas")


def test_connection_uses_the_configured_algorithm_and_can_switch(make_tcp_trace):
    t = make_tcp_trace(config=TcpConfig(timestamps=False, congestion="reno"))
    t.establish()
    assert t.conn.congestion == "reno"
    t.conn.congestion = "cubic"                          # setsockopt(TCP_CONGESTION)
    assert t.conn.congestion == "cubic"
    with pytest.raises(ValueError):
        t.conn.congestion = "vegas"
    assert t.conn.congestion == "cubic"
    # A fast retransmit now reduces by CUBIC's beta: 0.7 of 10 segments.
    t.write(bytes(10 * 1460))
    t.recv()
    duplicate = t.rx(ACK, t.R + 1, t.L + 1)
    t.send(duplicate, duplicate, duplicate)
    assert t.conn.ssthresh == int(10 * 1460 * 0.7)


def test_default_is_cubic_with_an_initial_window_of_ten(tcp_established):
    t = tcp_established
    assert t.conn.congestion == "cubic"
    assert t.conn.cwnd == 10 * 1460


def test_cubic_after_a_timeout_starts_its_curve_where_avoidance_begins():
    """RFC 9438 4.8: K = 0 and W_max = the window avoidance starts at, not
    the window before the timeout."""
    controller, conn = cc.Cubic(), window(100)
    controller.on_rto(conn, 100 * MSS, 0.0)
    assert conn.ssthresh == 70 * MSS
    conn.cwnd = conn.ssthresh                            # slow start has ended
    run_rtts(controller, conn, 1, start=1.0)
    assert controller._k == 0.0 and controller._w_max == 70


def test_cubic_undo_takes_back_the_curve_with_the_window():
    """RFC 9438 4.9: after a spurious reduction the curve is the old one."""
    controller, conn = cc.Cubic(), window(60)
    controller.on_congestion(conn, 60 * MSS, 0.0)        # a first, real loss
    conn.cwnd = conn.ssthresh
    now = run_rtts(controller, conn, 3, start=1.0)
    curve = (controller._w_max, controller._k, controller._epoch_start)
    controller.on_congestion(conn, conn.cwnd, now)       # then a spurious one
    controller.on_undo(conn)
    assert (controller._w_max, controller._k, controller._epoch_start) == curve


def test_cubic_does_not_count_an_idle_pause_as_time_on_its_curve():
    """RFC 9438 5.8 (Linux CA_EVENT_TX_START): the epoch moves on by the pause."""
    controller, conn = cc.Cubic(), window(100)
    controller.on_congestion(conn, 100 * MSS, 0.0)
    conn.cwnd = conn.ssthresh
    now = run_rtts(controller, conn, 3, start=1.0)
    epoch, cwnd = controller._epoch_start, conn.cwnd
    controller.on_transmit_start(conn, 30.0, now + 30.0)
    assert controller._epoch_start == epoch + 30.0
    controller.on_ack(conn, MSS, now + 30.0)
    assert conn.cwnd - cwnd < MSS                        # where it was, not 30 s up the curve


def grown_connection(make_tcp_trace, segments, **config):
    """An established connection whose cwnd grew to `segments` in slow
    start, everything acknowledged."""
    t = make_tcp_trace(config=TcpConfig(timestamps=False, **config), send_buffer_size=200 * 1460)
    t.establish()
    while t.conn.cwnd < segments * 1460:
        t.write(bytes(t.conn.cwnd))
        t.recv()
        t.now += 0.010
        t.send(t.rx(ACK, t.R + 1, t.conn.snd_max))
    t.recv()
    t.conn.cwnd = segments * 1460
    return t


def test_after_idle_longer_than_rto_cwnd_halves_per_rto_down_to_the_initial_window(make_tcp_trace):
    t = grown_connection(make_tcp_trace, 80)
    t.conn.ssthresh = 40 * 1460
    rto = t.conn.rtt.rto
    t.now += 2.5 * rto                                   # idle: two halvings
    t.write(bytes(100 * 1460))
    assert len(t.recv()) == 20
    # ssthresh keeps three quarters of what the window was (Linux
    # tcp_current_ssthresh), so slow start climbs back quickly.
    assert (t.conn.cwnd, t.conn.ssthresh) == (20 * 1460, 60 * 1460)


def test_after_a_long_idle_cwnd_is_the_initial_window(make_tcp_trace):
    t = grown_connection(make_tcp_trace, 80)
    t.now += 10 * t.conn.rtt.rto
    t.write(bytes(100 * 1460))
    assert len(t.recv()) == 10 and t.conn.cwnd == 10 * 1460


def test_a_pause_shorter_than_rto_keeps_the_window(make_tcp_trace):
    t = grown_connection(make_tcp_trace, 30)
    t.now += 0.5 * t.conn.rtt.rto
    t.write(bytes(40 * 1460))
    assert len(t.recv()) == 30


def test_restart_after_idle_can_be_turned_off(make_tcp_trace):
    t = grown_connection(make_tcp_trace, 30, slow_start_after_idle=False)
    t.now += 10 * t.conn.rtt.rto
    t.write(bytes(40 * 1460))
    assert len(t.recv()) == 30
