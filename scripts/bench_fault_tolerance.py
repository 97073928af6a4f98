#!/usr/bin/env python3
"""Fault-tolerance benchmark (issue 6), in the spirit of Table 1 of the Petals NeurIPS 2023 paper:
useful steps/s of a 128-token and a 512-token greedy generation when each server of the chain
fails with probability 0, 1e-3 or 1e-2 per step, with our recovery (replace the failed span,
replay its stored inputs) versus restarting the generation from scratch on a new session.

A swarm on 127.0.0.1 (a 4-block float32 Llama, two servers for each half). Failures are injected
by the client: before a step, each span of the session has its stream reset with probability p,
so the step fails as it would on a lost connection and the real recovery path runs against the
real servers (re-route, new server session, replay). An injected failure is not a dead server,
so the bench's ban list forgets bans at once: it measures recovery, not waiting for bans.
A restarted generation that has not finished after `--budget` seconds has no useful steps
("finished": false, steps_per_s 0, "progress": the steps of its last attempt). Every finished
generation is checked against the failure-free tokens. Ends with one JSON line.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_fault_tolerance.py [--budget 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("OMP_NUM_THREADS", "1")

from client.local_swarm import LocalSwarm
from client.recovery import BanConfig, BanList
from client.swarm import SwarmClient
from overlay.identity import PeerId
from overlay.runtime import new_event_loop

if TYPE_CHECKING:
    import torch

    from client.inference import InferenceSession
    from client.local_head import LocalHead

# torch, transformers and the modules that use them (4-7 s to import) are imported where they
# are used, after the arguments are parsed, so that `--help` and typos answer at once.

MODEL = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
SPANS = [(0, 2), (2, 4), (0, 2), (2, 4)]
LENGTHS = (128, 512)
FAILURE_RATES = (0.0, 1e-3, 1e-2)
PROMPT = [1, 17, 42, 99, 7, 256, 311, 5]
INSTANT_BANS = BanConfig(base=1e-3, max_ban=1e-3)


def write_model(directory: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, **MODEL)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.15)
    model.save_pretrained(directory / "bench", safe_serialization=True)
    return directory / "bench"


def inject(session: InferenceSession, rate: float, rng: random.Random) -> int:
    """Reset each span's stream with probability `rate`; returns how many were reset."""
    failures = 0
    for span in session.spans:
        if rate and rng.random() < rate and span._stream is not None:
            span._stream.reset("injected failure")
            failures += 1
    return failures


async def generate(session: InferenceSession, head: LocalHead, prompt: torch.Tensor,
                   tokens: int, rate: float, rng: random.Random, deadline: float,
                   on_step) -> list[int] | None:
    """Greedy tokens through `session`, injecting failures; None if past `deadline`."""
    hidden = await session.step(head.embed(prompt))
    new: list[int] = []
    while len(new) < tokens:
        token = head.logits(hidden[:, -1:]).argmax(-1)
        new.append(int(token))
        on_step()
        if len(new) == tokens:
            break
        if time.perf_counter() > deadline:
            return None
        inject(session, rate, rng)
        hidden = await session.step(head.embed(token, position_ids=session.position))
    return new


async def run(model_dir: Path, bootstrap: str, tokens: int, rate: float, method: str,
              seed: int, budget: float, expected: list[int] | None) -> dict:
    import torch

    from client.inference import InferenceError, InferenceSession, SessionConfig
    from client.local_head import LocalHead
    from client.remote_blocks import RemoteBlocks
    from model_parts.files import default_model_id

    num_blocks = MODEL["num_hidden_layers"]
    prompt = torch.tensor([PROMPT])
    client = await SwarmClient.connect([bootstrap])
    try:
        head = LocalHead.load(model_dir)
        remote = RemoteBlocks(client, default_model_id(model_dir), num_blocks)
        remote.bans = BanList(INSTANT_BANS)
        rng = random.Random(seed)
        max_length = prompt.shape[1] + tokens
        done = 0  # steps of the generation in progress
        restarts = 0

        def count() -> None:
            nonlocal done
            done += 1

        start = time.perf_counter()
        deadline = start + budget
        while True:
            if method == "recovery":
                session = await remote.inference_session(1, max_length)
            else:  # no rerouter: a failure ends the session, the generation starts over
                route = await remote.inference_route(0, num_blocks)
                session = await InferenceSession(
                    client.host, remote.model_id,
                    [(PeerId.from_string(s.peer_id), s.start, s.end) for s in route],
                    SessionConfig(max_length=max_length)).open()
            done = 0
            try:
                new = await generate(session, head, prompt, tokens, rate, rng, deadline, count)
                recoveries = len(session.recoveries)
                break
            except InferenceError:
                if method == "recovery":
                    raise
                restarts += 1
            finally:
                await session.close()
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
    finished = new is not None
    if finished and expected is not None and new != expected:
        raise SystemExit(f"tokens differ from the failure-free run ({method}, p={rate})")
    return {"tokens": tokens, "p": rate, "method": method, "finished": finished,
            "steps_per_s": round(tokens / elapsed, 2) if finished else 0.0,
            "progress": tokens if finished else done,  # steps of the last attempt
            "seconds": round(elapsed, 2), "recoveries": recoveries if finished else None,
            "restarts": restarts, "new_tokens": new}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds after which a generation is given up")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp))
        with LocalSwarm(model_dir, SPANS) as swarm:
            for tokens in LENGTHS:
                expected = None
                for rate in FAILURE_RATES:
                    for method in ("recovery", "restart"):
                        with asyncio.Runner(loop_factory=new_event_loop) as runner:
                            result = runner.run(run(model_dir, swarm.bootstrap, tokens, rate,
                                                    method, args.seed, args.budget, expected))
                        if expected is None:
                            expected = result["new_tokens"]
                        del result["new_tokens"]
                        results.append(result)
                        print(result, file=sys.stderr, flush=True)
    print(f"machine: {platform.machine()} cpus={os.cpu_count()} torch={torch.__version__} "
          f"python={platform.python_version()}")
    print("command: OMP_NUM_THREADS=1 python scripts/bench_fault_tolerance.py "
          + " ".join(sys.argv[1:]))
    print(f"{'tokens':>6} {'p':>6} {'method':>9} {'steps/s':>9} {'s':>7} {'recov':>6} "
          f"{'restarts':>8} finished")
    for r in results:
        print(f"{r['tokens']:>6} {r['p']:>6g} {r['method']:>9} {r['steps_per_s']:>9.2f} "
              f"{r['seconds']:>7.2f} {r['recoveries'] if r['recoveries'] is not None else '-':>6} "
              f"{r['restarts']:>8} {r['finished']}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
