"""RFC 6298 section 2 and 5.5, the estimator on its own."""
import pytest

from mtcpshim.stack.rtt import RttEstimator


def test_the_first_sample_sets_srtt_and_half_of_it_as_rttvar():
    rtt = RttEstimator(initial_rto=1.0, min_rto=0.2, max_rto=120.0)
    assert (rtt.srtt, rtt.rto) == (None, 1.0)
    rtt.sample(0.1)
    assert (rtt.srtt, rtt.rttvar) == (0.1, 0.05)
    assert rtt.rto == pytest.approx(0.3)                 # 0.1 + 4 * 0.05


def test_later_samples_are_smoothed_by_one_eighth_and_one_quarter():
    rtt = RttEstimator(1.0, 0.0, 120.0)
    rtt.sample(0.1)
    rtt.sample(0.3)
    assert rtt.rttvar == pytest.approx(0.75 * 0.05 + 0.25 * 0.2)
    assert rtt.srtt == pytest.approx(0.875 * 0.1 + 0.125 * 0.3)
    assert rtt.rto == pytest.approx(rtt.srtt + 4 * rtt.rttvar)


def test_rto_stays_within_its_bounds_and_never_below_the_clock_granularity():
    rtt = RttEstimator(1.0, 0.2, 2.0)
    rtt.sample(0.001)
    assert rtt.rto == 0.2                               # the minimum
    rtt = RttEstimator(1.0, 0.0, 2.0)
    rtt.sample(0.0)
    assert rtt.rto == pytest.approx(0.001)              # srtt + G when rttvar is 0
    rtt.sample(50.0)
    assert rtt.rto == 2.0                               # the maximum


def test_back_off_doubles_up_to_the_maximum():
    rtt = RttEstimator(1.0, 0.2, 3.0)
    rtt.back_off()
    assert rtt.rto == 2.0
    rtt.back_off()
    assert rtt.rto == 3.0
