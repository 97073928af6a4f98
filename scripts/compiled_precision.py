#!/usr/bin/env python3
"""How far the compiled single-token step (blocks/compiled_decode.py) and the plain bf16 step are
from a float32 run of the same random-weight span, and from each other (issue 9).

A deep random-weight span in bf16 (``--load-format dummy`` weights, Llama-3 proportions) runs a
prefix, then single-token steps, three ways: float32 plain (the reference), bf16 plain (what the
load-time check compares against) and bf16 compiled (torch.compile over a static cache; on the
CPU, without CUDA graphs). Prints relative L2 and max errors per step. Runs on the CPU (a 32-layer
compile takes minutes there) or, with ``--device cuda``, on a GPU.

    python scripts/compiled_precision.py [--layers 32] [--hidden 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from overlay.cli.arguments import positive_int  # counts: refused when below 1

if TYPE_CHECKING:
    import torch

# torch, transformers and the blocks (4-7 s to import) are imported in main, after the
# arguments are parsed, so that `--help` and typos answer at once.


def errors(got: torch.Tensor, want: torch.Tensor) -> str:
    got, want = got.float(), want.float()
    l2 = float((got - want).norm() / want.norm())
    worst = float((got - want).abs().max() / want.abs().max())
    return f"rel L2 {l2:.4f}, max {worst:.4f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=positive_int, default=32)
    parser.add_argument("--hidden", type=positive_int, default=128)
    parser.add_argument("--steps", type=positive_int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch
    from transformers import LlamaConfig

    from blocks import compiled_decode
    from blocks.fast_decode import DecodeOptions, new_static_cache
    from blocks.span import BlockSpan
    from model_parts.dummy import DummyModelFiles
    from model_parts.skeleton import DeviceOptions

    plain_decode = DecodeOptions(direct_layers=False, static_cache=False, compile=False)
    hidden = args.hidden
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 7 // 2,
                    num_hidden_layers=args.layers, num_attention_heads=max(1, hidden // 64),
                    num_key_value_heads=max(1, hidden // 256), vocab_size=256,
                    rope_theta=500000.0, dtype="bfloat16").save_pretrained(directory)
        files = DummyModelFiles(directory)
        spans = {
            dtype: BlockSpan.load(files, 0, args.layers, DeviceOptions(args.device, dtype),
                                  decode=plain_decode)
            for dtype in ("float32", "bfloat16")
        }
        static = BlockSpan.load(files, 0, args.layers, DeviceOptions(args.device, "bfloat16"),
                                decode=DecodeOptions(static_cache=True, cuda_graphs=False,
                                                     compile=False))
        step = compiled_decode.CompiledStep(static)
        generator = torch.Generator().manual_seed(0)
        prefix = torch.randn(1, 3, hidden, generator=generator).to(args.device)
        sessions = {dtype: span.new_session(1, 16) for dtype, span in spans.items()}
        cache = new_static_cache(static, 1, compiled_decode.MIN_CACHE_LENGTH)
        sessions["float32"].step(prefix)
        sessions["bfloat16"].step(prefix.bfloat16())
        static._run(prefix.bfloat16(), cache, None)
        began = time.perf_counter()
        for index in range(args.steps):
            new = torch.randn(1, 1, hidden, generator=generator).to(args.device)
            reference = sessions["float32"].step(new)
            plain = sessions["bfloat16"].step(new.bfloat16())
            compiled = static._run_compiled(step, new.bfloat16(), cache)
            print(f"step {index}: max |float32| {float(reference.abs().max()):.3f}; plain bf16 vs "
                  f"float32: {errors(plain, reference)}; compiled bf16 vs float32: "
                  f"{errors(compiled, reference)}; compiled vs plain bf16: "
                  f"{errors(compiled, plain)} (abs {float((compiled - plain).abs().max()):.4f})"
                  f"{f'; compile {time.perf_counter() - began:.0f} s' if index == 0 else ''}",
                  flush=True)
    print(f"command: python scripts/compiled_precision.py {' '.join(sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
