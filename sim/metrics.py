"""Run results: flat metrics, a time series, and writing them (metrics.json, timeseries.csv).

metrics.json is a flat JSON object with sorted keys and nothing in it depends on the
machine, so two runs with the same seed write the same bytes. What measures the machine
rather than the simulated system (wall and CPU seconds, events per second) goes to a
separate timing.json (`write_timing`), which naturally differs between runs.

Pure: no clock (wall time is measured by the caller and passed in).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between closest ranks; None if
    there are no values. `values` need not be sorted."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    frac = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * frac


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def clean(value: object) -> object:
    """A JSON-safe scalar: floats rounded to 9 significant digits, inf/nan as None."""
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.9g}")
    raise TypeError(f"metric values must be scalars, got {type(value).__name__}")


@dataclass
class TimeSeries:
    """Rows sampled at fixed virtual times; the first column is the time."""

    columns: tuple[str, ...]
    rows: list[tuple] = field(default_factory=list)

    def add(self, *row: object) -> None:
        if len(row) != len(self.columns):
            raise ValueError(f"row of {len(row)} values for {len(self.columns)} columns")
        self.rows.append(tuple(row))

    def column(self, name: str) -> list:
        i = self.columns.index(name)
        return [row[i] for row in self.rows]


@dataclass
class RunResult:
    """What a scenario returns: its metrics, its time series and what to plot."""

    scenario: str
    metrics: dict[str, object]
    series: TimeSeries
    extra: dict[str, list] = field(default_factory=dict)  # raw samples for the plots
    timing: dict[str, object] = field(default_factory=dict)  # filled by the CLI: timing.json


def write_metrics(path: Path, metrics: dict[str, object]) -> None:
    body = {key: clean(value) for key, value in metrics.items()}
    path.write_text(json.dumps(body, sort_keys=True, indent=2) + "\n")


def write_timing(path: Path, timing: dict[str, object]) -> None:
    """timing.json: how long the run took on this machine (never part of metrics.json)."""
    write_metrics(path, timing)


def write_series(path: Path, series: TimeSeries) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(series.columns)
        for row in series.rows:
            writer.writerow(["" if v is None else clean(v) for v in row])


def read_metrics(path: Path) -> dict[str, object]:
    return json.loads(path.read_text())


def summarize(prefix: str, values: Iterable[float], qs: Sequence[int] = (50, 90, 99),
              suffix: str = "") -> dict[str, float | None]:
    """{prefix_p50suffix: ..., prefix_p90suffix: ..., prefix_meansuffix: ...}."""
    values = list(values)
    out: dict[str, float | None] = {f"{prefix}_p{q}{suffix}": percentile(values, q) for q in qs}
    out[f"{prefix}_mean{suffix}"] = mean(values)
    return out
