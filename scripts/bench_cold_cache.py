#!/usr/bin/env python3
"""What a cold cache costs the pieces of one decode step (issue 5, the 8 x 512 CPU model).

In `scripts/bench_inference.py` the client and two servers are three processes on one
machine, and on a token's path each of them in turn streams its weights through the shared
last-level cache (a 4-layer span of the 8 x 512 model is 47 MB, its head 17 MB; this VM's L3 is
32 MB). Whatever a process runs next (the messaging code, the first layers' kernels, their
caches) then comes from DRAM. Local generation, one process, keeps its working set warm. This
script measures the difference side by side, each piece warm (run back to back) and cold
(run right after streaming `--stream-mib` through the cache, as the other processes do):

- one 1-token step's message: tensor_wire encode and decode of [1, 1, hidden];
- a 2 KiB unary RPC between two hosts of this process over 127.0.0.1 (Noise, multiplexer,
  asyncio on both ends, real sockets);
- a 4-layer span's decode step and the client's head (final norm, LM head, argmax) and
  embedding of the next token.

Prints a table of medians and the cold/warm ratio, then one JSON line.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_cold_cache.py [--steps 60] [--stream-mib 64]
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
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import write_model

from overlay.cli.arguments import positive_int  # counts: refused when below 1
from overlay.host import Host
from overlay.runtime import new_event_loop


def median_us(samples: list[int]) -> float:
    return statistics.median(samples) / 1e3


def timed(fn: Callable[[], object], steps: int, stream: Callable[[], None] | None) -> float:
    samples = []
    for _ in range(steps):
        if stream is not None:
            stream()
        began = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - began)
    return median_us(samples)


async def rpc_us(steps: int, stream: Callable[[], None] | None) -> float:
    server, client = Host(), Host()

    async def echo(ctx, payload: bytes) -> bytes:
        return payload

    server.add_handler("echo", echo)
    try:
        [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")
        payload = os.urandom(2048)
        for _ in range(20):
            await client.call(addr, "echo", payload)
        samples = []
        for _ in range(steps):
            if stream is not None:
                stream()
            began = time.perf_counter_ns()
            await client.call(addr, "echo", payload)
            samples.append(time.perf_counter_ns() - began)
        return median_us(samples)
    finally:
        await client.close()
        await server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=60)
    parser.add_argument("--stream-mib", type=positive_int, default=64)
    args = parser.parse_args()
    import torch  # 4-7 s to import: only once the arguments are parsed

    import tensor_wire
    from blocks.span import BlockSpan
    from client.local_head import LocalHead

    torch.set_num_threads(1)
    streamed = torch.ones(args.stream_mib << 18)  # float32: MiB x 2^18 elements

    def stream() -> None:
        streamed.add_(1.0)  # reads and writes every byte once, as a span's matmuls read weights

    model_dir = write_model("cpu-8x512", Path(tempfile.mkdtemp(prefix="cold-cache-")))
    span = BlockSpan.load(model_dir, 0, 4)
    head = LocalHead.load(model_dir)
    hidden = torch.randn(1, 1, span.hidden_size)
    message = tensor_wire.encode_message([hidden], {"step": 7, "position": 70})
    loop = new_event_loop()
    rows = {}
    with torch.inference_mode(), span.new_session(1, 4 * args.steps + 40) as session:
        session.step(torch.randn(1, 8, span.hidden_size))
        pieces: dict[str, Callable[[], object]] = {
            "tensor_wire encode, [1, 1, 512]": lambda: tensor_wire.encode_message(
                [hidden], {"step": 7, "position": 70}),
            "tensor_wire decode, [1, 1, 512]": lambda: tensor_wire.decode_message(message),
            "span [0, 4) decode step": lambda: session.step(hidden),
            "head + argmax + next embedding": lambda: head.embed(
                head.logits(hidden).argmax(-1), position_ids=70),
        }
        for name, fn in pieces.items():
            warm = timed(fn, args.steps, None)
            cold = timed(fn, args.steps, stream)
            rows[name] = (warm, cold)
        warm = loop.run_until_complete(rpc_us(args.steps, None))
        cold = loop.run_until_complete(rpc_us(args.steps, stream))
        rows["2 KiB unary RPC round trip (both ends here)"] = (warm, cold)
    loop.close()

    print(f"machine: {platform.machine()} cpus={os.cpu_count()} torch={torch.__version__} "
          f"python={platform.python_version()}; load average {os.getloadavg()[0]:.1f}")
    print(f"command: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} python "
          f"scripts/bench_cold_cache.py --steps {args.steps} --stream-mib {args.stream_mib}")
    print(f"{'piece':46s} {'warm us':>9s} {'cold us':>9s} {'cold/warm':>9s}")
    result = {}
    for name, (warm, cold) in rows.items():
        print(f"{name:46s} {warm:9.1f} {cold:9.1f} {cold / warm:9.2f}")
        result[name] = {"warm_us": round(warm, 1), "cold_us": round(cold, 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
