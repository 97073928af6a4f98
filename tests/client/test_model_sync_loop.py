"""The background event loop under the synchronous model: results, errors, cancellation,
tracked resources closed on stop, and no use after stop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from client.sync_loop import BackgroundLoop, LoopClosedError, shared_loop


@pytest.fixture
def loop():
    background = BackgroundLoop(name="test-loop")
    yield background
    background.stop()


def test_runs_coroutines_on_its_own_thread(loop):
    async def where():
        await asyncio.sleep(0)
        return threading.current_thread().name

    assert loop.run(where()) == "test-loop"
    assert not loop.in_loop_thread()


def test_errors_reach_the_caller(loop):
    async def fail():
        raise KeyError("nope")

    with pytest.raises(KeyError, match="nope"):
        loop.run(fail())


def test_a_timeout_cancels_the_coroutine(loop):
    cancelled = threading.Event()

    async def slow():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        loop.run(slow(), timeout=0.05)
    assert cancelled.wait(5)


def test_run_inside_the_loop_is_refused(loop):
    async def nested():
        inner = asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="await instead"):
            loop.run(inner)
        return True

    assert loop.run(nested())


class Resource:
    def __init__(self) -> None:
        self.closed_on: str | None = None

    async def close(self) -> None:
        await asyncio.sleep(0)
        self.closed_on = threading.current_thread().name


def test_stop_closes_tracked_resources_then_refuses_work():
    loop = BackgroundLoop(name="stopping")
    resource = Resource()
    loop.track(resource)

    async def pending_forever():
        await asyncio.sleep(3600)

    future = loop.submit(pending_forever())
    loop.stop()
    assert resource.closed_on == "stopping"
    assert future.cancelled() or future.done()
    assert loop.loop.is_closed()
    with pytest.raises(LoopClosedError):
        loop.run(asyncio.sleep(0))
    loop.stop()  # idempotent


def test_tracking_is_weak():
    import gc

    loop = BackgroundLoop()
    try:
        loop.track(Resource())
        gc.collect()
        assert len(loop._tracked) == 0
    finally:
        loop.stop()


def test_shared_loop_is_one_per_process():
    assert shared_loop() is shared_loop()
    assert not shared_loop().closed
