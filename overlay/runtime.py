"""Running an asyncio program the way every overlay-node command does: uvloop when installed,
SIGINT/SIGTERM turned into a clean cancellation (so `finally` blocks close sockets and stop
child processes), logs on standard error."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any

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


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run `main` to completion; on SIGINT/SIGTERM cancel it (its `finally` blocks run) and
    return 0: a shutdown that was asked for is a clean exit."""
    keep_large_buffers_in_heap()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(_guarded(main))


async def _guarded(main: Coroutine[Any, Any, int]) -> int:
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
        return 0
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
