"""What a request adds to the frozen blocks of a span for one run: deep prompts and LoRA.

- Deep prompts (Petals' "deep_ptune"): a tensor [blocks, batch or 1, prefix, hidden]; entry j
  is added to the hidden states entering the run's j-th block at the prefix positions
  [0, prefix). In an inference step starting at position p only the overlap of the step's
  positions with the prefix gets its part, so a prompt fed step by step equals one fed whole.
- LoRA: the output of a target nn.Linear of a block gains scaling * B(A(x)) (PEFT's
  formula, no dropout). Weights come from `LoraWeights` (blocks/lora.py).

`TuningHooks` holds the hooks, installed on a server's loaded layers the first time a layer or
module is used this way (a span that never sees a tuned request runs with no hooks at all);
each hook acts only while a run has set its `active` state, inside the span's lock. A
`SpanTuning` is one request's tuning, handed to `BlockSpan.forward` / `SpanSession.step`.

This module may not do I/O.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blocks.lora import LoraWeights
from blocks.span import ACTIVATION_DTYPES, BlockSpan, SpanInputError


@dataclass(slots=True)
class _Active:
    prompts: dict[nn.Module, torch.Tensor] = field(default_factory=dict)  # layer -> its part
    lora: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)


class TuningHooks:
    """The hooks of one server's loaded layers (shared by the span and all its sub-spans)."""

    def __init__(self) -> None:
        self.active: _Active | None = None
        # Weak: a server that moves to another span frees the old span's layers.
        self._hooked_layers: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._hooked_linears: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    def _ensure_layer(self, layer: nn.Module) -> None:
        if layer not in self._hooked_layers:
            layer.register_forward_pre_hook(self._add_prompt, with_kwargs=True)
            self._hooked_layers.add(layer)

    def _ensure_linear(self, module: nn.Module) -> None:
        if module not in self._hooked_linears:
            module.register_forward_hook(self._add_lora)
            self._hooked_linears.add(module)

    def _add_prompt(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
        active = self.active
        prompt = None if active is None else active.prompts.get(module)
        if prompt is None:
            return None
        if args:
            return (add_prefix(args[0], prompt), *args[1:]), kwargs
        kwargs["hidden_states"] = add_prefix(kwargs["hidden_states"], prompt)
        return args, kwargs

    def _add_lora(self, module: nn.Module, args: tuple[Any, ...], output: Any):
        active = self.active
        weights = None if active is None else active.lora.get(module)
        if weights is None:
            return None
        a, b, scaling = weights
        return output + F.linear(F.linear(args[0], a), b) * scaling


def add_prefix(hidden: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """``hidden`` [batch, length, h] with ``prompt`` [batch or 1, n <= length, h] added to its
    first n positions (out of place, so autograd sees it)."""
    n = prompt.shape[1]
    if n == hidden.shape[1]:
        return hidden + prompt
    return torch.cat([hidden[:, :n] + prompt, hidden[:, n:]], dim=1)


class SpanTuning:
    """One request's deep prompts and/or LoRA over the blocks of the span it runs on.

    ``position``: where the run's first position is in the sequence (an inference step's).
    ``differentiable``: run under autograd (a backward request), so that gradients reach the
    inputs, the prompts and the LoRA weights that require them.
    """

    def __init__(self, hooks: TuningHooks, *, prompts: torch.Tensor | None = None,
                 lora: LoraWeights | None = None, position: int = 0,
                 differentiable: bool = False) -> None:
        self.hooks = hooks
        self.prompts = prompts
        self.lora = lora
        self.position = position
        self.differentiable = differentiable

    def check(self, span: BlockSpan, batch: int) -> None:
        """Refuse prompts that do not fit the span (called before any computation)."""
        prompts = self.prompts
        if prompts is None:
            return
        if not isinstance(prompts, torch.Tensor) or prompts.ndim != 4:
            raise SpanInputError("deep prompts must be [blocks, batch or 1, prefix, hidden]")
        blocks, rows, prefix, size = prompts.shape
        if blocks != span.num_blocks or size != span.hidden_size or rows not in (1, batch) \
                or prefix < 1:
            raise SpanInputError(
                f"deep prompts for blocks [{span.start}, {span.end}) of a batch of {batch} must "
                f"be [{span.num_blocks}, 1 or {batch}, prefix, {span.hidden_size}], got "
                f"{list(prompts.shape)}")
        if prompts.dtype not in ACTIVATION_DTYPES:  # converted to the span's, as hidden states
            raise SpanInputError(f"deep prompts are {prompts.dtype}, not float32, float16 or "
                                 f"bfloat16")

    @contextlib.contextmanager
    def applied(self, span: BlockSpan, hidden: torch.Tensor) -> Iterator[torch.Tensor]:
        hooks = self.hooks
        active = _Active()
        if self.prompts is not None:
            first = self.position
            last = min(self.prompts.shape[2], first + hidden.shape[1])
            if last > first:
                part = self.prompts[:, :, first:last].to(hidden.device, hidden.dtype)
                # The first layer's part goes in with the input itself: the span's own hook
                # substitutes that layer's input, so a pre-hook there could be overridden.
                hidden = add_prefix(hidden, part[0])
                for j in range(1, span.num_blocks):
                    layer = span.layer(span.start + j)
                    hooks._ensure_layer(layer)
                    active.prompts[layer] = part[j]
        if self.lora is not None:
            scaling = self.lora.scaling
            for (block, name), (a, b) in self.lora.weights.items():
                if span.start <= block < span.end:
                    module = span.layer(block).get_submodule(name)
                    hooks._ensure_linear(module)
                    active.lora[module] = (a, b, scaling)
        hooks.active = active
        try:
            yield hidden
        finally:
            hooks.active = None
