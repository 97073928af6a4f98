"""Many deadlines under one event-loop timer (the asyncio driver's, not protocol logic).

Every RPC has a deadline, and almost every RPC finishes long before it: arming and cancelling
an event-loop timer per call (`loop.call_at` + `cancel`, about 3 us under uvloop) was a
visible part of a call's CPU time. Here a call's deadline is one entry pushed on a heap
(heapq, in C); a finished call marks its entry dead. One loop timer is armed at the earliest
entry and re-armed only when an earlier one arrives, or when it fires; dead entries are
dropped when they reach the top, and the heap is compacted when they outnumber live ones, so
its size stays proportional to the calls in flight.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# A deadline this close ahead counts as reached when the timer fires: uvloop's clock and its
# timers have millisecond resolution, so a timer may fire a fraction of a millisecond early.
SLACK = 0.001
# Compact the heap when dead entries exceed both this count and the live entries.
COMPACT_MIN = 64


class Deadlines:
    """Deadlines on one event loop: `add(when, callback, arg)` calls `callback(arg)` at loop
    time `when` unless `cancel(entry)` came first. Callbacks run on the loop, in deadline
    order; one that raises is logged and the others still run."""

    __slots__ = ("_armed_for", "_dead", "_handle", "_heap", "_loop", "_seq")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._heap: list[list] = []  # [when, seq, callback or None when cancelled, arg]
        self._seq = itertools.count()
        self._dead = 0
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = 0.0

    @property
    def pending(self) -> int:
        """Deadlines still to come (not fired, not cancelled)."""
        return len(self._heap) - self._dead

    def add(self, when: float, callback: Callable[[Any], None], arg: Any = None) -> list:
        entry = [when, next(self._seq), callback, arg]
        heapq.heappush(self._heap, entry)
        if self._handle is None or when < self._armed_for:
            self._arm(when)
        return entry

    def cancel(self, entry: list) -> None:
        if entry[2] is None:
            return
        entry[2] = entry[3] = None
        self._dead += 1
        if self._dead > COMPACT_MIN and self._dead * 2 > len(self._heap):
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._dead = 0

    def close(self) -> None:
        """Drop every deadline without calling it."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        for entry in self._heap:
            entry[2] = entry[3] = None
        self._heap.clear()
        self._dead = 0

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_for = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        limit = self._loop.time() + SLACK
        # self._heap is read again at every step: a callback may cancel (and so compact).
        while self._heap and self._heap[0][0] <= limit:
            entry = heapq.heappop(self._heap)
            callback, arg = entry[2], entry[3]
            if callback is None:
                self._dead -= 1
                continue
            entry[2] = entry[3] = None
            try:
                callback(arg)
            except Exception:
                log.exception("deadline callback %r failed", callback)
        # Dead entries left at the top would only cause an early wake-up: skip them.
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
            self._dead -= 1
        if heap and self._handle is None:
            self._arm(heap[0][0])
