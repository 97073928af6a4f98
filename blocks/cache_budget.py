"""The attention-cache budget of a server, accounted exactly in block-tokens.

A session of batch b and maximum length L over n blocks holds b * L * n block-tokens from the
moment it opens until it closes, whatever it has filled so far: the server promises that every
open session can grow to its maximum length. Requests wait in arrival order (a large request
is not starved by a stream of small ones) up to the caller's timeout.
"""

from __future__ import annotations

import asyncio
from collections import deque


class CacheFullError(Exception):
    """No room within the caller's timeout (or never: more than the whole budget)."""


class CacheBudget:
    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError("cache capacity must be >= 0")
        self.capacity = capacity
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def try_acquire(self, amount: int) -> bool:
        """Take `amount` now if it is free and nobody waits before it (no waiting)."""
        if not self._waiters and amount <= self.free:
            self.used += amount
            return True
        return False

    async def acquire(self, amount: int, timeout: float) -> None:
        if amount > self.capacity:
            raise CacheFullError(
                f"the session needs {amount} block-tokens of attention cache; this server has "
                f"{self.capacity} in all"
            )
        if self.try_acquire(amount):
            return
        future = asyncio.get_running_loop().create_future()
        entry = (amount, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            if future.done() and not future.cancelled():
                self.release(amount)  # granted just as the timeout fired: give it back
            else:
                self._remove(entry)
            raise CacheFullError(
                f"no room for {amount} block-tokens of attention cache within {timeout:g} s "
                f"({self.free} free of {self.capacity})"
            ) from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(amount)
            else:
                self._remove(entry)
            raise

    def release(self, amount: int) -> None:
        self.used -= amount
        if self.used < 0:  # a bug, not bad input: fail loudly in tests
            raise AssertionError("cache budget released more than it granted")
        self._grant()

    def _remove(self, entry) -> None:
        try:
            self._waiters.remove(entry)
        except ValueError:
            pass
        entry[1].cancel()
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            amount, future = self._waiters.popleft()
            if future.done():
                continue
            self.used += amount
            future.set_result(None)
