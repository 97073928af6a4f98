#!/usr/bin/env python3
"""Per-token latency with and without server-to-server push (issue 6), on links delayed by
`--delay-ms` each way.

One run: a bootstrap node and `--spans` (2 or 3) `overlay-node serve` processes on
127.0.0.1, each serving one span of the small test model (tests/model_factory.py, Llama, 4
layers x hidden 64), then greedy generation of `--tokens` tokens through the chain, with push
and with the client relaying every hidden state, alternating, `--repeat` times each. Tokens
are checked against transformers run locally on the same model.

The delay: `tc qdisc ... netem` is not available on this machine (the kernel has no netem
qdisc: "Specified qdisc kind is unknown", also inside a network namespace), so every process
(client, servers, bootstrap) runs with the TEST-ONLY OVERLAY_TEST_LINK_DELAY_MS (see
overlay/link_delay.py): each byte a process writes reaches the socket N ms later, i.e. a
one-way delay of N ms on each direction of each link. Expected per token: relay, spans x 2 x N
(a round trip to every span); push, (spans + 1) x N (client -> first -> ... -> last -> client),
plus compute and per-hop overheads in both.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_push.py [--spans 3] [--delay-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.local_swarm import LocalSwarm
from client.swarm import SwarmClient
from overlay import link_delay
from overlay.cli.arguments import positive_int  # counts: refused when below 1
from overlay.runtime import new_event_loop

# torch, transformers and the modules that use them (4-7 s to import) are imported where they
# are used, after the arguments are parsed, so that `--help` and typos answer at once.
SPAN_COUNTS = (2, 3)  # chains of 2 or 3 servers over the test model's blocks
PROMPT = [1, 17, 42, 99, 7, 56, 31, 5]


def chain(count: int, num_layers: int) -> list[tuple[int, int]]:
    return [(0, 2), (2, num_layers)] if count == 2 else [(0, 1), (1, 3), (3, num_layers)]


def local_greedy(tokens: int) -> list[int]:
    """transformers' model run locally, argmax at every step; like the swarm loop below it
    does not stop at the end-of-text token (generate's min_new_tokens would forbid it)."""
    import torch

    from tests.model_factory import build_model

    model = build_model("llama")
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        for _ in range(tokens):
            token = model(ids).logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, token], dim=1)
    return ids[0, len(PROMPT):].tolist()


async def generate(model_dir: Path, bootstrap: str, tokens: int, push: bool):
    """Greedy decoding through one session: (per-step seconds, tokens, client sends, steps)."""
    import torch

    from blocks.model_files import default_model_id
    from client.local_head import LocalHead
    from client.remote_blocks import ClientConfig, RemoteBlocks
    from tests.model_factory import NUM_LAYERS

    prompt = torch.tensor([PROMPT])
    client = await SwarmClient.connect([bootstrap])
    try:
        head = LocalHead.load(model_dir)
        remote = RemoteBlocks(client, default_model_id(model_dir), NUM_LAYERS,
                              ClientConfig(push=push))
        async with await remote.inference_session(1, prompt.shape[1] + tokens + 8) as session:
            for _ in range(2):  # warm-up: connections (server -> server too), then back to 0
                await session.step(head.embed(prompt[:, :2]))
                await session.step(head.embed(prompt[:, 2:3], position_ids=2))
                session.rollback(0)
            sends_before = session.client_sends
            hidden = await session.step(head.embed(prompt))
            new: list[int] = []
            times: list[float] = []
            while True:
                token = head.logits(hidden[:, -1:]).argmax(-1)
                new.append(int(token))
                if len(new) == tokens:
                    break
                began = time.perf_counter()
                hidden = await session.step(head.embed(token, position_ids=session.position))
                times.append(time.perf_counter() - began)
            spans = [(str(s.peer)[-6:], s.start, s.end) for s in session.spans]
            return times, new, session.client_sends - sends_before, tokens, spans
    finally:
        await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=3, choices=SPAN_COUNTS)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--tokens", type=positive_int, default=32)
    parser.add_argument("--repeat", type=positive_int, default=3, help="alternating runs per mode")
    args = parser.parse_args()
    import torch

    from tests.model_factory import NUM_LAYERS, save_model

    torch.set_num_threads(1)
    delay = str(args.delay_ms)
    os.environ[link_delay.ENV_VAR] = delay  # this process's client hosts too (read once per Host)
    spans = chain(args.spans, NUM_LAYERS)
    expected_tokens = local_greedy(args.tokens)
    steps: dict[str, list[float]] = {"push": [], "relay": []}
    sends: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model("llama", Path(tmp) / "llama")
        with LocalSwarm(model_dir, spans, env={link_delay.ENV_VAR: delay}) as swarm:
            for _ in range(args.repeat):
                for mode in ("push", "relay"):
                    with asyncio.Runner(loop_factory=new_event_loop) as runner:
                        times, got, client_sends, _, route = runner.run(generate(
                            model_dir, swarm.bootstrap, args.tokens, push=mode == "push"))
                    if got != expected_tokens:
                        print(f"{mode}: TOKENS DIFFER from local transformers", file=sys.stderr)
                        return 1
                    if len(route) != args.spans:
                        print(f"{mode}: route {route} is not the {args.spans}-span chain",
                              file=sys.stderr)
                        return 1
                    steps[mode] += times
                    sends[mode] = client_sends
    d = args.delay_ms
    n = args.spans
    push_ms = statistics.median(steps["push"]) * 1000
    relay_ms = statistics.median(steps["relay"]) * 1000
    exp_push, exp_relay = (n + 1) * d, n * 2 * d
    result = {
        "spans": n, "delay_ms_each_way": d, "tokens": args.tokens, "repeat": args.repeat,
        "push_ms_per_token": round(push_ms, 2), "relay_ms_per_token": round(relay_ms, 2),
        "relay_over_push": round(relay_ms / push_ms, 3),
        "expected_push_ms": exp_push, "expected_relay_ms": exp_relay,
        "push_p90_ms": round(statistics.quantiles(steps["push"], n=10)[-1] * 1000, 2),
        "relay_p90_ms": round(statistics.quantiles(steps["relay"], n=10)[-1] * 1000, 2),
        "client_sends_per_token": {m: round(sends[m] / args.tokens, 2) for m in sends},
        "tokens_identical_to_local": True,
        "delay": "OVERLAY_TEST_LINK_DELAY_MS (netem unavailable)",
    }
    print(f"machine: {platform.machine()} cpus={os.cpu_count()} torch={torch.__version__} "
          f"python={platform.python_version()}")
    print("command: OMP_NUM_THREADS=1 python scripts/bench_push.py " + " ".join(sys.argv[1:]))
    print(f"{n} spans, {d:g} ms one-way on every link, {args.tokens} tokens x {args.repeat} "
          f"runs per mode (median per-token step time):")
    print(f"  push : {push_ms:8.2f} ms/token  (expected ~{exp_push:g} + compute)")
    print(f"  relay: {relay_ms:8.2f} ms/token  (expected ~{exp_relay:g} + compute)")
    print(f"  relay / push: {relay_ms / push_ms:.2f} (network-only expectation "
          f"{exp_relay / exp_push:.2f})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
