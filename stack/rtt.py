"""Round-trip time estimation and the retransmission timeout (RFC 6298
section 2), in seconds, as smoltcp's RttEstimator keeps it apart from the
connection: samples in, SRTT, RTTVAR and RTO out.  Which samples may be
taken (Karn's rule, timestamps) is the connection's business."""

CLOCK_GRANULARITY = 0.001        # G: timestamps tick in milliseconds


class RttEstimator:
    __slots__ = ("srtt", "rttvar", "rto", "_min_rto", "_max_rto")

    def __init__(self, initial_rto: float, min_rto: float, max_rto: float):
        self.srtt = None                   # None until the first sample
        self.rttvar = 0.0
        self.rto = initial_rto
        self._min_rto = min_rto
        self._max_rto = max_rto

    def sample(self, rtt: float) -> None:
        """One measured round trip (RFC 6298 2.2, 2.3), then RTO bounded by
        the minimum and maximum (2.4, 2.5)."""
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        variation = 4 * self.rttvar
        rto = self.srtt + (variation if variation > CLOCK_GRANULARITY else CLOCK_GRANULARITY)
        if rto < self._min_rto:
            rto = self._min_rto
        elif rto > self._max_rto:
            rto = self._max_rto
        self.rto = rto

    def back_off(self) -> None:
        """The retransmission timer expired: double RTO, up to the maximum
        (RFC 6298 5.5)."""
        rto = self.rto * 2
        self.rto = rto if rto < self._max_rto else self._max_rto
