"""Range checks for the scenario configs' numbers.

A value set with `--set` that is NaN, infinite or out of range would otherwise crash a run
halfway (a traceback), never end it (an infinite duration, a zero check period), make it
silently meaningless (NaN event times) or fill the memory before the first event (a load far
past the sizes the simulator is measured at): the configs refuse it when they are built, and
the CLI turns the ValueError into one line.

Pure.
"""

from __future__ import annotations

import math

# Loads a run may ask for. Beyond them a run holds more than a few GiB: every client arrival
# of a swarm run is drawn up front, a DHT run keeps every stored record (replicated k times),
# every run keeps every row of its time series.
MAX_DHT_NODES = 100_000  # the documented top of the range: 2.9 GiB (docs/simulator.md)
MAX_SWARM_SERVERS = 3_000  # ten times the documented top (300)
MAX_MODEL_BLOCKS = 10_000  # the largest open models have ~130; per-block lists are kept
MAX_SESSIONS = 100_000  # swarm: session_rate x duration (the default run has 36)
MAX_OPERATIONS = 1_000_000  # DHT: ops_per_s x duration (the default run has 3,000)
MAX_STORED_BYTES = 4 << 30  # DHT: the values its STOREs create (each kept to the end)
MAX_SAMPLES = 100_000  # rows of the time series: duration / sample_interval


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


def at_most(limit: float, what: str, value: float) -> None:
    """`value` <= limit; `what` says what it counts (`sessions (session_rate x duration)`)."""
    if value > limit:
        raise ValueError(f"{what} must be at most {limit:,.0f}, got {value:,.0f}: a run that "
                         f"large would exhaust memory")
