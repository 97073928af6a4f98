"""`overlay-sim`: list the scenarios, run one, or sweep one parameter.

    overlay-sim list
    overlay-sim run SCENARIO [--nodes N] [--servers N] [--duration S]
                    [--churn none|exp|weibull|mass] [--seed S] [--out DIR] [--set KEY=VALUE]...
    overlay-sim sweep SCENARIO --param KEY --values V1,V2,... [--metrics M1,M2] [run options]

A run writes metrics.json (byte-identical for the same seed), timing.json (wall and CPU time
on this machine), timeseries.csv, config.json and PNG plots into --out. Progress goes to
standard error; the path of the results to standard output. This module is the only part of
the simulator that reads the wall clock (for timing.json and the progress bar).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

try:
    from sim.churn import KINDS
    from sim.metrics import RunResult, clean, write_metrics, write_series, write_timing
    from sim.scenarios import SCENARIOS, ConfigError, Scenario, describe, set_option
except KeyboardInterrupt:  # Ctrl-C while `overlay-sim` is still starting: no traceback
    print("overlay-sim: interrupted", file=sys.stderr)
    raise SystemExit(130) from None


class ProgressBar:
    """Simulated time against the run's horizon, drawn on a terminal, or logged every 10%."""

    def __init__(self, stream: TextIO, label: str, horizon: Any, enabled: bool = True):
        self.stream = stream
        self.label = label
        self.horizon = horizon  # callable returning the end of the run in virtual time
        self.enabled = enabled
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1
        self.now = 0.0  # the last simulated time reported, for the message on Ctrl-C

    def __call__(self, now: float, events: int) -> None:
        self.now = now
        if not self.enabled:
            return
        wall = time.monotonic()
        end = max(self.horizon(), 1e-9)
        fraction = min(1.0, max(0.0, now / end))
        elapsed = wall - self.started
        rate = events / elapsed if elapsed > 0 else 0.0
        if self.tty:
            if wall - self._last_draw < 0.1 and fraction < 1.0:
                return
            self._last_draw = wall
            filled = int(30 * fraction)
            eta = elapsed / fraction - elapsed if fraction > 0 else float("nan")
            self.stream.write(
                f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%} "
                f"t={now:,.0f}/{end:,.0f}s {events:,} events {rate:,.0f}/s eta {eta:,.0f}s "
            )
            self.stream.flush()
        else:
            decile = int(fraction * 10)
            if decile > self._last_decile:
                self._last_decile = decile
                self.stream.write(
                    f"{self.label}: {decile * 10}% t={now:,.0f}/{end:,.0f}s "
                    f"{events:,} events {elapsed:,.1f}s wall\n"
                )
                self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# Everything run_one may write; timing.json and the plots are not written every time.
RUN_FILES = ("metrics.json", "timing.json", "timeseries.csv", "config.json", "timeseries.png",
             "distributions.png")


class Interrupted(Exception):
    """Ctrl-C during a run: what was stopped, for the one-line message."""


def build_config(spec: Scenario, args: argparse.Namespace) -> Any:
    config = spec.default_config()
    options: list[tuple[str, str]] = []
    if args.nodes is not None:
        if spec.size_field != "nodes":
            raise ConfigError(f"{spec.name} has servers, not nodes: use --servers")
        options.append(("nodes", str(args.nodes)))
    if args.servers is not None:
        if spec.size_field != "servers":
            raise ConfigError(f"{spec.name} has nodes, not servers: use --nodes")
        options.append(("servers", str(args.servers)))
    if args.duration is not None:
        options.append(("duration", str(args.duration)))
    if args.churn is not None:
        options.append(("churn.kind", args.churn))
    if args.seed is not None:
        options.append(("seed", str(args.seed)))
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        options.append((key.strip(), value))
    for key, value in options:
        config = set_option(config, key, value)
    return config


def run_one(spec: Scenario, config: Any, out: Path, *, quiet: bool, plots: bool,
            timing: bool = True, label: str | None = None) -> RunResult:
    """Run, time and write one scenario into `out` (timing.json unless `timing` is False)."""
    out.mkdir(parents=True, exist_ok=True)
    instance = spec.runner(spec.name, config)
    bar = ProgressBar(sys.stderr, label or spec.name, lambda: instance.horizon,
                      enabled=not quiet)
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        result: RunResult = instance.run(bar)
    except KeyboardInterrupt:
        bar.close()
        try:
            out.rmdir()  # only if the run had written nothing there
        except OSError:
            pass
        raise Interrupted(f"{label or spec.name} interrupted at t={bar.now:,.0f} of "
                          f"{instance.horizon:,.0f} simulated s; its results were not "
                          f"written") from None
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    events = result.metrics.get("events")
    bar(instance.horizon, events if isinstance(events, int) else 0)  # the 100% the engine
    bar.close()  # reports only when its last chunk of events happens to end there
    result.timing = {
        "wall_s": wall,
        "cpu_s": cpu,
        "events": events,
        "events_per_s": events / wall if isinstance(events, int) and wall else None,
        "events_per_cpu_s": events / cpu if isinstance(events, int) and cpu else None,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    _remove_run_files(out)  # a rerun into the same --out leaves nothing of the last run
    try:
        _write_run(spec, config, result, out, timing=timing, plots=plots)
    except KeyboardInterrupt:  # all of a run's files or none (plots take a second or two)
        _remove_run_files(out)
        with contextlib.suppress(OSError):
            out.rmdir()
        raise Interrupted(f"{label or spec.name} interrupted while its results were written; "
                          f"none were kept") from None
    return result


def _remove_run_files(out: Path) -> None:
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def _write_run(spec: Scenario, config: Any, result: RunResult, out: Path, *, timing: bool,
               plots: bool) -> None:
    write_metrics(out / "metrics.json", result.metrics)
    if timing:
        write_timing(out / "timing.json", result.timing)
    write_series(out / "timeseries.csv", result.series)
    described = {k: clean(v) if not isinstance(v, str) else v
                 for k, v in describe(config).items()}
    (out / "config.json").write_text(
        json.dumps({"scenario": spec.name, **described}, sort_keys=True, indent=2) + "\n"
    )
    if plots:
        from sim.plots import plot_run

        plot_run(result, out)


def _cmd_list(args: argparse.Namespace) -> int:
    for spec in SCENARIOS.values():
        print(f"{spec.name:12s} {spec.description}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    spec = SCENARIOS[args.scenario]
    config = build_config(spec, args)
    out = Path(args.out or f"sim-results/{spec.name}-seed{config.seed}")
    result = run_one(spec, config, out, quiet=args.quiet, plots=not args.no_plots,
                     timing=not args.no_timing)
    if not args.quiet:
        for key in ("wall_s", "cpu_s", "events_per_s"):
            print(f"  {key} = {clean(result.timing.get(key))}", file=sys.stderr)
        for key in ("events", *spec.sweep_metrics):
            print(f"  {key} = {clean(result.metrics.get(key))}", file=sys.stderr)
    print(out)
    return 0


# What a sweep value may hold: it ends a folder's name, OUT/KEY=VALUE (no '/', no spaces).
_FOLDER_SAFE = re.compile(r"[A-Za-z0-9._+\-]+")


def _cmd_sweep(args: argparse.Namespace) -> int:
    spec = SCENARIOS[args.scenario]
    base = build_config(spec, args)
    raw_values = [v.strip() for v in args.values.split(",") if v.strip()]
    if not raw_values:
        raise ConfigError("--values needs at least one value")
    for raw in raw_values:  # each names its run's folder, OUT/KEY=VALUE
        if not _FOLDER_SAFE.fullmatch(raw):
            raise ConfigError(f"--values: {raw!r} cannot name a run's folder; use letters, "
                              f"digits and . _ + - only")
        if raw_values.count(raw) > 1:
            raise ConfigError(f"--values: {raw!r} is listed twice (one folder per value)")
    param = {"churn": "churn.kind"}.get(args.param, args.param)
    named = [m.strip() for m in (args.metrics or "").split(",") if m.strip()]
    metrics = named or list(spec.sweep_metrics)  # ("--metrics ," names none: the defaults)
    configs = [set_option(base, param, raw) for raw in raw_values]  # all checked first,
    out = Path(args.out or f"sim-results/{spec.name}-sweep-{args.param}")
    out.mkdir(parents=True, exist_ok=True)  # then the folder made: none left for a refusal
    runs: list[dict[str, object]] = []
    values: list[object] = []
    for i, (raw, config) in enumerate(zip(raw_values, configs)):
        label = f"{spec.name} {args.param}={raw} ({i + 1}/{len(raw_values)})"
        try:
            result = run_one(spec, config, out / f"{args.param}={raw}", quiet=args.quiet,
                             plots=not args.no_plots, timing=not args.no_timing, label=label)
        except (Interrupted, KeyboardInterrupt) as e:  # (the latter: between two runs)
            reason = str(e) if isinstance(e, Interrupted) else f"{label} interrupted"
            if runs:
                _write_sweep(args, spec, base, values, runs, metrics, out)
                raise Interrupted(f"{reason}; {out / 'sweep.csv'} holds the {len(runs)} "
                                  f"finished runs") from None
            raise Interrupted(reason) from None
        if not runs:  # a misspelt --metrics name: say so now, not with an empty panel at the end
            unknown = [m for m in metrics if m not in result.metrics]
            if unknown:
                print(f"overlay-sim: {spec.name} has no metric {', '.join(map(repr, unknown))}"
                      f" (see metrics.json); sweep.png leaves its panel empty", file=sys.stderr)
        values.append(_value_at(config, param))
        runs.append(result.metrics)
    _write_sweep(args, spec, base, values, runs, metrics, out)
    print(out)
    return 0


def _write_sweep(args: argparse.Namespace, spec: Scenario, base: Any, values: list[object],
                 runs: list[dict[str, object]], metrics: list[str], out: Path) -> None:
    # a metric that echoes the swept option (`nodes`, `servers`, `churn`) is its column already
    keys = sorted({k for run in runs for k in run} - {args.param})
    (out / "sweep.png").unlink(missing_ok=True)  # an older sweep's, if not drawn again
    partial = out / "sweep.csv.partial"  # renamed once whole: never a cut-off sweep.csv
    with partial.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([args.param, *keys])
        for value, run in zip(values, runs):
            writer.writerow([value, *("" if run.get(k) is None else clean(run.get(k))
                                      for k in keys)])
    partial.replace(out / "sweep.csv")
    if not args.no_plots:
        from sim.plots import plot_sweep

        try:
            plot_sweep(args.param, values, runs, metrics, out / "sweep.png",
                       f"{spec.name}: sweep over {args.param} (seed {base.seed})")
        except KeyboardInterrupt:
            (out / "sweep.png").unlink(missing_ok=True)
            raise


def _value_at(config: Any, path: str) -> object:
    for part in path.split("."):
        config = getattr(config, part)
    return config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="overlay-sim", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the scenarios").set_defaults(fn=_cmd_list)

    def run_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("scenario", choices=sorted(SCENARIOS))
        q.add_argument("--nodes", type=int, help="DHT nodes (dht-* scenarios)")
        q.add_argument("--servers", type=int, help="block servers (swarm)")
        q.add_argument("--duration", type=float, help="simulated seconds measured")
        q.add_argument("--churn", choices=KINDS)
        q.add_argument("--seed", type=int)
        q.add_argument("--out", help="directory for the results")
        q.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="any config field by dotted path, e.g. network.latency=regions")
        q.add_argument("--quiet", action="store_true", help="no progress on stderr")
        q.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
        q.add_argument("--no-timing", action="store_true",
                       help="do not write timing.json (metrics.json never holds timings)")

    run = sub.add_parser("run", help="run one scenario")
    run_options(run)
    run.set_defaults(fn=_cmd_run)
    sweep = sub.add_parser("sweep", help="run a scenario for several values of one option")
    run_options(sweep)
    sweep.add_argument("--param", required=True, help="option to vary (dotted path)")
    sweep.add_argument("--values", required=True, help="comma-separated values")
    sweep.add_argument("--metrics", help="comma-separated metrics for the combined plot")
    sweep.set_defaults(fn=_cmd_sweep)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        return args.fn(args)
    except ConfigError as e:
        print(f"overlay-sim: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"overlay-sim: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("overlay-sim: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # --out not writable, disk full
        print(f"overlay-sim: cannot write the results: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
