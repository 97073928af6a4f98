"""LoRA weights the client owns for the remote blocks ("tuning_mode='lora'").

`RemoteLora` is an nn.Module holding, for every block and target linear module, PEFT's two
matrices: A [rank, in_features] (initialised like PEFT: Kaiming-uniform) and B
[out_features, rank] (zeros, so training starts from the frozen model). The client's
optimizer updates them; the servers apply them (blocks/tuning.py) and return their gradients.
`LoraSnapshot` is their value at one forward pass, as the servers receive it: per span, the
tensors in wire order and their content digest (model_parts.lora_format.lora_digest).

Saved and loaded in PEFT's LoRA format (adapter_config.json + adapter_model.safetensors, keys
`base_model.model.<layers path>.<i>.<module>.lora_{A,B}.weight`), so a trained adapter can be
loaded by PEFT, by this client for generation, or by a server (`serve --adapter NAME=DIR`).

This module may not do network I/O.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from blocks.protocol import MAX_LORA_RANK, lora_scaling
from model_parts.lora_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_KEY,
    peft_key,
    tensors_digest,
)
from model_parts.skeleton import build_skeleton, find_layer_list

# PEFT `LoraConfig` defaults: r=8, lora_alpha=8 (we use 16, the common choice of 2 x r).
DEFAULT_RANK = 8
DEFAULT_ALPHA = 16.0
# PEFT's default targets for Llama-style models (`q_proj`, `v_proj`).
DEFAULT_TARGETS = ("q_proj", "v_proj")


class LoraConfigError(ValueError):
    """A LoRA configuration that does not fit the model."""


@dataclass(frozen=True, slots=True)
class LoraConfig:
    """rank, alpha (scaling alpha / rank; alpha / sqrt(rank) with rslora) and the target
    modules, matched as PEFT matches them: a linear module whose path in the layer is the name
    or ends with "." + the name."""

    rank: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):  # tuple() would split it into letters
            raise LoraConfigError(f"give the LoRA target modules as a list of names, e.g. "
                                  f"[{self.target_modules!r}] (PEFT reads a string as a "
                                  f"regular expression, which is not supported here)")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not 1 <= self.rank <= MAX_LORA_RANK:
            raise LoraConfigError(f"LoRA rank must be in [1, {MAX_LORA_RANK}], got {self.rank}")
        if not self.alpha > 0:
            raise LoraConfigError(f"LoRA alpha must be positive, got {self.alpha}")
        if not self.target_modules:
            raise LoraConfigError("give at least one LoRA target module")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.rslora)


def _targets(config: PretrainedConfig, lora: LoraConfig) -> tuple[str, dict[tuple[int, str],
                                                                               tuple[int, int]]]:
    """The causal LM's layer-list path and (block, module path) -> (in, out) of every target
    nn.Linear, found on the family's own modules (built on the meta device: no memory)."""
    skeleton = build_skeleton(config, torch.float32)
    path, layers = find_layer_list(skeleton)
    found: dict[tuple[int, str], tuple[int, int]] = {}
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and any(
                    name == t or name.endswith("." + t) for t in lora.target_modules):
                found[(index, name)] = (module.in_features, module.out_features)
    if not found:
        raise LoraConfigError(f"no linear module of this model's layers matches "
                              f"{list(lora.target_modules)}")
    return path, found


class RemoteLora(nn.Module):
    """Trainable LoRA weights of every remote block (float32 by default)."""

    def __init__(self, model_config: PretrainedConfig, config: LoraConfig = LoraConfig(),
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.layers_path, shapes = _targets(model_config, config)
        self.keys: list[tuple[int, str]] = sorted(shapes)
        self.modules_by_block: dict[int, tuple[str, ...]] = {}
        for block, name in self.keys:
            self.modules_by_block.setdefault(block, ())
            self.modules_by_block[block] += (name,)
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for key in self.keys:
            fan_in, fan_out = shapes[key]
            a = torch.empty(config.rank, fan_in, dtype=dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's (and nn.Linear's) default
            self.lora_A.append(nn.Parameter(a))
            self.lora_B.append(nn.Parameter(torch.zeros(fan_out, config.rank, dtype=dtype)))

    def parameters_in_order(self) -> list[nn.Parameter]:
        """A, B of each key in `keys` order (what the autograd function takes)."""
        return [p for pair in zip(self.lora_A, self.lora_B) for p in pair]

    def snapshot(self, dtype: torch.dtype) -> LoraSnapshot:
        with torch.no_grad():
            weights = {key: (a.detach().to(dtype).clone(), b.detach().to(dtype).clone())
                       for key, a, b in zip(self.keys, self.lora_A, self.lora_B)}
        return LoraSnapshot(self.config, self.modules_by_block, weights)

    # -- PEFT format --------------------------------------------------------------------------
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for (block, name), a, b in zip(self.keys, self.lora_A, self.lora_B):
            out[peft_key(self.layers_path, block, name, "A")] = a.detach().cpu().contiguous()
            out[peft_key(self.layers_path, block, name, "B")] = b.detach().cpu().contiguous()
        return out

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Set the weights from PEFT-named tensors; every key must match, shapes included."""
        index = {key: i for i, key in enumerate(self.keys)}
        seen: set[str] = set()
        for name, tensor in state.items():
            match = PEFT_KEY.fullmatch(name)
            key = None if match is None else (int(match["index"]), match["module"])
            if key not in index or match["layers"] != self.layers_path:
                raise LoraConfigError(f"adapter tensor {name!r} matches none of this model's "
                                      f"LoRA targets")
            target = (self.lora_A if match["ab"] == "A" else self.lora_B)[index[key]]
            if tuple(tensor.shape) != tuple(target.shape):
                raise LoraConfigError(f"adapter tensor {name!r} is {list(tensor.shape)}, "
                                      f"expected {list(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor)
            seen.add(name)
        missing = set(self.peft_state_dict()) - seen
        if missing:
            raise LoraConfigError(f"the adapter lacks {len(missing)} tensors, e.g. "
                                  f"{sorted(missing)[0]}")

    def save_pretrained(self, directory: str | Path, base_model: str | None = None) -> Path:
        """Write adapter_config.json and adapter_model.safetensors (PEFT's LoRA format)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.config.rank,
            "lora_alpha": self.config.alpha, "target_modules": list(self.config.target_modules),
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": self.config.rslora, "use_dora": False, "inference_mode": True,
            "base_model_name_or_path": base_model, "init_lora_weights": True,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        }
        (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(self.peft_state_dict(), str(directory / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, model_config: PretrainedConfig,
                        dtype: torch.dtype = torch.float32) -> RemoteLora:
        """A PEFT LoRA adapter directory (ours, or one PEFT saved)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            raw = json.loads((directory / ADAPTER_CONFIG).read_text())
            state = load_file(str(directory / ADAPTER_WEIGHTS))
        except (OSError, ValueError) as e:
            raise LoraConfigError(f"cannot read the adapter in {directory}: {e}") from None
        if str(raw.get("peft_type", "")).upper() != "LORA":
            raise LoraConfigError(f"{directory} is not a LoRA adapter")
        targets = raw.get("target_modules")
        if isinstance(targets, str):
            raise LoraConfigError("regular-expression target_modules are not supported")
        lora = cls(model_config, LoraConfig(int(raw["r"]), float(raw.get("lora_alpha", raw["r"])),
                                            tuple(targets), bool(raw.get("use_rslora"))), dtype)
        lora.load_peft_state_dict(state)
        return lora


@dataclass(eq=False)
class LoraSnapshot:
    """The LoRA weights at one forward pass, in the servers' dtype, split by span on demand."""

    config: LoraConfig
    modules_by_block: dict[int, tuple[str, ...]]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    _spans: dict[tuple[int, int], tuple[dict[str, Any], list[torch.Tensor]]] = field(
        default_factory=dict)

    def span(self, start: int, end: int) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """(blocks.lora_put meta without model/replaces, tensors in wire order) for blocks
        [start, end); the meta's digest names the content."""
        cached = self._spans.get((start, end))
        if cached is not None:
            return cached
        modules = sorted({m for b in range(start, end) for m in self.modules_by_block.get(b, ())})
        if any(self.modules_by_block.get(b, ()) != tuple(modules) for b in range(start, end)):
            raise LoraConfigError("LoRA targets differ between blocks; not supported over the "
                                  "wire")
        tensors = [t for b in range(start, end) for m in modules for t in self.weights[(b, m)]]
        config = self.config
        meta = {"start": start, "end": end, "rank": config.rank, "alpha": float(config.alpha),
                "rslora": config.rslora, "modules": modules,
                "digest": tensors_digest(start, end, config.rank, float(config.alpha),
                                         config.rslora, modules, tensors)}
        self._spans[(start, end)] = (meta, tensors)
        return meta, tensors

    def keys_of(self, start: int, end: int) -> list[tuple[int, str]]:
        """(block, module) of the tensors pairs `span(start, end)` sends, in wire order."""
        meta, _ = self.span(start, end)
        return [(b, m) for b in range(start, end) for m in meta["modules"]]
