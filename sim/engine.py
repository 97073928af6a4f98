"""The discrete-event engine: a heap of timed callbacks, a virtual clock, one random source.

Rules (everything the simulator reproduces depends on them):
1. Time is virtual: `now` only moves when an event is popped. Nothing here reads a clock,
   starts a thread or opens a socket; wall time is measured by whoever calls `run`.
2. All randomness of a run comes from `self.rng`, one `random.Random` seeded once. Events at
   the same instant run in the order they were scheduled (a sequence number breaks ties),
   so the same seed gives the same run, event for event.
3. Events are never removed from the heap. A component that changes its mind schedules a
   new event and makes the old one a no-op (it checks a token it kept); `skip()` lets it
   say so, and such no-ops are counted apart from `events`.

Must not import asyncio, socket, time, threading or torch.
"""

from __future__ import annotations

import gc
import heapq
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import count

ProgressFn = Callable[[float, int], None]

# CPython's cycle collector scans every young container object at least once (and again in
# each older-generation collection): with thousands of routing tables alive that was a fifth
# to a quarter of a DHT run's CPU at first, and still ~10% with gc.freeze and rare
# collections, for garbage that reference counting frees anyway: the simulated cores and
# the simulator make no reference cycles while a run goes on (tests/sim/test_engine.py
# checks a DHT churn run and a swarm run leave none). So during `run` automatic collection
# is off; it is restored afterwards (then collecting whatever the finished run left).

_quiet_depth = 0


@contextmanager
def quiet_gc() -> Iterator[None]:
    """No automatic cycle collection for the duration (see above); nests."""
    global _quiet_depth
    if _quiet_depth or not gc.isenabled():
        _quiet_depth += 1
        try:
            yield
        finally:
            _quiet_depth -= 1
        return
    gc.disable()
    _quiet_depth += 1
    try:
        yield
    finally:
        _quiet_depth -= 1
        gc.enable()


class Simulator:
    """Runs callbacks in virtual-time order."""

    __slots__ = ("_heap", "_seq", "events", "now", "rng", "seed", "skipped")

    def __init__(self, seed: int, start: float = 0.0):
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = start
        self.events = 0  # callbacks that ran and did work
        self.skipped = 0  # callbacks that found themselves stale (rule 3)
        self._heap: list[tuple[float, int, Callable[..., object], tuple]] = []
        self._seq = count()

    def at(self, when: float, fn: Callable[..., object], *args: object) -> None:
        """Run `fn(*args)` at virtual time `when` (not before now)."""
        if when < self.now:
            when = self.now
        heapq.heappush(self._heap, (when, next(self._seq), fn, args))

    def after(self, delay: float, fn: Callable[..., object], *args: object) -> None:
        """Run `fn(*args)` `delay` seconds from now."""
        heapq.heappush(self._heap, (self.now + max(delay, 0.0), next(self._seq), fn, args))

    def skip(self) -> None:
        """Called by an event that turned out stale: counted in `skipped`, not `events`."""
        self.skipped += 1
        self.events -= 1

    @property
    def pending(self) -> int:
        return len(self._heap)

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def run(
        self,
        until: float,
        *,
        progress: ProgressFn | None = None,
        progress_every: int = 8192,
        max_events: int | None = None,
    ) -> None:
        """Process every event due at or before `until`, then set the clock to `until`.

        `progress(now, events)` is called every `progress_every` popped events (the CLI draws
        its bar there); `max_events` stops early, for tests that bound their work.
        """
        with quiet_gc():
            self._run(until, progress, progress_every, max_events)

    def _run(
        self, until: float, progress: ProgressFn | None, progress_every: int,
        max_events: int | None,
    ) -> None:
        heap = self._heap
        pop = heapq.heappop
        budget = -1 if max_events is None else max_events
        chunk = max(1, progress_every)
        while heap and heap[0][0] <= until and budget != 0:
            n = chunk if budget < 0 else min(chunk, budget)
            done = 0
            while done < n and heap and heap[0][0] <= until:
                when, _, fn, args = pop(heap)
                self.now = when
                fn(*args)
                done += 1
            self.events += done
            if budget > 0:
                budget -= done
            if progress is not None:
                progress(self.now, self.events)
        if budget != 0 and self.now < until:
            self.now = until
