"""Opt-in per-process timelines, to see where one inference step's time goes across the
processes of a chain (scripts/trace_token.py reads them).

When the environment variable OVERLAY_TIMELINE_DIR names a directory at import time, each
process appends `<CLOCK_MONOTONIC ns> <event>` lines to `<dir>/<pid>.txt` at a few points of
the step path (a read from a socket, a server's step received, computed and answered, a
client's step sent and done). CLOCK_MONOTONIC is one clock for every process of a machine, so
the files of a client and its servers merge into one timeline. Off by default: call sites
test `ENABLED` first, so a disabled mark costs one global read. A diagnostic, not a log:
nothing rotates the files, and each mark is a write to a line-buffered file (a few us).
"""

from __future__ import annotations

import atexit
import os
import time
from pathlib import Path

ENV_VAR = "OVERLAY_TIMELINE_DIR"

_directory = os.environ.get(ENV_VAR, "").strip()
ENABLED = bool(_directory)
_file = None


def mark(event: str) -> None:
    """Record `event` (no spaces) now; callers test `ENABLED` first."""
    global _file
    if _file is None:
        path = Path(_directory) / f"{os.getpid()}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        _file = open(path, "a", buffering=1)  # noqa: SIM115 - closed at exit
        atexit.register(_file.close)
    _file.write(f"{time.perf_counter_ns()} {event}\n")
