"""LoRA weights for the blocks of a span: uploaded by a client, or hosted from a PEFT directory.

A PEFT LoRA directory holds ``adapter_config.json`` (``peft_type`` LORA, ``r``,
``lora_alpha``, ``target_modules``...) and ``adapter_model.safetensors`` with keys
``base_model.model.<path of the decoder layers>.<i>.<module>.lora_A.weight`` ([r, in]) and
``...lora_B.weight`` ([out, r]). A server reads only the tensors of its own blocks, with
safetensors, and checks every one against the layer it adapts. The variants this code does
not implement (DoRA, per-module ranks, biases, dropout at inference is moot, Conv1D layers,
embedding adapters) are refused by name rather than run wrongly.

This module may not do network I/O; it reads adapter directories.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from blocks.protocol import LoraPutRequest, lora_scaling
from blocks.span import ACTIVATION_DTYPES, BlockSpan
from model_parts.lora_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_KEY, tensors_digest


class AdapterError(ValueError):
    """LoRA weights that do not fit the blocks they are meant for, or an unreadable adapter."""


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """(block, module path in the layer) -> (A [rank, in], B [out, rank]), blocks [start, end)."""

    start: int
    end: int
    rank: int
    alpha: float
    rslora: bool
    modules: tuple[str, ...]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    source: Path | None = None  # the PEFT directory it was read from (hosted adapters)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.rslora)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.weights.values() for t in pair)

    def ordered(self) -> list[tuple[int, str]]:
        """The (block, module) keys in wire order: blocks ascending, then `modules` order."""
        return [(b, m) for b in range(self.start, self.end) for m in self.modules
                if (b, m) in self.weights]

    def restrict(self, start: int, end: int) -> LoraWeights:
        """The weights of blocks [start, end) only (a request on part of a hosted span)."""
        kept = {key: pair for key, pair in self.weights.items() if start <= key[0] < end}
        return LoraWeights(start, end, self.rank, self.alpha, self.rslora, self.modules, kept)

    def trainable(self) -> LoraWeights:
        """Fresh leaf copies that require gradients (for one backward request)."""
        return LoraWeights(self.start, self.end, self.rank, self.alpha, self.rslora,
                           self.modules,
                           {key: (a.detach().clone().requires_grad_(True),
                                  b.detach().clone().requires_grad_(True))
                            for key, (a, b) in self.weights.items()})

    def check(self, span: BlockSpan) -> None:
        """Every module is an nn.Linear of its block with matching shapes; dtype is the span's."""
        for (block, name), (a, b) in self.weights.items():
            if not span.start <= block < span.end:
                raise AdapterError(f"LoRA for block {block}, outside [{span.start}, {span.end})")
            try:
                module = span.layer(block).get_submodule(name)
            except AttributeError:
                raise AdapterError(f"block {block} has no module {name!r}") from None
            if not isinstance(module, nn.Linear):
                raise AdapterError(f"{name} of block {block} is a {type(module).__name__}, "
                                   f"LoRA here adapts nn.Linear only")
            want_a = (self.rank, module.in_features)
            want_b = (module.out_features, self.rank)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise AdapterError(
                    f"LoRA of {name} in block {block}: A is {list(a.shape)}, B is "
                    f"{list(b.shape)}; rank {self.rank} on this layer needs A {list(want_a)} "
                    f"and B {list(want_b)}")
            if a.dtype != span.dtype or b.dtype != span.dtype:
                raise AdapterError(f"LoRA of {name} in block {block} is {a.dtype}, this span "
                                   f"runs {span.dtype}")


def from_upload(request: LoraPutRequest, tensors: list[torch.Tensor],
                span: BlockSpan) -> LoraWeights:
    """LoRA weights from a blocks.lora_put request, checked against `span` and the digest."""
    blocks = request.blocks
    # before the digest, which views them as bytes (and cannot view an empty matrix)
    if any(t.ndim != 2 or t.numel() == 0 for t in tensors):
        raise AdapterError("LoRA weights are non-empty matrices: A [rank, in] and B [out, rank]")
    odd = [t.dtype for t in tensors if t.dtype not in ACTIVATION_DTYPES]
    if odd:
        raise AdapterError(f"LoRA weights are {odd[0]}, not float32, float16 or bfloat16")
    if tensors_digest(blocks.start, blocks.end, request.rank, request.alpha, request.rslora,
                      request.modules, tensors) != request.digest:
        raise AdapterError("the uploaded LoRA does not match its digest")
    weights, it = {}, iter(tensors)
    for block in range(request.blocks.start, request.blocks.end):
        for name in request.modules:
            a, b = next(it), next(it)
            # converted to the span's precision, as hidden states are (the client's may differ)
            weights[(block, name)] = (a.to(span.device, span.dtype).clone(),
                                      b.to(span.device, span.dtype).clone())
    lora = LoraWeights(request.blocks.start, request.blocks.end, request.rank, request.alpha,
                       request.rslora, request.modules, weights)
    lora.check(span)
    return lora


def _peft_config(directory: Path) -> dict:
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"cannot read {directory / ADAPTER_CONFIG}: {e}") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{directory}: not a PEFT LoRA adapter (peft_type "
                           f"{config.get('peft_type') if isinstance(config, dict) else None!r})")
    refused = [key for key in ("use_dora", "rank_pattern", "alpha_pattern", "fan_in_fan_out")
               if config.get(key)]
    if config.get("bias", "none") != "none":
        refused.append("bias")
    if refused:
        raise AdapterError(f"{directory}: LoRA options not supported here: {refused}")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float) or alpha <= 0:
        raise AdapterError(f"{directory}: 'r' and 'lora_alpha' must be positive numbers")
    return config


def load_peft_lora(directory: str | Path, span: BlockSpan, max_bytes: int | None = None,
                   config: dict | None = None) -> LoraWeights:
    """The LoRA weights of `span`'s blocks from a PEFT LoRA directory (only those tensors);
    `config`: its adapter_config.json as `check_adapter_specs` read it, if it did."""
    from safetensors import safe_open

    directory = Path(directory)
    if config is None:
        config = _peft_config(directory)
    rank, alpha = config["r"], float(config.get("lora_alpha", config["r"]))
    layers_path = span.layers_path
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(directory / ADAPTER_WEIGHTS), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                match = PEFT_KEY.fullmatch(key)
                if match is None:
                    raise AdapterError(f"{directory}: unsupported tensor {key!r} (LoRA on "
                                       f"decoder-layer linear modules only)")
                prefix = match["layers"]
                if prefix != layers_path and not prefix.endswith("." + layers_path):
                    raise AdapterError(f"{directory}: tensor {key!r} is not in this model's "
                                       f"decoder layers ({layers_path})")
                block = int(match["index"])
                if span.start <= block < span.end:
                    tensor = f.get_tensor(key)
                    found.setdefault((block, match["module"]), {})[match["ab"]] = tensor
    except AdapterError:
        raise
    except Exception as e:  # safetensors raises several kinds on bad files
        raise AdapterError(f"cannot read {directory / ADAPTER_WEIGHTS}: {e}") from None
    weights = {}
    for key, pair in found.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{directory}: {key[1]} of block {key[0]} lacks lora_A or lora_B")
        weights[key] = (pair["A"].to(span.device, span.dtype), pair["B"].to(span.device,
                                                                            span.dtype))
    modules = tuple(sorted({name for _, name in weights}))
    lora = LoraWeights(span.start, span.end, rank, alpha, bool(config.get("use_rslora")),
                       modules, weights, directory)
    lora.check(span)
    if max_bytes is not None and lora.nbytes > max_bytes:
        raise AdapterError(f"{directory}: {lora.nbytes} bytes for blocks [{span.start}, "
                           f"{span.end}) exceed the limit of {max_bytes}")
    return lora


def check_adapter_specs(specs: list[str]) -> dict[str, tuple[Path, dict]]:
    """`serve --adapter NAME=DIR` values -> {name: (directory, its adapter_config.json)}, each
    config read and checked once: before serve loads anything, so that a typo costs no load."""
    from blocks.announcement import MAX_ADAPTERS
    from blocks.protocol import MAX_ADAPTER_NAME

    checked: dict[str, tuple[Path, dict]] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise AdapterError(f"--adapter must look like NAME=DIR, got {spec!r}")
        if len(name) > MAX_ADAPTER_NAME or not name.isprintable():
            raise AdapterError(f"adapter name {name!r} is not a printable name of at most "
                               f"{MAX_ADAPTER_NAME} characters")
        if name in checked:
            raise AdapterError(f"adapter {name!r} is given twice")
        try:
            config = _peft_config(Path(directory))
        except AdapterError as e:
            raise AdapterError(f"adapter {name!r}: {e}") from None
        checked[name] = (Path(directory), config)
    if len(checked) > MAX_ADAPTERS:
        raise AdapterError(f"at most {MAX_ADAPTERS} adapters per server")
    return checked


def load_hosted_adapters(specs: list[str] | dict[str, tuple[Path, dict]], span: BlockSpan
                         ) -> dict[str, LoraWeights]:
    """`serve --adapter NAME=DIR` values, or what `check_adapter_specs` made of them -> the
    adapters this server hosts (its blocks only)."""
    checked = specs if isinstance(specs, dict) else check_adapter_specs(specs)
    hosted: dict[str, LoraWeights] = {}
    for name, (directory, config) in checked.items():
        try:
            hosted[name] = load_peft_lora(directory, span, config=config)
        except AdapterError as e:
            raise AdapterError(f"adapter {name!r}: {e}") from None
    return hosted
