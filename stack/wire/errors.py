"""The one exception every wire parser raises."""


class WireError(Exception):
    """A packet failed validation.

    `reason` is a short stable string ("tcp_truncated", "tcp_bad_checksum",
    ...) that the runtime uses as a drop-counter key.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
