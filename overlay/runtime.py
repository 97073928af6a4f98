"""Running an asyncio program the way every overlay-node command does: uvloop when installed,
SIGINT/SIGTERM turned into a clean cancellation (so `finally` blocks close sockets and stop
child processes), logs on standard error."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run `main` to completion; on SIGINT/SIGTERM cancel it (its `finally` blocks run) and
    return 0: a shutdown that was asked for is a clean exit."""
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
