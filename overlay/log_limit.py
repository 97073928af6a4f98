"""Rate-limited log lines, so that a hostile peer cannot fill an operator's disk.

Lines a peer can cause at will (a malformed DHT request, a connection it aborts) are logged at
most `burst` times per `interval` seconds for each kind (`key`, a short fixed string: one
kind's flood does not hide the others). The lines beyond are counted, and the first line of
that kind after the interval is preceded by one summary line with the count. Pure bookkeeping:
the clock is the caller's (`clock`, or `now` passed to `log_at` by sans-IO code), so tests
step time by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

DEFAULT_BURST = 20
DEFAULT_INTERVAL = 60.0
# Kinds remembered at once; beyond, the oldest is forgotten (a caller whose keys are not a
# fixed set cannot make this grow).
MAX_KEYS = 256


class LogLimiter:
    """At most `burst` lines of each kind per `interval` seconds, then a count of the rest."""

    def __init__(self, logger: logging.Logger, *, burst: int = DEFAULT_BURST,
                 interval: float = DEFAULT_INTERVAL,
                 clock: Callable[[], float] | None = None):
        if burst < 1 or interval <= 0:
            raise ValueError(f"burst must be >= 1 and interval > 0, not {burst}, {interval}")
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.clock = clock
        # key -> [window start, lines logged in it, lines suppressed in it]
        self._windows: dict[str, list] = {}

    def log(self, level: int, key: str, msg: str, *args) -> bool:
        """`log_at` now, by the clock given at construction."""
        return self.log_at(self.clock(), level, key, msg, *args)

    def log_at(self, now: float, level: int, key: str, msg: str, *args) -> bool:
        """Log `msg % args` unless `key` had its `burst` of lines in the interval around
        `now`; returns whether it was logged."""
        if not self.logger.isEnabledFor(level):
            return False
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval:
            if window is not None:
                del self._windows[key]  # (re-inserted last: the oldest key goes first)
                if window[2]:
                    self.logger.log(level, "%s: %d more lines suppressed (at most %d per "
                                    "%g s are logged)", key, window[2], self.burst,
                                    self.interval)
            elif len(self._windows) >= MAX_KEYS:
                del self._windows[next(iter(self._windows))]
            window = self._windows[key] = [now, 0, 0]
        if window[1] >= self.burst:
            window[2] += 1
            return False
        window[1] += 1
        self.logger.log(level, msg, *args)
        return True

    def suppressed(self, key: str) -> int:
        """Lines of `key` suppressed in its current interval, not yet summarized."""
        window = self._windows.get(key)
        return 0 if window is None else window[2]
