"""The swarm's blocks as a differentiable function, for synchronous torch code.

`remote_blocks(...)` is `RemoteBlocksFunction.apply`: its forward runs `SwarmTrainer.forward`
and its backward `SwarmTrainer.backward`, each on the client's background event loop
(client/sync_loop.py), which the calling thread waits on. Inputs that may require gradients:
the hidden states, the deep prompts and every LoRA parameter (passed in so that autograd
routes their gradients to the optimizer's tensors); the LoRA weights' values at forward time
are snapshotted, so backward uses exactly the weights forward used. The activations kept for
backward are autograd's saved tensors: as for any torch graph, a second backward through the
same pass needs `retain_graph=True` on the first.

This module may not do I/O itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from client.lora import RemoteLora
from client.sync_loop import BackgroundLoop
from client.training import PassRecord, SwarmTrainer, Tuning


@dataclass(frozen=True, eq=False)
class RemotePass:
    """What one call runs: where, with which mask, adapter and LoRA module."""

    trainer: SwarmTrainer
    loop: BackgroundLoop
    attention_mask: torch.Tensor | None = None
    adapter: str | None = None
    lora: RemoteLora | None = None
    start: int = 0
    end: int | None = None
    check_open: Callable[[], None] | None = None  # raises once the model is closed

    def ensure_open(self) -> None:
        """Refuse a pass of a closed model at once, before a request fails and bans a server."""
        if self.check_open is not None:
            self.check_open()


class RemoteBlocksFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, spec: RemotePass, hidden: torch.Tensor,
                prompts: torch.Tensor | None, *lora_params: torch.Tensor) -> torch.Tensor:
        spec.ensure_open()
        dtype = hidden.dtype
        snapshot = None if spec.lora is None else spec.lora.snapshot(dtype)
        wire_prompts = None if prompts is None else prompts.detach().to(dtype)
        tuning = Tuning(wire_prompts, snapshot, spec.adapter)
        out, record = spec.loop.run(spec.trainer.forward(
            hidden.detach(), spec.attention_mask, tuning, spec.start, spec.end))
        # The boundary activations are autograd's saved tensors: freed after a backward
        # unless retain_graph, and a second backward then gets torch's own error.
        ctx.save_for_backward(*record.boundaries())
        ctx.spec, ctx.record = spec, record.with_boundaries([None] * len(record.boundaries()))
        ctx.hidden_device = hidden.device
        ctx.prompt_like = None if prompts is None else (prompts.device, prompts.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        spec: RemotePass = ctx.spec
        spec.ensure_open()
        record: PassRecord = ctx.record.with_boundaries(ctx.saved_tensors)
        grads = spec.loop.run(spec.trainer.backward(record, grad_output))
        # Answers arrive on the CPU; autograd wants each gradient on its input's device (a
        # client running its head and trainable parameters on a GPU).
        grad_prompts = None
        if ctx.prompt_like is not None and grads.prompts is not None:
            grad_prompts = grads.prompts.to(*ctx.prompt_like)
        lora_grads: list[torch.Tensor | None] = []
        if spec.lora is not None:
            for key, a, b in zip(spec.lora.keys, spec.lora.lora_A, spec.lora.lora_B):
                pair = grads.lora.get(key)
                if pair is None:  # blocks outside [start, end): no gradient
                    lora_grads += [None, None]
                else:
                    lora_grads += [pair[0].to(a.device, a.dtype), pair[1].to(b.device, b.dtype)]
        return (None, grads.hidden.to(ctx.hidden_device, grad_output.dtype), grad_prompts,
                *lora_grads)


def remote_blocks(spec: RemotePass, hidden: torch.Tensor,
                  prompts: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden states after the remote blocks, differentiable w.r.t. `hidden`, `prompts` and the
    LoRA parameters of `spec.lora` (when they require gradients and grad mode is on)."""
    params = [] if spec.lora is None else spec.lora.parameters_in_order()
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or (prompts is not None and prompts.requires_grad)
        or any(p.requires_grad for p in params))
    if not needs_grad:
        spec.ensure_open()
        dtype = hidden.dtype
        tuning = Tuning(None if prompts is None else prompts.detach().to(dtype),
                        None if spec.lora is None else spec.lora.snapshot(dtype), spec.adapter)
        out, _ = spec.loop.run(spec.trainer.forward(hidden.detach(), spec.attention_mask,
                                                    tuning, spec.start, spec.end, keep=False))
        return out
    return RemoteBlocksFunction.apply(spec, hidden, prompts, *params)
