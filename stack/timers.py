"""A connection's timers: one deadline per kind, one earliest deadline for
the host (smoltcp's `enum Timer` and `poll_at`, Linux's icsk timers).

Deadlines are absolute times in seconds, None when not armed.  The
connection decides when to arm each; this class only keeps them, answers
which is next, and hands out the expired ones in the order the connection
serves them.  Keepalive is not stored: its deadline follows from when the
peer was last heard, so the connection passes it in.
"""
import enum


class Timer(enum.IntEnum):
    """The stored timers, in service order when several are due at once
    (keepalive, derived, comes last)."""
    LINGER = 0         # TIME_WAIT, or an orphaned FIN_WAIT_2, is over: close
    RACK = 1           # RACK's reordering window ran out (RFC 8985 6.2 step 5)
    TAIL_PROBE = 2     # a tail loss probe goes (RFC 8985 section 7)
    RETRANSMIT = 3     # retransmission timeout (RFC 6298)
    PERSIST = 4        # zero-window probe, or the sender SWS override (RFC 9293 3.8.6.2.1)
    DELAYED_ACK = 5    # the ACK held back for a second segment goes (RFC 5681 4.2)


class Timers:
    # TAIL_PROBE and RETRANSMIT share Linux's one retransmission timer: at
    # most one of them is armed, and arming either disarms the other.
    __slots__ = ("linger", "rack", "tail_probe", "retransmit", "persist", "delayed_ack")

    def __init__(self):
        self.linger = None
        self.rack = None
        self.tail_probe = None
        self.retransmit = None
        self.persist = None
        self.delayed_ack = None

    def arm_retransmit(self, when: float) -> None:
        self.retransmit = when
        self.tail_probe = None

    def arm_tail_probe(self, when: float) -> None:
        self.tail_probe = when
        self.retransmit = None

    def retransmit_armed(self) -> bool:
        """Whether the retransmission timer runs, as a probe or a timeout."""
        return self.retransmit is not None or self.tail_probe is not None

    def stop_sending(self) -> None:
        """Nothing will be sent or acknowledged again (TIME_WAIT, CLOSED)."""
        self.rack = self.tail_probe = self.retransmit = self.persist = self.delayed_ack = None

    def earliest(self, keepalive=None):
        """The next deadline of all, keepalive's included; None if none.
        Runs after every segment: the busy timers come first."""
        earliest = self.retransmit
        for moment in (self.tail_probe, self.delayed_ack, self.rack):
            if moment is not None and (earliest is None or moment < earliest):
                earliest = moment
        for moment in (self.persist, self.linger, keepalive):
            if moment is not None and (earliest is None or moment < earliest):
                earliest = moment
        return earliest

    def expired(self, timer: Timer, now: float) -> bool:
        """Whether `timer` is due at `now`; if so it is disarmed, so that
        its handler may arm it again."""
        name = _NAMES[timer]
        moment = getattr(self, name)
        if moment is None or now < moment:
            return False
        setattr(self, name, None)
        return True

    def armed(self) -> dict:
        """Timer -> deadline of every armed timer."""
        return {timer: getattr(self, _NAMES[timer]) for timer in Timer
                if getattr(self, _NAMES[timer]) is not None}


_NAMES = {timer: timer.name.lower() for timer in Timer}
