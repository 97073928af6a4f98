"""Running an asyncio program the way every overlay-node command does: uvloop when installed,
SIGINT/SIGTERM turned into a clean cancellation (so `finally` blocks close sockets and stop
child processes), logs on standard error."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# Buffers up to this size come from glibc's heap and stay there after free (see below).
HEAP_BUFFER_LIMIT = 256 << 20


def keep_large_buffers_in_heap(limit: int = HEAP_BUFFER_LIMIT) -> bool:
    """Ask glibc to serve blocks up to `limit` from its heap and keep them after free.

    By default every allocation above 32 MiB is a fresh mmap, so each large activation buffer
    pays a page fault per 4 KiB page on first touch: on the VMs measured here that made a
    64 MiB tensor round trip 10x slower (scripts/bench_tensor_wire.py). A long-running node
    that exchanges same-sized buffers every step reuses them instead. Process-wide, so it is
    the command line's decision, not the libraries'. False where libc is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    try:
        return bool(libc.mallopt(m_mmap_threshold, limit)) and bool(
            libc.mallopt(m_trim_threshold, limit))
    except AttributeError:
        return False


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# Commands that run until they are told to stop (a node, a server): for them SIGINT/SIGTERM
# is the normal end, exit status 0. Any other command stopped that way did not finish its
# job, and says so as shells do: 128 + the signal's number (130 for Ctrl-C).
SERVICES = frozenset({"join", "serve"})


def run(main: Coroutine[Any, Any, int], *, stopping_is_success: bool = True) -> int:
    """Run `main` to completion; on SIGINT/SIGTERM cancel it (its `finally` blocks run) and
    return 0 if `stopping_is_success` (a shutdown that was asked for is a clean exit), else
    128 + the signal number."""
    keep_large_buffers_in_heap()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        status = runner.run(_guarded(main, stopping_is_success))
    if _daemon_work:
        # Work abandoned on a daemon thread (a model still loading) would be killed inside
        # C++ code by the interpreter's finalization, which aborts the process (SIGABRT):
        # everything that needed closing is closed by now, so leave without finalizing.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


_daemon_work: set[object] = set()  # calls of `in_daemon_thread` still running


async def in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a thread of its own that an exit does not wait for.

    For long blocking work such as loading a model: cancelling the await (Ctrl-C) stops
    waiting at once, and the process exits without joining the thread, where the event
    loop's default executor would make the exit wait for the whole load."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    token = object()

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as e:  # handed to the awaiting task
            error = e
            with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, lambda: future.set_result(result))
        finally:
            _daemon_work.discard(token)

    _daemon_work.add(token)
    threading.Thread(target=work, name=getattr(fn, "__name__", "work"), daemon=True).start()
    return await future


async def _guarded(main: Coroutine[Any, Any, int], stopping_is_success: bool = True) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        if not received:
            logging.getLogger("overlay").info("received %s, shutting down",
                                              signal.Signals(signum).name)
        received.append(signum)
        task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await main
    except asyncio.CancelledError:
        if not received:
            raise
        return 0 if stopping_is_success else 128 + received[0]
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signum)


def setup_logging(verbosity: int = 0) -> None:
    level = logging.INFO if verbosity == 0 else logging.DEBUG if verbosity > 0 else logging.WARNING
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
