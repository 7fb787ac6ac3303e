"""One log throttle for the daemons' warnings about peers: a refused peer reconnects
about ten times a second (libzmq resets its backoff after each TCP connect), and a
peer sending junk as fast as it can must not fill the disk, or spend our time."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["LogThrottle", "more"]


class LogThrottle:
    """At most ``burst`` log lines per key every ``seconds``; the first line let through
    after some were held back says how many (:func:`more`)."""

    def __init__(
        self, seconds: float = 10.0, burst: int = 1, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.seconds = seconds
        self.burst = burst
        self.clock = clock
        # key -> (this window's start, lines let through in it, held back since the last)
        self._windows: dict[str, tuple[float, int, int]] = {}

    def admit(self, key: str = "") -> int | None:
        """None: hold this line back; else log it, saying how many were held back."""
        now = self.clock()
        start, count, held = self._windows.get(key, (float("-inf"), 0, 0))
        if now - start >= self.seconds:
            start, count = now, 0
        if count >= self.burst:
            self._windows[key] = (start, count, held + 1)
            return None
        if key not in self._windows and len(self._windows) >= 4096:
            self._windows.clear()  # many addresses: forget rather than grow
        self._windows[key] = (start, count + 1, 0)
        return held

    def warning(self, log: logging.Logger, fmt: str, *args: object, key: str = "") -> None:
        """``log.warning(fmt, *args)`` unless held back."""
        held = self.admit(key)
        if held is not None:
            log.warning(fmt + "%s", *args, more(held))


def more(held: int) -> str:
    """The end of a line let through after ``held`` were held back."""
    return f" ({held} more like it held back)" if held else ""
