#!/usr/bin/env python3
"""What padding and beam search cost through the swarm (sessions that hold padding take the
servers' plain path; beams add a reorder to every step).

The setup of scripts/bench_inference.py (the small 4 x 64 model, a bootstrap node and two
`overlay-node serve` processes on 127.0.0.1, one span each), then, in one run and alternating:
a batch of 3 prompts of equal length, the same batch left-padded to three lengths, and beam
search (2 prompts x 3 beams, one left-padded), each through the swarm with the
transformers-style model and locally with transformers' `generate`; tokens checked equal. Prints
ms per generation step for each and the swarm/local ratio, then one JSON line.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_padding.py [--tokens 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import MODELS, write_model

from client.local_swarm import LocalSwarm
from overlay.cli.arguments import positive_int  # counts: refused when below 1

if TYPE_CHECKING:
    import torch

# torch, transformers and the client (4-7 s to import) are imported where they are used, after
# the arguments are parsed, so that `--help` and typos answer at once.


def cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, dict]]:
    """name -> (input ids, attention mask, generate settings)."""
    import torch

    ids = torch.randint(3, 500, (3, 8), generator=torch.Generator().manual_seed(0))
    full = torch.ones_like(ids)
    padded = full.clone()
    padded[0, :5] = 0
    padded[1, :2] = 0
    beams = full[:2].clone()
    beams[1, :3] = 0
    return {
        "batch 3, equal lengths": (ids, full, {}),
        "batch 3, left-padded": (ids.masked_fill(padded == 0, 0), padded, {}),
        "beam search, 2 x 3 beams": (ids[:2].masked_fill(beams == 0, 0), beams,
                                     {"num_beams": 3}),
    }


def timed(model, ids: torch.Tensor, mask: torch.Tensor, settings: dict, tokens: int
          ) -> tuple[float, torch.Tensor]:
    began = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                         do_sample=False, pad_token_id=0, **settings)
    return (time.perf_counter() - began) * 1000 / tokens, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=positive_int, default=32)
    parser.add_argument("--repeat", type=positive_int, default=3)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from client.causal_lm import DistributedModelForCausalLM

    torch.set_num_threads(1)
    name = "small-4x64"
    half = MODELS[name]["num_hidden_layers"] // 2
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(name, Path(tmp))
        local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        spans = [(0, half), (half, 2 * half)]
        with LocalSwarm(model_dir, spans, extra_serve_args=["--decode", "fast"]) as swarm, \
                DistributedModelForCausalLM.from_pretrained(
                    model_dir, bootstrap=[swarm.bootstrap]) as remote:
            for label, (ids, mask, settings) in cases().items():
                timed(remote, ids, mask, settings, 2)  # warm-up: routes measured
                ours, theirs = [], []
                for _ in range(args.repeat):
                    ms, got = timed(remote, ids, mask, settings, args.tokens)
                    ours.append(ms)
                    with torch.no_grad():
                        ms, expected = timed(local, ids, mask, settings, args.tokens)
                    theirs.append(ms)
                    if not torch.equal(got, expected):
                        print(f"{label}: TOKENS DIFFER from local", file=sys.stderr)
                        return 1
                rows[label] = {"swarm_ms_per_step": round(statistics.median(ours), 3),
                               "local_ms_per_step": round(statistics.median(theirs), 3)}
    print(f"machine: {platform.machine()} cpus={os.cpu_count()} torch={torch.__version__} "
          f"python={platform.python_version()}; load average {os.getloadavg()[0]:.1f}")
    print("command: OMP_NUM_THREADS=1 python scripts/bench_padding.py " + " ".join(sys.argv[1:]))
    print(f"{'case':<28}{'swarm ms/step':>15}{'local ms/step':>15}{'ratio':>8}")
    for label, row in rows.items():
        swarm_ms, local_ms = row["swarm_ms_per_step"], row["local_ms_per_step"]
        print(f"{label:<28}{swarm_ms:>15.2f}{local_ms:>15.2f}{swarm_ms / local_ms:>8.2f}")
    print(json.dumps({"tokens_identical": True, **rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
