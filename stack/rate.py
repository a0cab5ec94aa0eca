"""Delivery rate estimation (draft-cheng-iccrg-delivery-rate-estimation,
as Linux's tcp_rate.c), for model-based congestion control (BBR).

Every transmission takes a snapshot of the connection's delivery state;
the scoreboard keeps it with the record it sent.  When records are
delivered (cumulatively acknowledged or SACKed), the snapshot of the most
recently sent of them says how much had been delivered when it left, so

    rate = (delivered now - delivered then) / max(send interval, ack interval)

over the same data in both directions, which neither ACK compression nor a
burst of sends can inflate.  Counts are in bytes, times in seconds.

A sample taken while the application, not the network, limited the sender
is marked app-limited: it may understate the path and only counts if it
beats the estimate already held.
"""


class Snapshot:
    """The delivery state when a record was (re)sent."""
    __slots__ = ("delivered", "delivered_at", "first_sent_at", "app_limited")

    def __init__(self, delivered: int, delivered_at: float, first_sent_at: float, app_limited: bool):
        self.delivered = delivered
        self.delivered_at = delivered_at
        self.first_sent_at = first_sent_at
        self.app_limited = app_limited


class DeliverySample:
    """What one ACK delivered.  `rate` is None when the interval is too short
    to mean anything (less than the minimum RTT: ACK compression)."""
    __slots__ = ("newly_delivered", "newly_lost", "delivered", "prior_delivered", "interval",
                 "rate", "rtt", "app_limited", "total_delivered")

    def __repr__(self):
        return (f"<DeliverySample +{self.newly_delivered} -{self.newly_lost} rate={self.rate} "
                f"rtt={self.rtt} app_limited={self.app_limited}>")


class DeliveryRate:
    __slots__ = ("delivered", "delivered_at", "first_sent_at", "app_limited_until",
                 "_newest", "_newest_sent_at", "_newly", "_lost", "_rtt", "_snapshot")

    def __init__(self):
        self.delivered = 0                 # bytes delivered since the connection began
        self.delivered_at = 0.0            # when `delivered` last grew
        self.first_sent_at = 0.0           # start of the current send interval
        self.app_limited_until = 0         # nonzero: samples are app-limited until delivered passes it
        self._newest = None                # snapshot of the newest record delivered by this ACK
        self._newest_sent_at = 0.0
        self._newly = 0                    # bytes this ACK delivered
        self._lost = 0                     # bytes this ACK's processing deemed lost
        self._rtt = None                   # RTT of the newest original delivered
        self._snapshot = None              # shared by sends until the state changes

    # ------------------------------------------------------------ sending

    def on_send(self, now: float, nothing_in_flight: bool) -> Snapshot:
        """The snapshot for a (re)transmission at `now`.  After a pause with
        nothing in flight the intervals start afresh, so the idle time is
        not read as a slow path."""
        if nothing_in_flight:
            self.first_sent_at = self.delivered_at = now
            self._snapshot = None
        snapshot = self._snapshot
        if snapshot is None:
            snapshot = self._snapshot = Snapshot(self.delivered, self.delivered_at, self.first_sent_at,
                                                 self.app_limited_until != 0)
        return snapshot

    def mark_app_limited(self, in_flight: int) -> None:
        """The sender ran out of data with room left in its window: samples
        stay app-limited until what is in flight now has been delivered."""
        self.app_limited_until = (self.delivered + in_flight) or 1
        self._snapshot = None

    # ------------------------------------------------------ acknowledgment

    def on_delivered(self, snapshot, sent_at: float, size: int, now: float, retransmitted: bool) -> None:
        """A record sent at `sent_at` with `snapshot` was newly delivered."""
        self._newly += size
        newest = self._newest
        if snapshot is not None and (newest is None or snapshot.delivered > newest.delivered
                                     or (snapshot is newest and sent_at > self._newest_sent_at)):
            self._newest = snapshot
            self._newest_sent_at = sent_at
        if not retransmitted and (self._rtt is None or now - sent_at < self._rtt):
            self._rtt = now - sent_at

    def on_lost(self, size: int) -> None:
        self._lost += size

    @property
    def pending(self) -> bool:
        """Whether this ACK delivered or lost anything."""
        return bool(self._newly or self._lost)

    def sample(self, now: float, min_rtt) -> DeliverySample:
        """Close this ACK's accounting and return its sample."""
        sample = DeliverySample()
        newly = self._newly
        sample.newly_delivered = newly
        sample.newly_lost = self._lost
        sample.rtt = self._rtt
        sample.rate = None
        sample.interval = 0.0
        sample.delivered = 0
        sample.prior_delivered = 0
        sample.app_limited = False
        self._snapshot = None
        if newly:
            self.delivered += newly
            self.delivered_at = now
            if self.app_limited_until and self.delivered > self.app_limited_until:
                self.app_limited_until = 0
        sample.total_delivered = self.delivered
        newest = self._newest
        if newest is not None:
            sample.prior_delivered = newest.delivered
            sample.app_limited = newest.app_limited
            sample.delivered = self.delivered - newest.delivered
            send_interval = self._newest_sent_at - newest.first_sent_at
            ack_interval = now - newest.delivered_at
            interval = send_interval if send_interval > ack_interval else ack_interval
            sample.interval = interval
            if interval > 0 and (min_rtt is None or interval >= min_rtt):
                sample.rate = sample.delivered / interval
            self.first_sent_at = self._newest_sent_at
        self._newest = None
        self._newly = self._lost = 0
        self._rtt = None
        return sample
