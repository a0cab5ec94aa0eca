"""The stack process's log: one line per event on stderr, which the
launcher shares with the user; rate-limited where a program can cause
events at will."""
import sys


def log(message: str) -> None:
    print(f"mtcpshim stack: {message}", file=sys.stderr, flush=True)


class RateLimitedLog:
    """`limited(now, message)` logs at most `per_second` lines each second
    and then says how many it held back."""

    def __init__(self, per_second: int = 10):
        self.per_second = per_second
        self._second, self._lines, self._suppressed = 0, 0, 0

    def __call__(self, now: float, message: str) -> None:
        second = int(now)
        if second != self._second:
            if self._suppressed:
                log(f"({self._suppressed} more such lines suppressed)")
            self._second, self._lines, self._suppressed = second, 0, 0
        if self._lines < self.per_second:
            self._lines += 1
            log(message)
        else:
            self._suppressed += 1
