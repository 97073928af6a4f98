"""A background asyncio event loop, so that synchronous code can drive the asyncio client.

The client is asyncio-native; the transformers-style wrapper (client/causal_lm.py) is
synchronous. It does not run its own event loop per call (connections, DHT state and open
inference sessions live on one loop and must stay there): it submits coroutines to one loop
running on a daemon thread and waits for their results. One loop serves the whole process; it is
started on first use and stopped at interpreter exit. Objects living on the loop (swarm
connections, models) are tracked weakly and closed, on the loop, before it stops: servers see a
clean goodbye rather than a dropped connection.

This module may not import torch: it is plumbing, not model code.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import threading
import weakref
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

# Seconds to wait for the loop thread to finish its pending callbacks when it is stopped.
STOP_TIMEOUT = 10.0


class AsyncClosable(Protocol):
    async def close(self) -> None: ...


class LoopClosedError(RuntimeError):
    """Work was submitted to a background loop that has been stopped."""


class BackgroundLoop:
    """An event loop on its own daemon thread; `run(coro)` blocks the caller until it is done."""

    def __init__(self, name: str = "overlay-client") -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._tracked: weakref.WeakSet[AsyncClosable] = weakref.WeakSet()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        try:
            self._loop.run_forever()
        finally:
            self._finish()

    def _finish(self) -> None:
        """Cancel what is left, let it unwind, close the loop (on the loop's own thread)."""
        loop = self._loop
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def closed(self) -> bool:
        return self._closed

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule `coro` on the loop; the caller may wait on the returned future."""
        with self._lock:
            if self._closed:
                coro.close()
                raise LoopClosedError("the client's background event loop has been stopped")
            return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and return its result (or raise its exception).

        If the caller is interrupted (Ctrl-C) or `timeout` passes, the coroutine is cancelled
        on the loop, so nothing keeps running behind the caller's back.
        """
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("BackgroundLoop.run called from its own loop thread: await instead")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no result within {timeout:g} s") from None
        except BaseException:
            future.cancel()
            raise

    def track(self, resource: AsyncClosable) -> None:
        """Close `resource` (on the loop) when the loop stops, unless it is gone by then."""
        self._tracked.add(resource)

    def stop(self) -> None:
        """Close tracked resources, stop the loop (cancelling what is left), join its thread.
        Idempotent."""
        with self._lock:
            if self._closed:
                return
            resources = list(self._tracked)
        if resources and not self.in_loop_thread():
            with contextlib.suppress(Exception):
                self.run(_close_all(resources), timeout=STOP_TIMEOUT)
        with self._lock:
            self._closed = True
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if not self.in_loop_thread():
            self._thread.join(STOP_TIMEOUT)


async def _close_all(resources: list[AsyncClosable]) -> None:
    await asyncio.gather(*(resource.close() for resource in resources), return_exceptions=True)


_shared: BackgroundLoop | None = None
_shared_lock = threading.Lock()


def shared_loop() -> BackgroundLoop:
    """The process-wide background loop, started on first use and stopped at exit."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.closed:
            _shared = BackgroundLoop()
            atexit.register(_shared.stop)
        return _shared


__all__ = ["BackgroundLoop", "LoopClosedError", "shared_loop"]
