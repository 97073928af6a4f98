"""PNG plots of a run and of a sweep (matplotlib, Agg backend, imported only when plotting).

Pure apart from writing the files it is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sim.metrics import RunResult, TimeSeries

# What the time-series plot of each kind of scenario shows: (column, axis label).
_DHT_PANELS = (
    ("alive", "live nodes"),
    ("find_success_rate", "lookup success rate"),
    ("latency_p50_s", "lookup latency p50 (s)"),
    ("hops_mean", "hops (mean)"),
)
_SWARM_PANELS = (
    ("bottleneck", "bottleneck (tokens/s)"),
    ("coverage_min", "min servers per block"),
    ("tokens_per_s", "tokens/s computed"),
    ("active_sessions", "active sessions"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(series: TimeSeries) -> tuple[tuple[str, str], ...]:
    return _SWARM_PANELS if "bottleneck" in series.columns else _DHT_PANELS


def plot_run(result: RunResult, out: Path) -> list[Path]:
    """timeseries.png (the main curves over time) and distributions.png."""
    plt = _pyplot()
    written: list[Path] = []
    series = result.series
    panels = _panels(series)
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), sharex=True)
    times = series.column("time_s")
    for ax, (column, label) in zip(axes, panels):
        values = series.column(column)
        points = [(t, v) for t, v in zip(times, values) if v is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", lw=1)
        if column == "bottleneck" and "bottleneck_upper_bound_final" in result.metrics:
            bound = result.metrics["bottleneck_upper_bound_final"]
            if isinstance(bound, float):
                ax.axhline(bound, ls="--", c="gray", lw=1, label="capacity bound (end)")
                ax.legend(loc="lower right", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("simulated time since the measurement started (s)")
    fig.suptitle(_title(result), fontsize=10)
    fig.tight_layout()
    path = out / "timeseries.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    samples = {k: v for k, v in result.extra.items() if v}
    if samples:
        fig, axes = plt.subplots(1, len(samples), figsize=(4 * len(samples), 3.2))
        if len(samples) == 1:
            axes = [axes]
        for ax, (name, values) in zip(axes, sorted(samples.items())):
            ordered = sorted(values)
            n = len(ordered)
            ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", lw=1.2)
            ax.set_xlabel(name, fontsize=8)
            ax.set_ylabel("CDF", fontsize=8)
            ax.grid(alpha=0.3)
        fig.suptitle(_title(result), fontsize=10)
        fig.tight_layout()
        path = out / "distributions.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_sweep(
    param: str,
    values: Sequence[object],
    runs: Sequence[dict[str, object]],
    metrics: Sequence[str],
    path: Path,
    title: str,
) -> Path:
    """One panel per metric, the swept parameter on the x axis (log scale if it spans 10x)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(metrics), 1, figsize=(7, 2.4 * len(metrics)), sharex=True)
    if len(metrics) == 1:
        axes = [axes]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    xs = list(values) if numeric else list(range(len(values)))
    for ax, metric in zip(axes, metrics):
        ys = [run.get(metric) for run in runs]
        points = [(x, y) for x, y in zip(xs, ys) if isinstance(y, int | float)]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        elif all(metric not in run for run in runs):
            ax.text(0.5, 0.5, f"no metric named {metric!r}", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_ylabel(metric, fontsize=8)
        ax.grid(alpha=0.3)
    if numeric and min(xs) > 0 and max(xs) >= 10 * min(xs):  # type: ignore[operator]
        axes[-1].set_xscale("log")
    if not numeric:
        axes[-1].set_xticks(xs, [str(v) for v in values])
    axes[-1].set_xlabel(param)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _title(result: RunResult) -> str:
    m = result.metrics
    size = m.get("nodes", m.get("servers"))
    return f"{result.scenario}: {size} {'nodes' if 'nodes' in m else 'servers'}, " \
           f"churn {m.get('churn')}, seed {m.get('seed')}"
