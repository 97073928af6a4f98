"""The fine-tuning part of `DistributedModelForCausalLM`: what it trains and how a full pass
runs when something must be differentiable.

    model = DistributedModelForCausalLM.from_pretrained(DIR, bootstrap=[...],
                                                        tuning_mode="deep_ptune", pre_seq_len=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)   # the prompts (or LoRA) only
    loss = model(input_ids=ids, labels=ids).loss;  loss.backward();  opt.step()

`ModelTuning` is an nn.Module of the model (so its parameters are the model's): the prompts of
"ptune" / "deep_ptune" (client/ptune.py) or the LoRA weights of "lora" (client/lora.py), and
optionally the name of an adapter the servers host. Its `full_pass` prepends the prompts,
runs the remote blocks as a differentiable function (client/autograd.py) and drops the
prompt positions again, so logits and labels line up with the caller's input. With padding,
each row's tokens follow the prompts directly (the padding moved after them, and back in the
output), as generation's positions, which skip padding, have them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from client.autograd import RemotePass, remote_blocks
from client.inference import SessionTuning
from client.lora import LoraConfig, RemoteLora
from client.ptune import TUNING_MODES, PromptTuning
from client.sync_loop import BackgroundLoop
from client.training import (
    DEFAULT_CHUNK_TOKENS,
    SwarmTrainer,
    TrainingConfig,
    Tuning,
    check_adapter,
)
from model_parts.skeleton import ModelInputError

# Token ids whose embeddings set the spread of fresh prompts (ptune): the first ones.
_INIT_PROBE_TOKENS = 1024


@dataclass(frozen=True, slots=True)
class TuningOptions:
    """The fine-tuning keywords of `from_pretrained`."""

    tuning_mode: str | None = None  # None, "ptune", "deep_ptune" or "lora"
    pre_seq_len: int = 0  # prompt positions (ptune, deep_ptune)
    lora: LoraConfig | None = None  # rank, alpha, target modules (lora); default LoraConfig()
    lora_path: str | Path | None = None  # start from a saved PEFT LoRA adapter (lora)
    adapter: str | None = None  # use an adapter the servers host, by name
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS  # batch x length per request (client/training.py)

    _KEYS = ("tuning_mode", "pre_seq_len", "lora", "lora_path", "adapter", "chunk_tokens",
             "lora_rank", "lora_alpha", "lora_target_modules")

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> TuningOptions:
        """Take the fine-tuning keywords out of `kwargs` (the rest are ModelOptions)."""
        found = {key: kwargs.pop(key) for key in cls._KEYS if key in kwargs}
        lora_fields = {name: found.pop(f"lora_{name}") for name in
                       ("rank", "alpha", "target_modules") if f"lora_{name}" in found}
        mode = found.get("tuning_mode")
        if mode is not None and mode not in TUNING_MODES:
            raise ValueError(f"tuning_mode must be one of {TUNING_MODES} or None, not {mode!r}")
        if lora_fields or found.get("lora_path"):
            if mode != "lora":
                raise ValueError("LoRA options need tuning_mode='lora'")
            if found.get("lora_path") and (lora_fields or found.get("lora") is not None):
                # they would be ignored: the saved adapter_config.json decides them
                raise ValueError("lora_path loads the adapter's own rank, alpha and target "
                                 "modules; give no lora / lora_rank / lora_alpha / "
                                 "lora_target_modules with it")
            if "lora" in found:
                raise ValueError("give lora=LoraConfig(...) or lora_rank/lora_alpha/"
                                 "lora_target_modules, not both")
        if mode == "lora" and "lora" not in found:
            found["lora"] = LoraConfig(**lora_fields)
        if mode in ("ptune", "deep_ptune") and not found.get("pre_seq_len"):
            raise ValueError(f"tuning_mode={mode!r} needs pre_seq_len >= 1")
        if mode not in ("ptune", "deep_ptune") and found.get("pre_seq_len"):
            raise ValueError("pre_seq_len is for tuning_mode 'ptune' or 'deep_ptune'")
        if mode == "lora" and found.get("adapter"):
            raise ValueError("a model trains its own LoRA or uses a hosted adapter, not both")
        return cls(**found)


class ModelTuning(nn.Module):
    """Trainable prompts or LoRA of a distributed model, and its differentiable full pass."""

    def __init__(self, config: PretrainedConfig, remote: Any, loop: BackgroundLoop,
                 options: TuningOptions):
        super().__init__()
        self.options = options
        self.mode = options.tuning_mode
        self.adapter = options.adapter
        self._remote = remote
        self._loop = loop
        head = remote.head
        model_options = remote.options
        self.trainer = SwarmTrainer(remote.blocks, TrainingConfig(
            chunk_tokens=options.chunk_tokens, timeout=model_options.forward_timeout,
            compression=model_options.compression))
        if self.adapter is not None:
            loop.run(check_adapter(remote.blocks, self.adapter))
        self.ptune: PromptTuning | None = None
        self.lora: RemoteLora | None = None
        if self.mode in ("ptune", "deep_ptune"):
            probe = torch.arange(min(head.vocab_size, _INIT_PROBE_TOKENS)).unsqueeze(0)
            std = float(head.embed(probe).float().std())
            self.ptune = PromptTuning(self.mode, options.pre_seq_len, head.hidden_size,
                                      remote.num_blocks, init_std=std)
        elif self.mode == "lora":
            if options.lora_path is not None:
                self.lora = RemoteLora.from_pretrained(options.lora_path, config)
            else:
                self.lora = RemoteLora(config, options.lora or LoraConfig())
        # The trained values live where the head runs, so that an optimizer over
        # `model.parameters()` works on that device (float32 master copies either way).
        for module in (self.ptune, self.lora):
            if module is not None:
                module.to(head.device)

    @property
    def pre_seq_len(self) -> int:
        return 0 if self.ptune is None else self.ptune.pre_seq_len

    @property
    def active(self) -> bool:
        """Whether full passes must go through this module (tuned weights or an adapter)."""
        return self.mode is not None or self.adapter is not None

    # ------------------------------------------------------------------ full passes
    def full_pass(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None
                  ) -> torch.Tensor:
        """Embedded input [batch, length, hidden] -> hidden states after the last block, for
        the same positions; differentiable w.r.t. the input and the tuned parameters."""
        head = self._remote.head
        if hidden.is_inference():
            hidden = hidden.clone()  # out of inference mode, so autograd may use it
        batch = hidden.shape[0]
        prefix = self.pre_seq_len
        deep = None
        order = None
        if self.ptune is not None and attention_mask is not None and \
                not bool(attention_mask.all()):
            # Generation puts [prompts, padding, tokens] in a session whose positions skip
            # padding: the tokens sit right after the prompts. A full pass counts every
            # position, so the padding goes after the tokens here (causal attention never
            # reaches it) and the prompts are trained at the distances generation uses.
            order = _tokens_first(attention_mask.to(hidden.device))
            hidden = _take(hidden, order)
            attention_mask = attention_mask.to(order.device).gather(1, order)
        if self.ptune is not None:
            hidden = torch.cat([self.ptune.shallow(batch, hidden.dtype, hidden.device), hidden],
                               dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat(
                    [attention_mask.new_ones(batch, prefix), attention_mask], dim=1)
            deep = self.ptune.deep(hidden.dtype, hidden.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(head.device)
        spec = RemotePass(self.trainer, self._loop, attention_mask, self.adapter, self.lora,
                          check_open=self._remote._check_open)
        out = remote_blocks(spec, hidden, deep)
        out = out[:, prefix:] if prefix else out
        return out if order is None else _take(out, order.argsort(dim=1))

    # ------------------------------------------------------------------ inference sessions
    def session_kwargs(self) -> dict[str, Any]:
        """What RemoteModel.inference_session needs for generation with these weights: the
        LoRA (uploaded as each span opens) or the adapter's name, and the deep prompts (sent
        with the steps that cover the prefix positions)."""
        dtype = self._remote.head.dtype
        snapshot = None if self.lora is None else self.lora.snapshot(dtype)
        deep = None
        if self.ptune is not None:
            with torch.no_grad():
                deep = self.ptune.deep(dtype, self._remote.head.device)
                deep = None if deep is None else deep.clone()
        tuning = Tuning(None, snapshot, self.adapter)
        kwargs: dict[str, Any] = {"tuning": SessionTuning(self.trainer.session_opening(tuning),
                                                          deep)}
        if self.adapter is not None:
            kwargs["adapter"] = self.adapter
        return kwargs

    def weights_now(self) -> tuple[torch.Tensor, ...]:
        """A copy of the trainable weights (prompts, LoRA), taken when a session opens: the
        session computed with these, and serves its cache only while they stay."""
        with torch.no_grad():
            return tuple(p.detach().clone() for p in self.parameters())

    def changed_since(self, weights: tuple[torch.Tensor, ...]) -> bool:
        """Whether the trainable weights differ from `weights` (an optimizer step since)."""
        current = list(self.parameters())
        return len(current) != len(weights) or any(
            not torch.equal(p.detach(), w) for p, w in zip(current, weights, strict=True))

    def session_prefix(self, batch: int, dtype: torch.dtype, device: torch.device
                       ) -> torch.Tensor | None:
        """Hidden states to put before a session's first step (ptune's prompts), or None."""
        if self.ptune is None:
            return None
        with torch.no_grad():
            return self.ptune.shallow(batch, dtype, device).clone()

    def save_adapter(self, directory: str | Path, base_model: str | None = None) -> Path:
        if self.lora is None:
            raise ModelInputError("only tuning_mode='lora' has an adapter to save")
        return self.lora.save_pretrained(directory, base_model)


def _tokens_first(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the positions of its tokens in order, then those of its padding."""
    return torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices


def _take(hidden: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """hidden[b, order[b, i]] at [b, i] (differentiable)."""
    return hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
