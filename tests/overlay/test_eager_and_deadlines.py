"""The unary fast path's helpers: eager start of handlers, shared deadline timers, and the
host serving through them (loopback, real sockets)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from overlay.deadlines import COMPACT_MIN, Deadlines
from overlay.eager import start_eagerly
from overlay.host import Host, RemoteError, RpcTimeout


# ---------------------------------------------------------------- start_eagerly
async def test_a_coroutine_that_never_waits_runs_to_the_end_without_a_task():
    loop = asyncio.get_running_loop()
    seen = []

    async def quick():
        seen.append("ran")

    assert start_eagerly(loop, quick()) is None
    assert seen == ["ran"]  # at once, not on a later loop iteration


async def test_an_exception_before_the_first_wait_reaches_the_caller():
    async def broken():
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        start_eagerly(asyncio.get_running_loop(), broken())


async def test_a_coroutine_that_waits_goes_on_in_a_task_with_values_and_errors():
    loop = asyncio.get_running_loop()
    first, second = loop.create_future(), loop.create_future()
    log = []

    async def waits():
        log.append("start")
        log.append(await first)
        try:
            await second
        except KeyError as e:
            log.append(f"caught {e}")
        await asyncio.sleep(0)  # a bare yield goes through as well
        log.append("end")
        return "result"

    task = start_eagerly(loop, waits())
    assert isinstance(task, asyncio.Task) and log == ["start"]
    first.set_result("value")
    await asyncio.sleep(0)
    second.set_exception(KeyError("k"))
    assert await task == "result"
    assert log == ["start", "value", "caught 'k'", "end"]


async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits():
    loop = asyncio.get_running_loop()
    cleaned = []

    async def waits():
        try:
            await loop.create_future()
        finally:
            cleaned.append(True)

    task = start_eagerly(loop, waits())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]


# ---------------------------------------------------------------- Deadlines
async def test_deadlines_fire_in_order_and_cancelled_ones_never():
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    fired = []
    now = loop.time()
    deadlines.add(now + 0.06, fired.append, "late")
    cancelled = deadlines.add(now + 0.03, fired.append, "cancelled")
    deadlines.add(now + 0.02, fired.append, "early")  # earlier than the armed timer
    deadlines.cancel(cancelled)
    deadlines.cancel(cancelled)  # twice is harmless
    assert deadlines.pending == 2
    await asyncio.sleep(0.15)
    assert fired == ["early", "late"] and deadlines.pending == 0


async def test_a_failing_deadline_callback_is_logged_and_the_others_still_run(caplog):
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    fired = []

    def boom(_arg):
        raise RuntimeError("boom")

    deadlines.add(loop.time() + 0.01, boom)
    deadlines.add(loop.time() + 0.01, fired.append, "after")
    with caplog.at_level(logging.ERROR, logger="overlay.deadlines"):
        await asyncio.sleep(0.1)
    assert fired == ["after"] and "boom" in caplog.text


async def test_cancelled_deadlines_do_not_pile_up():
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    for _ in range(10_000):  # calls that all finish long before their deadline
        deadlines.cancel(deadlines.add(loop.time() + 60, print))
    assert deadlines.pending == 0
    assert len(deadlines._heap) <= 2 * COMPACT_MIN + 2
    deadlines.close()


# ---------------------------------------------------------------- the host's unary path
@pytest.fixture
async def pair():
    server, client = Host(), Host()
    [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")
    yield server, client, addr
    await client.close()
    await server.close()


async def test_handlers_that_never_wait_are_served_without_tasks(pair):
    server, client, addr = pair
    tasks_seen = []

    async def echo(ctx, payload):
        tasks_seen.append(len(server._tasks))
        return payload

    server.add_handler("echo", echo)
    answers = await asyncio.gather(*(client.call(addr, "echo", bytes([i]) * 100)
                                     for i in range(50)))
    assert answers == [bytes([i]) * 100 for i in range(50)]
    assert set(tasks_seen) == {0} and not server._tasks
    # Every call's deadline was withdrawn when its answer came.
    assert client._deadlines.pending == 0


async def test_handlers_that_wait_are_answered_later_and_errors_keep_their_codes(pair):
    server, client, addr = pair
    loop = asyncio.get_running_loop()

    async def later(ctx, payload):
        await asyncio.sleep(0.01)
        await asyncio.sleep(0)
        return payload[::-1]

    async def fails_later(ctx, payload):
        await asyncio.sleep(0.01)
        raise RemoteError("busy", "try again")

    async def returns_no_bytes(ctx, payload):
        return 42

    server.add_handler("later", later)
    server.add_handler("fails_later", fails_later)
    server.add_handler("returns_no_bytes", returns_no_bytes)
    results = await asyncio.gather(*(client.call(addr, "later", b"abc%d" % i) for i in range(20)))
    assert results == [(b"abc%d" % i)[::-1] for i in range(20)]
    with pytest.raises(RemoteError) as info:
        await client.call(addr, "fails_later", b"")
    assert (info.value.code, info.value.message) == ("busy", "try again")
    with pytest.raises(RemoteError) as info:
        await client.call(addr, "returns_no_bytes", b"")
    assert info.value.code == "internal"
    await asyncio.sleep(0)
    assert not server._tasks  # the tasks of the waiting handlers are gone
    # A caller that gives up before the answer: the late answer is dropped quietly.
    with pytest.raises(RpcTimeout):
        await client.call(addr, "later", b"x", timeout=0.001)
    await asyncio.sleep(0.05)
    assert await client.call(addr, "later", b"ok") == b"ko"
    assert loop.is_running()
