#!/usr/bin/env python3
"""GPU benchmark (issue 9): big random-weight models through the swarm vs transformers locally.

All models are built from a config alone (``--load-format dummy``: no downloads, no checkpoint on
disk), in bf16, on the GPU(s) of this machine. In one run:

(a) Llama-3-8B shape, all 32 blocks on one server, the client (embeddings, head) in this process
    on the same GPU, through the swarm (DHT, Noise, RPC on 127.0.0.1), greedy: ms/token, against
    transformers' own ``generate`` of the same weights in this process; and the floor = bytes of
    weights read per token / the GPU's measured memory bandwidth (a large device-to-device copy,
    bytes read + written over its time).
(b) Llama-2-70B shape (80 blocks, hidden 8192) split over two servers, one per GPU (both on the
    one GPU when there is only one, if the weights fit): steps/s of single-token steps at the end
    of 128- and 2048-token sequences (a prefill of the rest first).
(c) (a) with the server's weights in int8 (LLM.int8()) and nf4 (QLoRA) through bitsandbytes.

(a) runs once per server decode mode of ``--decode`` (default ``compiled,fast``: torch.compile
then CUDA graphs, against CUDA graphs of the eager step), side by side in the same run; for each
it also reports where a token's time goes: the server's own step (its CUDA graph replay, timed
on the GPU and logged by the server), the client's head (final norm, logits and argmax as one
CUDA graph, the token id read back), its embedding, and the rest of the step's round trip
(serialization, encryption, RPC, copies).

    python scripts/bench_gpu.py [--parts a,b,c] [--tokens 128] [--decode compiled,fast]
                                [--runs 2] [--log-dir DIR]

The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from overlay.cli.arguments import positive_int  # counts: refused when below 1

if TYPE_CHECKING:  # bound at run time by import_heavy_modules()
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from client.local_head import LocalHead
    from client.local_swarm import LocalSwarm
    from client.remote_blocks import RemoteBlocks
    from client.swarm import SwarmClient
    from model_parts.dummy import DummyModelFiles, fill_with_dummy_weights
    from model_parts.files import default_model_id
    from model_parts.skeleton import DeviceOptions
    from overlay.runtime import new_event_loop

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "rope_theta": 500000.0, "max_position_embeddings": 8192}
LLAMA2_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
              "max_position_embeddings": 4096}
TARGET_MS_PER_TOKEN = 8.0  # issue 9, (a)
TARGET_STEPS_PER_S = 20.0  # issue 9, (b)
PROMPT = [1, 17, 42, 99, 7, 256, 311, 5]
# Smoke test of this script on a CPU: python scripts/bench_gpu.py --device cpu --tiny
DEVICE = "cuda"
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512}


def import_heavy_modules() -> None:
    """Import torch, transformers and the client (4-7 s) into this module's globals: called
    once the arguments are parsed, so that `--help` and typos answer at once."""
    global torch, AutoModelForCausalLM, LlamaConfig, LocalHead, LocalSwarm, RemoteBlocks
    global SwarmClient, DummyModelFiles, fill_with_dummy_weights, default_model_id
    global DeviceOptions, new_event_loop
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from client.local_head import LocalHead
    from client.local_swarm import LocalSwarm
    from client.remote_blocks import RemoteBlocks
    from client.swarm import SwarmClient
    from model_parts.dummy import DummyModelFiles, fill_with_dummy_weights
    from model_parts.files import default_model_id
    from model_parts.skeleton import DeviceOptions
    from overlay.runtime import new_event_loop


def _sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def write_config(shape: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                         dtype="bfloat16", **shape)
    config.save_pretrained(directory)
    return directory


def copy_bandwidth(gib: float = 4.0, repeats: int = 20) -> float:
    """Bytes read + written per second by a device-to-device copy of ``gib`` GiB."""
    source = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=DEVICE).random_()
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del source, target
    torch.cuda.empty_cache()
    times.sort()
    return 2 * gib * 2**30 / times[len(times) // 2]


def local_generate(model_dir: Path, tokens: int) -> tuple[float, list[int], int]:
    """transformers' own generate, bf16, same dummy weights: ms/token, tokens, weight bytes."""
    config = LlamaConfig.from_pretrained(model_dir)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    fill_with_dummy_weights(model)
    prompt = torch.tensor([PROMPT], device=DEVICE)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        _sync()
        began = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=tokens, do_sample=False,
                             min_new_tokens=tokens)
        _sync()
        elapsed = time.perf_counter() - began
    layers = model.model.layers
    block_bytes = sum(p.numel() * p.element_size() for p in layers.parameters())
    head_bytes = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return elapsed * 1000 / tokens, out[0, len(PROMPT):].tolist(), block_bytes + head_bytes


async def swarm_generate(model_dir: Path, bootstrap: str, tokens: int,
                         head: LocalHead) -> tuple[float, list[int], dict[str, float]]:
    """Greedy decoding through one inference session; the head runs here, on the GPU.
    Returns ms/token, the tokens, and the mean ms/token of each part of the client's loop."""
    num_blocks = LlamaConfig.from_pretrained(model_dir).num_hidden_layers
    client = await SwarmClient.connect([bootstrap])
    try:
        remote = RemoteBlocks(client, default_model_id(model_dir), num_blocks)
        prompt = torch.tensor([PROMPT], device=DEVICE)
        async with await remote.inference_session(1, len(PROMPT) + tokens + 8) as session:
            await session.step(head.embed(prompt[:, :2]))  # warm-up: route, graph captures
            hidden = await session.step(head.embed(prompt[:, 2:3], position_ids=2))
            head.greedy_tokens(hidden)
            session.rollback(0)
            _sync()
            clock = time.perf_counter
            parts = {"head": 0.0, "embed": 0.0, "step": 0.0}
            began = clock()
            hidden = await session.step(head.embed(prompt))
            new: list[int] = []
            for _ in range(tokens):
                t0 = clock()
                # The argmax on the GPU (one graph with the norm and head); the ids read back.
                token = head.greedy_tokens(hidden[:, -1:])
                new.append(int(token))
                t1 = clock()
                parts["head"] += t1 - t0
                if len(new) == tokens:
                    break
                embedded = head.embed(token[:, None], position_ids=session.position)
                t2 = clock()
                hidden = await session.step(embedded)
                parts["embed"] += t2 - t1
                parts["step"] += clock() - t2
            elapsed = clock() - began
    finally:
        await client.close()
    return elapsed * 1000 / tokens, new, {k: v * 1000 / tokens for k, v in parts.items()}


async def swarm_steps(model_dir: Path, bootstrap: str, length: int, steps: int,
                      head: LocalHead) -> float:
    """Single-token steps/s at the end of a ``length``-token sequence (prefill first)."""
    num_blocks = LlamaConfig.from_pretrained(model_dir).num_hidden_layers
    client = await SwarmClient.connect([bootstrap])
    try:
        remote = RemoteBlocks(client, default_model_id(model_dir), num_blocks)
        generator = torch.Generator().manual_seed(0)
        vocab = LlamaConfig.from_pretrained(model_dir).vocab_size
        ids = torch.randint(3, vocab - 1, (1, length), generator=generator).to(DEVICE)
        async with await remote.inference_session(1, length) as session:
            prefix = length - steps
            await session.step(head.embed(ids[:, :prefix]))
            await session.step(head.embed(ids[:, prefix:prefix + 1], position_ids=prefix))
            session.rollback(prefix)  # the graph is captured; now time every step
            began = time.perf_counter()
            for index in range(prefix, length):
                hidden = await session.step(head.embed(ids[:, index:index + 1],
                                                       position_ids=index))
            head.greedy_tokens(hidden[:, -1:]).tolist()
            elapsed = time.perf_counter() - began
    finally:
        await client.close()
    return steps / elapsed


def server_log_figures(log_dir: Path) -> dict:
    """What the server logged: load time, compile times, its CUDA graph's step time."""
    text = "".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("server-*.log")))
    figures: dict = {}
    loaded = re.search(r"loaded \d+ blocks in ([\d.]+) s", text)
    if loaded:
        figures["server_load_s"] = float(loaded.group(1))
    compiled = re.findall(r"compiled the step for batch (\d+), cache length (\d+) in ([\d.]+) s",
                          text)
    figures["compile_s"] = {f"{b}x{n}": float(s) for b, n, s in compiled}
    graphs = re.findall(r"CUDA graph of the (\w+) step, batch 1, cache length \d+: ([\d.]+) ms",
                        text)
    if graphs:
        figures["server_graph"] = graphs[-1][0]
        figures["server_step_ms"] = float(graphs[-1][1])
    accepted = re.search(r"accepted by the float32-reference rule: (.*)", text)
    if accepted:
        figures["compile_check"] = accepted.group(1)[:400]
    failures = re.findall(r"(no compiled steps: .*|torch.compile failed .*|the compiled step .*)",
                          text)
    if failures:
        figures["compile_problems"] = [f[:300] for f in failures[:3]]
    return figures


def run_a_or_c(model_dir: Path, quant: str, tokens: int, local: dict, log_dir: Path,
               decode: str = "compiled", repeats: int = 2) -> dict:
    extra = ["--device", DEVICE, "--dtype", "bfloat16", "--load-format", "dummy",
             "--quant", quant, "--max-length", "4096", "--cache-tokens", "4096",
             "--decode", decode]
    files = DummyModelFiles(model_dir)
    head = LocalHead.load(files, DeviceOptions(device=DEVICE, dtype="bfloat16"))
    blocks = LlamaConfig.from_pretrained(model_dir).num_hidden_layers
    began = time.perf_counter()
    server_logs = log_dir / f"a-{quant}-{decode}"
    with (LocalSwarm(model_dir, [(0, blocks)], extra_serve_args=extra, start_timeout=600,
                     log_dir=server_logs) as swarm,
          asyncio.Runner(loop_factory=new_event_loop) as runner):
        started = time.perf_counter() - began
        runs = [runner.run(swarm_generate(model_dir, swarm.bootstrap, tokens, head))
                for _ in range(repeats)]
    del head
    gc.collect()
    torch.cuda.empty_cache()
    ms, new, parts = min(runs, key=lambda run: run[0])
    same = sum(a == b for a, b in zip(new, local["tokens"]))
    first_diff = next((i for i, (a, b) in enumerate(zip(new, local["tokens"])) if a != b), None)
    result = {"decode": decode, "swarm_ms_per_token": round(ms, 3),
              "local_ms_per_token": local["ms"], "speedup_vs_local": round(local["ms"] / ms, 2),
              "tokens_equal_to_local": same, "tokens": tokens, "first_difference_at": first_diff,
              "runs_ms_per_token": [round(r[0], 3) for r in runs],
              "median_ms_per_token": round(statistics.median(r[0] for r in runs), 3),
              "client_parts_ms_per_token": {k: round(v, 3) for k, v in parts.items()},
              "swarm_start_s": round(started, 1), **server_log_figures(server_logs)}
    if "server_step_ms" in result:
        result["step_round_trip_minus_server_ms"] = round(
            parts["step"] - result["server_step_ms"], 3)
    return result


def run_b(model_dir: Path, log_dir: Path) -> dict:
    gpus = torch.cuda.device_count()
    devices = ["cuda:0", "cuda:1"] if gpus >= 2 else ["cuda:0", "cuda:0"]
    if DEVICE == "cpu":
        devices = ["cpu", "cpu"]
    files = DummyModelFiles(model_dir)
    head = LocalHead.load(files, DeviceOptions(device=devices[0], dtype="bfloat16"))
    common = ["--dtype", "bfloat16", "--load-format", "dummy", "--max-length", "2048",
              "--cache-tokens", "8192"]  # room for sessions still closing
    results: dict = {"gpus": gpus, "server_devices": devices}
    with LocalSwarm(model_dir, [], start_timeout=900, log_dir=log_dir / "b") as swarm:
        for (start, end), device in zip([(0, 40), (40, 80)], devices):
            swarm.extra_serve_args = [*common, "--device", device]
            swarm.start_server(start, end)
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            for length, steps in ((128, 64), (2048, 64)):
                rates = [runner.run(swarm_steps(model_dir, swarm.bootstrap, length, steps, head))
                         for _ in range(2)]
                results[f"steps_per_s_{length}"] = round(max(rates), 2)
                results[f"runs_{length}"] = [round(r, 2) for r in rates]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="a,b,c")
    parser.add_argument("--tokens", type=positive_int, default=128)
    parser.add_argument("--decode", default="compiled,fast",
                        help="server decode modes for (a), side by side (serve --decode)")
    parser.add_argument("--log-dir", default=None)
    parser.add_argument("--runs", type=positive_int, default=2,
                        help="generations per server in (a)/(c); the best is reported, all listed")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import_heavy_modules()

    global DEVICE
    DEVICE = args.device
    if args.tiny:
        LLAMA3_8B.update(TINY)
        LLAMA2_70B.update(TINY)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    parts = set(args.parts.split(","))
    on_gpu = DEVICE == "cuda"
    results: dict = {"gpu": torch.cuda.get_device_name(0) if on_gpu else "none (CPU smoke test)",
                     "gpus": torch.cuda.device_count(), "torch": torch.__version__,
                     "date": datetime.date.today().isoformat()}
    results["copy_bandwidth_gb_s"] = round(copy_bandwidth() / 1e9, 1) if on_gpu else 1.0
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(args.log_dir or tmp)
        if parts & {"a", "c"}:
            model_dir = write_config(LLAMA3_8B, Path(tmp) / "llama3-8b-shape")
            ms, tokens, weight_bytes = local_generate(model_dir, args.tokens)
            local = {"ms": round(ms, 3), "tokens": tokens}
            floor_ms = weight_bytes / (results["copy_bandwidth_gb_s"] * 1e9) * 1000
            results["a_weight_bytes_per_token"] = weight_bytes
            results["a_floor_ms_per_token"] = round(floor_ms, 3)
            modes = args.decode.split(",")
            runs = [("none", "a", mode) for mode in modes]
            runs += [("int8", "c", modes[0]), ("nf4", "c", modes[0])]
            for quant, part, mode in runs:
                if part not in parts:
                    continue
                key = "a" if quant == "none" else f"c_{quant}"
                if mode != modes[0]:
                    key += f"_{mode}"
                try:
                    results[key] = run_a_or_c(model_dir, quant, args.tokens, local, log_dir,
                                              mode, args.runs)
                except Exception as exc:
                    traceback.print_exc()
                    results[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                print(key, results[key], flush=True)
        if "b" in parts:
            model_dir = write_config(LLAMA2_70B, Path(tmp) / "llama2-70b-shape")
            try:
                results["b"] = run_b(model_dir, log_dir)
            except Exception as exc:
                traceback.print_exc()
                results["b"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            print("b", results["b"], flush=True)
    print(f"machine: {platform.machine()} gpu={results['gpu']} x{results['gpus']} "
          f"torch={torch.__version__} python={platform.python_version()}")
    print("command: python scripts/bench_gpu.py " + " ".join(sys.argv[1:]))
    print(f"copy bandwidth (read + write): {results['copy_bandwidth_gb_s']} GB/s")
    for key in [k for k in results if k == "a" or k.startswith("a_")]:
        a = results[key]
        if not isinstance(a, dict) or "swarm_ms_per_token" not in a:
            continue
        parts_ms = a["client_parts_ms_per_token"]
        print(f"(a) 8B bf16, serve --decode {a['decode']}: swarm {a['swarm_ms_per_token']:.2f} "
              f"ms/token, transformers {a['local_ms_per_token']:.2f}, floor "
              f"{results['a_floor_ms_per_token']:.2f}; server step "
              f"{a.get('server_step_ms', float('nan')):.2f} ms ({a.get('server_graph', '?')} "
              f"graph), client head {parts_ms['head']:.2f}, embed {parts_ms['embed']:.2f}, step "
              f"round trip {parts_ms['step']:.2f}; median of {len(a['runs_ms_per_token'])} runs "
              f"{a['median_ms_per_token']:.2f}; target <= {TARGET_MS_PER_TOKEN}: "
              f"{'met' if a['swarm_ms_per_token'] <= TARGET_MS_PER_TOKEN else 'MISSED'}")
    first = results.get("a", {})
    for key, other in results.items():
        if key.startswith("a_") and isinstance(other, dict) and "swarm_ms_per_token" in other \
                and "swarm_ms_per_token" in first:
            print(f"(a) swarm ms/token, --decode {other['decode']} / --decode {first['decode']}: "
                  f"{other['swarm_ms_per_token'] / first['swarm_ms_per_token']:.3f}")
    for quant in ("int8", "nf4"):
        c = results.get(f"c_{quant}", {})
        if "swarm_ms_per_token" in c:
            print(f"(c) 8B {quant}: swarm {c['swarm_ms_per_token']:.2f} ms/token")
    b = results.get("b", {})
    if "steps_per_s_128" in b:
        met = min(b["steps_per_s_128"], b["steps_per_s_2048"]) >= TARGET_STEPS_PER_S
        print(f"(b) 70B bf16 over 2 servers on {b['server_devices']}: {b['steps_per_s_128']} "
              f"steps/s at 128 tokens, {b['steps_per_s_2048']} at 2048; target >= "
              f"{TARGET_STEPS_PER_S}: {'met' if met else 'MISSED'}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
