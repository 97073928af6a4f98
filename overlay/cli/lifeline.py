"""`--lifeline-fd FD` of `join` and `serve`: stop when the process that started this one dies.

The starter (client/local_swarm.py) keeps the write end of a pipe and hands its child the read
end as FD. Nobody writes to it, so a read returns only once every write end is closed, which
the kernel does when the starter exits by any means, SIGKILL and crashes included. The child
then stops as on SIGTERM (a server announces itself offline first) and, should that clean stop
hang, exits anyway after a grace period.

Chosen over Linux's PR_SET_PDEATHSIG, which fires when the starting *thread* exits (the demo
starts its swarm from an executor thread) and exists on Linux only; a pipe works on every
POSIX system and needs nothing from the starter but to keep one file descriptor open.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time

from overlay.cli.arguments import non_negative_int

log = logging.getLogger("overlay.lifeline")

# Seconds between the parent's death and a forced exit, should the clean stop hang: more
# than a server needs to announce itself offline and close.
STOP_GRACE = 20.0


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lifeline-fd", type=non_negative_int, metavar="FD",
                        help="stop (as on SIGTERM) once file descriptor FD, the read end of a "
                             "pipe whose write end the starting process holds, reads "
                             "end-of-file: the starter died (for supervisors such as "
                             "client/local_swarm.py)")


def watch(fd: int, grace: float = STOP_GRACE) -> None:
    """Watch `fd` on a daemon thread: it works before the event loop runs (while torch
    imports) and while the loop is busy."""
    try:
        os.fstat(fd)
    except OSError as e:
        raise SystemExit(f"overlay-node: --lifeline-fd {fd}: {e.strerror}") from None
    threading.Thread(target=_stop_at_eof, args=(fd, grace), name="lifeline",
                     daemon=True).start()


def _stop_at_eof(fd: int, grace: float) -> None:
    try:
        while os.read(fd, 4096):  # data is not expected; ignored
            pass
    except OSError:  # closed under us or unreadable: the lifeline is gone all the same
        pass
    log.warning("the process that started this one is gone (lifeline closed); stopping")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    log.error("still running %.0f s after the lifeline closed; exiting", grace)
    os._exit(1)
