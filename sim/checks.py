"""Range checks for the scenario configs' numbers.

A value set with `--set` that is NaN, infinite or out of range would otherwise crash a run
halfway (a traceback), never end it (an infinite duration, a zero check period) or make it
silently meaningless (NaN event times): the configs refuse it when they are built, and the
CLI turns the ValueError into one line.

Pure.
"""

from __future__ import annotations

import math


def positive(**values: float) -> None:
    """Each value finite and > 0."""
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")


def non_negative(**values: float) -> None:
    """Each value finite and >= 0."""
    for name, value in values.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def fraction(**values: float) -> None:
    """Each value in [0, 1]."""
    for name, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
