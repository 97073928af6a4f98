#!/usr/bin/env python3
"""Fine-tuning through a swarm, next to the same training run locally (issue 7).

Writes the demo-sized model (`overlay-node demo`'s: a 6-block random-weight Llama), serves it
with two `overlay-node serve` processes on 127.0.0.1 (blocks [0, 3) and [3, 6)), and trains on
a small synthetic task (learn eight "counting" sequences a, a+k, a+2k, ... of random start and
stride, the same batch every step) twice: with deep prompts (tuning_mode="deep_ptune") and with
LoRA (tuning_mode="lora").
Each run is repeated locally with transformers (deep prompts added by hooks; LoRA by PEFT) from
the same initial weights, with the same optimizer and batches; the losses are printed side by
side, with the time per step of each. Stops every process it started (also on Ctrl-C).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/finetune_example.py [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.demo import DEMO_CONFIG, write_demo_model
from client.local_swarm import LocalSwarm
from overlay.cli.arguments import positive_int  # counts: refused when below 1

if TYPE_CHECKING:
    import torch

# torch, transformers and the client (4-7 s to import) are imported where they are used, after
# the arguments are parsed, so that `--help` and typos answer at once.

SPANS = [(0, 3), (3, 6)]
PRE_SEQ_LEN = 8
LORA_RANK, LORA_ALPHA, LORA_TARGETS = 8, 16, ["q_proj", "v_proj"]


def counting_batches(steps: int, batch: int, length: int, seed: int) -> list[torch.Tensor]:
    """One batch of sequences start, start + k, start + 2k, ... (mod the vocabulary, clear of
    ids 0-2), given at every step."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = DEMO_CONFIG["vocab_size"] - 3
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    stride = torch.randint(1, 4, (batch, 1), generator=g)
    return [3 + (start + stride * torch.arange(length)) % vocab] * steps


class DeepPrompts:
    """Local deep prompt tuning: prompts prepended to the embeddings, entry i of the deep
    prompts added to block i's input prefix (what the servers do), prompt positions dropped."""

    def __init__(self, model, shallow: torch.Tensor, deep: torch.Tensor):
        import torch

        self.model = model
        self.shallow = torch.nn.Parameter(shallow.clone())
        self.deep = torch.nn.Parameter(deep.clone())
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(self._adder(i), with_kwargs=True)

    def _adder(self, i):
        import torch  # here, not in the hook: it runs in every forward pass

        def add(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            n = self.deep.shape[1]
            hidden = torch.cat([hidden[:, :n] + self.deep[i], hidden[:, n:]], dim=1)
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs
        return add

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        import torch
        from transformers.loss.loss_utils import ForCausalLMLoss

        embeds = self.model.model.embed_tokens(ids)
        prompts = self.shallow.unsqueeze(0).expand(ids.shape[0], -1, -1)
        logits = self.model(inputs_embeds=torch.cat([prompts, embeds], dim=1)).logits
        return ForCausalLMLoss(logits[:, self.shallow.shape[0]:].contiguous(), ids,
                               self.model.config.vocab_size)


def train(params, loss_of, batches, lr) -> tuple[list[float], float]:
    import torch

    optimizer = torch.optim.Adam(params, lr=lr)
    losses, began = [], time.perf_counter()
    for ids in batches:
        optimizer.zero_grad()
        loss = loss_of(ids)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, (time.perf_counter() - began) / len(batches)


def report(title: str, swarm: tuple[list[float], float], local: tuple[list[float], float]):
    print(f"\n{title}")
    print(f"{'step':>5} {'swarm loss':>12} {'local loss':>12} {'|diff|':>10}")
    for step, (a, b) in enumerate(zip(swarm[0], local[0]), 1):
        print(f"{step:>5} {a:>12.6f} {b:>12.6f} {abs(a - b):>10.2e}")
    worst = max(abs(a - b) for a, b in zip(swarm[0], local[0]))
    print(f"loss {swarm[0][0]:.4f} -> {swarm[0][-1]:.4f}; largest |swarm - local| {worst:.2e}; "
          f"{swarm[1] * 1e3:.1f} ms/step through the swarm vs {local[1] * 1e3:.1f} ms/step "
          f"locally (x{swarm[1] / local[1]:.1f})")
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=30)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--length", type=positive_int, default=16)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from client.causal_lm import DistributedModelForCausalLM

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        sys.exit("the local LoRA run uses PEFT: pip install peft")
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
          f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    batches = counting_batches(args.steps, args.batch, args.length, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_demo_model(Path(tmp) / "demo-model")
        with LocalSwarm(model_dir, SPANS, log_dir=Path(tmp) / "logs") as swarm:
            print(f"swarm: 2 servers on 127.0.0.1, blocks {SPANS}")
            torch.manual_seed(1)
            with DistributedModelForCausalLM.from_pretrained(
                    model_dir, bootstrap=[swarm.bootstrap], tuning_mode="deep_ptune",
                    pre_seq_len=PRE_SEQ_LEN) as model:
                ptune = model.tuning.ptune
                local = DeepPrompts(AutoModelForCausalLM.from_pretrained(model_dir).eval(),
                                    ptune.prompt_embeddings.detach(),
                                    ptune.intermediate_prompt_embeddings.detach())
                remote_run = train(list(model.parameters()),
                                   lambda x: model(input_ids=x, labels=x).loss, batches, 5e-2)
            local_run = train([local.shallow, local.deep], local.loss, batches, 5e-2)
            worst_ptune = report(f"deep prompt tuning (pre_seq_len={PRE_SEQ_LEN}, Adam 5e-2)",
                                 remote_run, local_run)

            torch.manual_seed(2)
            peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir).eval(),
                                  LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA,
                                             target_modules=LORA_TARGETS))
            with DistributedModelForCausalLM.from_pretrained(
                    model_dir, bootstrap=[swarm.bootstrap], tuning_mode="lora",
                    lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA,
                    lora_target_modules=LORA_TARGETS) as model:
                from peft import get_peft_model_state_dict

                model.tuning.lora.load_peft_state_dict(get_peft_model_state_dict(peft))
                remote_run = train(list(model.parameters()),
                                   lambda x: model(input_ids=x, labels=x).loss, batches, 3e-2)
                adapter = model.save_adapter(Path(tmp) / "trained-lora")
            local_run = train([p for p in peft.parameters() if p.requires_grad],
                              lambda x: peft(input_ids=x, labels=x).loss, batches, 3e-2)
            worst_lora = report(f"LoRA (rank {LORA_RANK}, alpha {LORA_ALPHA}, {LORA_TARGETS}, "
                                f"Adam 3e-2)", remote_run, local_run)
            print(f"\nthe trained adapter was saved in PEFT's format ({adapter.name}: "
                  f"{', '.join(sorted(p.name for p in adapter.iterdir()))})")
    print(f"largest loss difference: deep prompts {worst_ptune:.2e}, LoRA {worst_lora:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
