"""`overlay-node demo`: a whole swarm on this machine, checked against transformers.

It writes a small random-weight Llama model (a few hundred thousand parameters) to a cache
directory, starts a bootstrap node and three block servers as subprocesses on 127.0.0.1,
generates through the swarm, runs the same model locally with transformers, checks that the
tokens are identical, prints the route, the tokens and the speed, and stops every process it
started (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from overlay.cli.arguments import positive_int

DEMO_CONFIG = {  # Llama family, ~0.4 M parameters: loads in a blink, exercises every code path
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
DEMO_SPANS = [(0, 2), (2, 4), (4, 6)]
_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors"}  # as written
DEMO_SEED = 20231120


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run a local swarm and generate through it",
                          description=__doc__.splitlines()[0])
    # checked while parsing: a bad count found after the swarm has started costs its start
    demo.add_argument("--max-new-tokens", type=positive_int, default=32,
                      help="tokens to generate, at least 1 (default 32)")
    demo.add_argument("--cache-dir", default=None,
                      help="where the demo model is written (default ~/.cache/overlay-node)")
    demo.add_argument("--keep-logs", metavar="DIR", help="write each process's log here")
    demo.set_defaults(func=run_demo)


def cache_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "overlay-node"


def write_demo_model(directory: Path) -> Path:
    """The demo model, written once (seeded, so every machine gets the same weights).

    Safe when several demos start together: each writes into a temporary directory of its own
    and renames it into place; one that loses the race uses the winner's (identical) model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    problem = _damage(directory)
    if problem is None:
        return directory
    if problem != "missing" and set(os.listdir(directory)) <= _MODEL_FILES:
        # ours, broken (a full disk, a killed write): it is a cache (anything else there is
        # not ours, and is left for the user to remove)
        print(f"overlay-node demo: the cached model in {directory} is damaged ({problem}); "
              f"writing it again", file=sys.stderr, flush=True)
        aside = directory.with_name(f"{directory.name}.damaged-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):  # another demo moved it first
            directory.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
    torch.manual_seed(DEMO_SEED)
    model = LlamaForCausalLM(LlamaConfig(**DEMO_CONFIG))
    with torch.no_grad():  # larger weights than the default init: varied, confident tokens
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.15)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            tmp.rename(directory)  # atomic; fails when the directory exists
        except OSError:
            if _damage(directory) is not None:  # not another demo's model: what is in the way
                raise OSError(f"cannot write the demo model: {directory} exists and holds "
                              f"no complete model (remove it)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _damage(directory: Path) -> str | None:
    """What is wrong with the demo model in `directory` (None: nothing; "missing": no model
    there at all, so nothing of ours to replace)."""
    from safetensors import SafetensorError, safe_open

    config, weights = directory / "config.json", directory / "model.safetensors"
    if not config.exists() and not weights.exists():
        return "missing"
    try:
        stored = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        return f"config.json: {e}"
    shape = ("vocab_size", "hidden_size", "num_hidden_layers")  # (transformers moves others)
    if not isinstance(stored, dict) or any(stored.get(k) != DEMO_CONFIG[k] for k in shape):
        return "config.json is not the demo model's"
    try:
        with safe_open(weights, "pt") as tensors:
            if not list(tensors.keys()):
                return "model.safetensors holds no tensors"
    except (OSError, SafetensorError) as e:
        return f"model.safetensors: {e}"
    return None


async def run_demo(args: argparse.Namespace) -> int:
    import torch

    from client.local_swarm import LocalSwarm, SwarmStartError

    loop = asyncio.get_running_loop()
    print("overlay-node demo: a swarm of 3 block servers on 127.0.0.1", flush=True)
    try:
        model_dir = await loop.run_in_executor(
            None, write_demo_model, cache_dir(args.cache_dir) / "demo-llama-6x64")
    except OSError as e:  # a --cache-dir that is a file, a read-only home...: no traceback
        print(f"overlay-node demo: cannot write the demo model: {e}", file=sys.stderr)
        return 1
    print(f"  model: {model_dir} (Llama, {DEMO_CONFIG['num_hidden_layers']} blocks, "
          f"hidden {DEMO_CONFIG['hidden_size']}, random weights)", flush=True)
    swarm = LocalSwarm(model_dir, DEMO_SPANS, log_dir=args.keep_logs)
    began = time.perf_counter()
    starting = loop.run_in_executor(None, swarm.start)
    try:
        try:
            await asyncio.shield(starting)
        except (SwarmStartError, OSError) as e:  # the former carries the failed log; the
            # latter: a --keep-logs that is a file or not writable
            print(f"overlay-node demo: the local swarm did not start: {e}", file=sys.stderr)
            return 1
        print(f"  started a bootstrap node and {len(DEMO_SPANS)} servers in "
              f"{time.perf_counter() - began:.1f} s", flush=True)
        for (start, end), addr in zip(DEMO_SPANS, swarm.server_addrs):
            print(f"    blocks [{start}, {end}): {addr}", flush=True)
        prompt = torch.tensor([[1, 17, 42, 99, 7, 256, 311, 5]])
        result = await _generate(model_dir, swarm.bootstrap, prompt, args.max_new_tokens)
        expected = await loop.run_in_executor(None, _local_tokens, model_dir, prompt,
                                              args.max_new_tokens)
        print(f"  route:  {' -> '.join(result['route'])}")
        print(f"  prompt: {prompt[0].tolist()}")
        print(f"  swarm:  {result['tokens']}")
        print(f"  local:  {expected}")
        print(f"  speed:  {result['ms_per_token']:.1f} ms/token through the swarm (greedy, "
              f"{len(result['tokens'])} tokens, opening the session included)", flush=True)
    finally:
        swarm.abort()
        with contextlib.suppress(BaseException):
            await starting
        await loop.run_in_executor(None, swarm.stop)
        print("  stopped every process of the swarm", flush=True)
    if result["tokens"] != expected:
        print("overlay-node demo: FAILED: the swarm's tokens differ from the local model's",
              file=sys.stderr)
        return 1
    print("  OK: identical to the same model run locally by transformers")
    return 0


async def _generate(model_dir: Path, bootstrap: str, prompt, max_new_tokens: int) -> dict:
    from client.model import RemoteModel

    model = await RemoteModel.open(model_dir, bootstrap=[bootstrap])
    try:
        began = time.perf_counter()
        output = await model.generate(prompt, max_new_tokens=max_new_tokens)
        elapsed = time.perf_counter() - began
        tokens = output[0, prompt.shape[1]:].tolist()
        route = [f"{s.peer_id[-6:]}[{s.start}:{s.end})" for s in model.last_route]
    finally:
        await model.close()
    return {"tokens": tokens, "route": route, "ms_per_token": elapsed * 1000 / len(tokens)}


def _local_tokens(model_dir: Path, prompt, max_new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        output = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, prompt.shape[1]:].tolist()
