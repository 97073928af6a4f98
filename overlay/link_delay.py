"""TEST-ONLY artificial network delay, for benchmarks of latency-bound paths on one machine
where `tc qdisc ... netem` is not available (scripts/bench_push.py).

When the environment variable OVERLAY_TEST_LINK_DELAY_MS is set to N > 0 at the time a
`Host` is created, every byte that host's connections write (handshake and records) reaches
the socket N ms later, in order: one-way delay N ms on each direction of each link, so a
round trip between two such hosts takes 2N ms more. Never set by default, never read
anywhere else; reading, pings and flow control are untouched (data waiting out its delay is
not counted by the transport's write-buffer limits, so use it for small messages only).
"""

from __future__ import annotations

import asyncio
import os
from collections import deque

ENV_VAR = "OVERLAY_TEST_LINK_DELAY_MS"
MAX_DELAY_MS = 10_000.0


def delay_from_env() -> float:
    """Seconds of delay asked for by the environment (0.0 when unset)."""
    text = os.environ.get(ENV_VAR, "").strip()
    if not text:
        return 0.0
    try:
        ms = float(text)
    except ValueError:
        raise ValueError(f"{ENV_VAR} must be a number of milliseconds, got {text!r}") from None
    if not 0.0 <= ms <= MAX_DELAY_MS:
        raise ValueError(f"{ENV_VAR} must be in [0, {MAX_DELAY_MS:g}] ms, got {ms:g}")
    return ms / 1000.0


class DelayedTransport:
    """Wraps an asyncio transport: `write` happens `delay` seconds later (one timer per
    burst, FIFO); `close` waits for what is still delayed, `abort` drops it."""

    def __init__(self, transport: asyncio.Transport, delay: float):
        self._transport = transport
        self._delay = delay
        self._loop = asyncio.get_running_loop()
        self._pending: deque[tuple[float, bytes]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._close_after = False

    def write(self, data) -> None:
        if self._transport.is_closing():
            return
        self._pending.append((self._loop.time() + self._delay, bytes(data)))
        if self._timer is None:
            self._timer = self._loop.call_at(self._pending[0][0], self._release)

    def _release(self) -> None:
        self._timer = None
        now = self._loop.time()
        pending = self._pending
        while pending and pending[0][0] <= now:
            self._transport.write(pending.popleft()[1])
        if pending:
            self._timer = self._loop.call_at(pending[0][0], self._release)
        elif self._close_after:
            self._transport.close()

    def close(self) -> None:
        if self._pending:
            self._close_after = True
        else:
            self._transport.close()

    def abort(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._close_after or self._transport.is_closing()

    def __getattr__(self, name):  # get_extra_info, pause_reading, set_write_buffer_limits...
        return getattr(self._transport, name)
