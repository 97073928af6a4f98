#!/usr/bin/env python3
"""Where one token's time goes across the processes of a 2-span chain (issue 5).

The setup of scripts/bench_inference.py (a bootstrap node and two `overlay-node serve`
processes on 127.0.0.1, spans [0, L/2) and [L/2, L), push on, greedy decoding in this
process), with overlay/timeline.py's marks on in every process. The per-process files merge
into one timeline (one monotonic clock), and for every single-token step the script measures
the segments of the critical path:

    client sends -> server 1 reads -> server 1 has the step -> server 1 computed
    -> server 2 reads (the push) -> server 2 has the step -> server 2 computed
    -> server 2 answered -> the client's last read -> the client has the output

and the client's own work between steps (head, argmax, embedding). Prints the median and
mean of each segment, the hot-loop time of one span's step in this process for comparison,
and a JSON line.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/trace_token.py [--model small-4x64]
        [--tokens 200] [--decode fast]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import MODELS, swarm_ms_per_token, write_model

from overlay.cli.arguments import positive_int  # (imports no overlay.timeline: see main)

# torch and the overlay are imported in main, after the arguments are parsed (torch takes 4-7
# s, and the overlay must see OVERLAY_TIMELINE_DIR, made there, when it is first imported).

SEGMENTS = (  # (name, process, event): each found as the first after the previous one
    ("client -> server 1 read", "S1", "read"),
    ("server 1: read -> step received", "S1", "server_step_received"),
    ("server 1: compute (and decode)", "S1", "server_step_computed"),
    ("push: server 1 -> server 2 read", "S2", "read"),
    ("server 2: read -> step received", "S2", "server_step_received"),
    ("server 2: compute", "S2", "server_step_computed"),
    ("server 2: answer sent", "S2", "server_step_answered"),
    ("server 2 -> client, and client done", "C", "client_step_done"),
)


def read_timeline(trace_dir: Path, pids: dict[int, str]) -> list[tuple[int, str, str]]:
    events = []
    for path in trace_dir.glob("*.txt"):
        who = pids.get(int(path.stem))
        if who is None:
            continue  # the bootstrap node
        for line in path.read_text().splitlines():
            ns, event = line.split(" ", 1)
            events.append((int(ns), who, event))
    events.sort()
    return events


def segments(events: list[tuple[int, str, str]]) -> tuple[dict[str, list[float]], list[float]]:
    """Per segment, its duration (us) in every step where the whole chain was found; and the
    client's time between steps."""
    out: dict[str, list[float]] = {name: [] for name, _, _ in SEGMENTS}
    out["whole step"] = []
    between: list[float] = []
    sent = [i for i, e in enumerate(events) if e[1:] == ("C", "client_step_sent")]
    last_done = None
    for i in sent:
        if last_done is not None:
            between.append((events[i][0] - last_done) / 1e3)
        t0, found, j = events[i][0], [], i + 1
        for name, who, event in SEGMENTS:
            while j < len(events) and events[j][1:] != (who, event):
                if events[j][1:] == ("C", "client_step_sent"):
                    break
                j += 1
            if j == len(events) or events[j][1:] != (who, event):
                break
            found.append((name, events[j][0]))
            j += 1
        if len(found) != len(SEGMENTS):
            last_done = None
            continue
        previous = t0
        for name, ns in found:
            out[name].append((ns - previous) / 1e3)
            previous = ns
        out["whole step"].append((previous - t0) / 1e3)
        last_done = previous
    return out, between


def hot_step_us(model_dir: Path, start: int, end: int, steps: int = 300) -> float:
    """One span's single-token step in a tight loop in this process (warm caches)."""
    import torch

    from blocks.span import BlockSpan

    span = BlockSpan.load(model_dir, start, end)
    times = []
    with torch.inference_mode(), span.new_session(1, steps + 16) as session:
        session.step(torch.randn(1, 8, span.hidden_size))
        for _ in range(steps):
            hidden = torch.randn(1, 1, span.hidden_size)
            began = time.perf_counter()
            session.step(hidden)
            times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small-4x64", choices=sorted(MODELS))
    parser.add_argument("--tokens", type=positive_int, default=200)
    parser.add_argument("--decode", default="fast")
    args = parser.parse_args()
    trace_dir = Path(tempfile.mkdtemp(prefix="overlay-timeline-"))
    os.environ["OVERLAY_TIMELINE_DIR"] = str(trace_dir)  # before overlay is imported: here too
    try:
        return trace(args, trace_dir)
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)


def trace(args: argparse.Namespace, trace_dir: Path) -> int:
    import torch

    from client.local_swarm import LocalSwarm
    from overlay.runtime import new_event_loop

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(args.model, Path(tmp))
        layers = MODELS[args.model]["num_hidden_layers"]
        spans = [(0, layers // 2), (layers // 2, layers)]
        prompt = torch.tensor([[1, 17, 42, 99, 7, 256, 311, 5]])
        with LocalSwarm(model_dir, spans, extra_serve_args=["--decode", args.decode]) as swarm:
            servers = [p for p in swarm.processes if p.name.startswith("server")]
            pids = {os.getpid(): "C", servers[0].proc.pid: "S1", servers[1].proc.pid: "S2"}
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                ms, _ = runner.run(swarm_ms_per_token(model_dir, swarm.bootstrap, prompt,
                                                      args.tokens))
        hot = [hot_step_us(model_dir, start, end) for start, end in spans]
    found, between = segments(read_timeline(trace_dir, pids))
    steps = len(found["whole step"])
    if steps < 10:
        print(f"only {steps} complete steps in the timeline", file=sys.stderr)
        return 1
    print(f"machine: {platform.machine()} cpus={os.cpu_count()} torch={torch.__version__} "
          f"python={platform.python_version()}; load average {os.getloadavg()[0]:.1f}")
    print("command: OMP_NUM_THREADS=1 python scripts/trace_token.py " + " ".join(sys.argv[1:]))
    print(f"{args.model}, 2 spans, push, --decode {args.decode}: {ms:.2f} ms/token over "
          f"{args.tokens} tokens; {steps} complete single-token steps traced")
    print(f"{'segment':<40}{'median us':>11}{'mean us':>10}")
    result: dict = {"ms_per_token": round(ms, 3), "steps": steps}
    for name, values in [*found.items(), ("client between steps", between)]:
        med, mean = statistics.median(values), statistics.fmean(values)
        print(f"{name:<40}{med:>11.1f}{mean:>10.1f}")
        result[name] = {"median_us": round(med, 1), "mean_us": round(mean, 1)}
    for (start, end), us in zip(spans, hot):
        print(f"for comparison: span [{start}, {end}) step in a hot loop here: {us:.1f} us")
    result["hot_step_us"] = [round(us, 1) for us in hot]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
