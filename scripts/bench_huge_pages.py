#!/usr/bin/env python3
"""What transparent huge pages for CPU tensors (model_parts/huge_pages.py) change in a decode
step of the 8 x 512 CPU model: its two 4-block spans and the client's head, one token at a time,
as the servers and the client of scripts/bench_inference.py run them, here in one process.

torch's allocator reads the setting once, before its first allocation, so each measurement is
a child process: `--rounds` pairs of children, one with huge pages and one without, alternating
(the machine drifts; the pairs see the same drift). Prints each child's median ms per token,
the median ratio with/without, and one JSON line.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_huge_pages.py [--rounds 4] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_parts.huge_pages import ENV_VARS
from overlay.cli.arguments import positive_int


def child(model_dir: Path, tokens: int) -> float:
    """Median ms per token of span [0, 4), span [4, 8) and the head, back to back."""
    import torch

    from blocks.span import BlockSpan
    from client.local_head import LocalHead

    torch.set_num_threads(1)
    spans = [BlockSpan.load(model_dir, 0, 4), BlockSpan.load(model_dir, 4, 8)]
    head = LocalHead.load(model_dir)
    prompt = torch.tensor([[1, 17, 42, 99, 7, 256, 311, 5]])
    sessions = [span.new_session(1, tokens + 16) for span in spans]
    times = []
    with torch.inference_mode():
        hidden = head.embed(prompt)
        for session in sessions:
            hidden = session.step(hidden)
        for i in range(tokens):
            began = time.perf_counter()
            token = head.logits(hidden[:, -1:]).argmax(-1)
            hidden = head.embed(token, position_ids=prompt.shape[1] + i)
            for session in sessions:
                hidden = session.step(hidden)
            times.append(time.perf_counter() - began)
    for session in sessions:
        session.close()
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=4)
    parser.add_argument("--tokens", type=positive_int, default=64)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # MODEL_DIR of a measuring child
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"ms_per_token": child(Path(args.child), args.tokens)}))
        return 0
    from bench_inference import write_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model("cpu-8x512", Path(tmp))
        runs: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(args.rounds):
            for pages in ("on", "off"):
                env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
                env.update(dict.fromkeys(ENV_VARS, "1" if pages == "on" else "0"))
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(model_dir), "--tokens",
                     str(args.tokens)], env=env, capture_output=True, text=True, check=True,
                    timeout=600)
                runs[pages].append(json.loads(out.stdout.strip().splitlines()[-1])["ms_per_token"])
    ratios = [on / off for on, off in zip(runs["on"], runs["off"], strict=True)]
    print(f"machine: {platform.machine()} cpus={os.cpu_count()} python="
          f"{platform.python_version()}; load average {os.getloadavg()[0]:.1f}")
    print(f"command: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} python "
          f"scripts/bench_huge_pages.py --rounds {args.rounds} --tokens {args.tokens}")
    print("ms/token of 2 spans + head (8 x 512), pairs in order:")
    for pages in ("on", "off"):
        print(f"  huge pages {pages:3s}: " + " ".join(f"{v:6.2f}" for v in runs[pages]))
    print(f"on / off, median of the pairs: {statistics.median(ratios):.3f}")
    print(json.dumps({"on_ms_per_token": runs["on"], "off_ms_per_token": runs["off"],
                      "median_ratio": round(statistics.median(ratios), 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
