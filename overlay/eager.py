"""Start a coroutine eagerly: run it at once, and make a task only if it has to wait.

Most RPC handlers (a DHT request, an echo) never wait for anything: scheduling a Task for
each (about 9 us of CPU under uvloop, for the task, its weak reference in the task registry,
its done callbacks and a loop iteration) was the largest single cost of serving one. Python
3.12's `eager_start` does exactly this; Python 3.11, which this project supports, lacks it, so
there we run the coroutine's first step ourselves and, if it suspends, hand the suspended
coroutine to a task through a trampoline that passes every value and exception through, so
it goes on exactly as if a task had run it from the start.

One difference on Python 3.11 only: until the coroutine first suspends, it runs outside any
task, so `asyncio.current_task()` is None there (and `asyncio.timeout()` cannot be entered
before the first `await` that suspends).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

EAGER_TASKS = sys.version_info >= (3, 12)


def start_eagerly(loop: asyncio.AbstractEventLoop,
                  coro: Coroutine[Any, Any, None]) -> asyncio.Task | None:
    """Run `coro` until it first suspends. None if it finished then (its exception, if it
    raised one, propagates here); otherwise the task that runs the rest of it."""
    if EAGER_TASKS:  # pragma: no cover - this project's machines run 3.11
        task = asyncio.Task(coro, loop=loop, eager_start=True)
        if task.done():
            task.result()
            return None
        return task
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(_resume(coro, yielded))


async def _resume(coro: Coroutine, yielded: Any) -> Any:
    return await _Trampoline(coro, yielded)


def resume(coro: Coroutine, yielded: Any) -> Any:
    """An awaitable that goes on with `coro`, whose first step (already run by the caller)
    yielded `yielded`: `await resume(coro, yielded)` in a task gives what `coro` returns."""
    return _Trampoline(coro, yielded)


class _Trampoline:
    """Awaitable that continues an already started coroutine inside the awaiting task: what
    the coroutine yielded (the future it waits for) goes up to the task first, then every
    value and exception the task sends is passed down, as `yield from` would."""

    __slots__ = ("_coro", "_yielded")

    def __init__(self, coro: Coroutine, yielded: Any):
        self._coro = coro
        self._yielded = yielded

    def __await__(self):
        coro, yielded = self._coro, self._yielded
        self._coro = self._yielded = None
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as e:  # passed down, as yield from does
                try:
                    yielded = coro.throw(e)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as stop:
                    return stop.value
