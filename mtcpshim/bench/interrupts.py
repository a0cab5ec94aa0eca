"""Ctrl-C and SIGTERM unwind the bench through its `finally` blocks; the
blocks that restore the network hold both signals until they are done."""
import contextlib
import signal
from collections.abc import Iterator

HELD = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def terminate_like_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt as SIGINT does, for the block."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Holds SIGINT and SIGTERM until the block ends; a signal that came
    meanwhile is delivered then, once the cleanup is complete."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
