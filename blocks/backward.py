"""A block server's fine-tuning side: `blocks.backward`, `blocks.lora_put`, and the tuning
(deep prompts, LoRA) of forward and inference requests. See docs/block_protocol.md.

The server never keeps activations between requests: a backward request carries the span's
inputs and the gradients of its outputs, and the server runs the forward again under autograd
(with the request's deep prompts and LoRA weights as leaves that require gradients) and
returns the gradients of the inputs, of the prompts and of the LoRA weights. Uploaded LoRA
weights live in a content-addressed cache (blocks/adapter_cache.py); adapters the server hosts
(`serve --adapter NAME=DIR`) are loaded at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import torch

import tensor_wire
from blocks import protocol
from blocks.adapter_cache import AdapterCache, AdapterCacheFullError
from blocks.lora import AdapterError, LoraWeights, from_upload, load_peft_lora
from blocks.protocol import RequestError, TuningRequest
from blocks.span import ACTIVATION_DTYPES, BlockSpan, SpanInputError
from blocks.tuning import SpanTuning, TuningHooks
from overlay.host import RemoteError, RpcContext
from tensor_wire.limits import Limits

if TYPE_CHECKING:
    from blocks.server import BlockServer

log = logging.getLogger(__name__)


class ServerTuning:
    """Owned by a BlockServer: hosted adapters, the upload cache, and the two RPC handlers."""

    def __init__(self, server: BlockServer, hosted: dict[str, LoraWeights] | None = None):
        self.server = server
        self.hosted = dict(hosted or {})
        config = server.config
        self.uploads = AdapterCache(config.adapter_cache_bytes, config.adapter_idle_timeout)
        self.hooks = TuningHooks()
        for name, lora in self.hosted.items():
            try:
                lora.check(server.span)
            except AdapterError as e:
                raise AdapterError(f"adapter {name!r}: {e}") from None

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(sorted(self.hosted))

    def switch_span(self, span: BlockSpan) -> None:
        """The server moved (blocks/balancer.py): hosted adapters are read again for the new
        blocks; one that cannot be is dropped (and no longer announced). Uploaded LoRAs stay:
        each names its own blocks."""
        for name, lora in list(self.hosted.items()):
            try:
                if lora.source is None:
                    raise AdapterError("it was not read from a directory")
                self.hosted[name] = load_peft_lora(lora.source, span)
            except AdapterError as e:
                log.warning("no longer hosting adapter %s: %s", name, e)
                del self.hosted[name]

    def attach(self, host) -> None:
        host.add_handler(protocol.METHOD_BACKWARD, self._backward)
        host.add_handler(protocol.METHOD_LORA_PUT, self._lora_put)

    # ------------------------------------------------------------------ requests' tuning
    def lora_for(self, request: TuningRequest, view: BlockSpan, pin: bool = False
                 ) -> LoraWeights | None:
        """The LoRA a request names (hosted by name, or uploaded by digest), for `view`'s
        blocks; `pin` keeps an uploaded one until `unpin` (an inference session's)."""
        if request.adapter is not None:
            lora = self.hosted.get(request.adapter)
            if lora is None:
                hosted = ", ".join(self.adapter_names) or "none"
                raise RequestError(protocol.UNKNOWN_ADAPTER,
                                   f"this server hosts no adapter {request.adapter!r} "
                                   f"(hosted: {hosted})")
            return lora.restrict(view.start, view.end)
        if request.lora is None:
            return None
        now = time.monotonic()
        self.uploads.expire(now)
        lora = (self.uploads.pin if pin else self.uploads.get)(request.lora, now)
        if lora is None:
            raise RequestError(protocol.ADAPTER_MISSING,
                               f"this server does not hold LoRA {request.lora[:12]}; upload "
                               f"it with {protocol.METHOD_LORA_PUT}")
        if (lora.start, lora.end) != (view.start, view.end):
            if pin:
                self.uploads.unpin(request.lora, now)
            raise RequestError(protocol.BAD_INPUT,
                               f"LoRA {request.lora[:12]} was uploaded for blocks "
                               f"[{lora.start}, {lora.end}), not [{view.start}, {view.end})")
        return lora

    def unpin(self, request: TuningRequest) -> None:
        if request.lora is not None:
            self.uploads.unpin(request.lora, time.monotonic())

    def tuning(self, request: TuningRequest, view: BlockSpan, prompts: torch.Tensor | None,
               lora: LoraWeights | None, batch: int, position: int = 0) -> SpanTuning | None:
        """The SpanTuning of a forward or inference request (None: plain frozen blocks)."""
        if prompts is None and lora is None:
            return None
        tuning = SpanTuning(self.hooks, prompts=prompts, lora=lora, position=position)
        try:
            tuning.check(view, batch)
        except SpanInputError as e:
            raise RequestError(protocol.BAD_INPUT, str(e)) from None
        return tuning

    # ------------------------------------------------------------------ blocks.lora_put
    async def _lora_put(self, ctx: RpcContext, payload: bytes) -> bytes:
        server = self.server
        try:
            size = tensor_wire.decoded_size(payload)
        except tensor_wire.WireError as e:
            raise RemoteError(protocol.BAD_INPUT, f"malformed tensor message: {e}") from None
        if size > server.config.max_adapter_bytes:
            raise RemoteError(protocol.TOO_LARGE,
                              f"a LoRA of {size} bytes exceeds this server's limit of "
                              f"{server.config.max_adapter_bytes} bytes per upload")
        limits = Limits(max_decoded_bytes=server.config.max_adapter_bytes)
        async with server.decoder.request(payload, limits, ctx.peer) as (tensors, meta):
            return await self._lora_put_decoded(tensors, meta, size, ctx.peer)

    async def _lora_put_decoded(self, tensors: list, meta, size: int, owner) -> bytes:
        server = self.server
        try:
            request = protocol.parse_lora_put(meta, server.config.model_id, server.served,
                                              len(tensors))
            view = server._view(request.blocks.start, request.blocks.end)
            try:
                lora = await asyncio.to_thread(from_upload, request, tensors, view)
            except AdapterError as e:
                raise RequestError(protocol.BAD_INPUT, str(e)) from None
            now = time.monotonic()
            if request.replaces is not None and request.replaces != request.digest:
                self.uploads.discard(request.replaces, owner)
            try:
                self.uploads.put(request.digest, lora, size, now, owner)
            except AdapterCacheFullError as e:
                raise RequestError(protocol.TOO_LARGE, str(e)) from None
        except RequestError as e:
            raise RemoteError(e.code, str(e)) from None
        return tensor_wire.encode_message([], {"digest": request.digest})

    # ------------------------------------------------------------------ blocks.backward
    async def _backward(self, ctx: RpcContext, payload: bytes) -> bytes:
        async with self.server.decoder.request(payload, peer=ctx.peer) as (tensors, meta):
            return await self._backward_decoded(tensors, meta)

    async def _backward_decoded(self, tensors: list, meta) -> bytes:
        server = self.server
        try:
            blocks = protocol.parse_range(meta, server.config.model_id, server.served)
            compression = protocol.response_compression(meta)
            request = protocol.parse_tuning(meta, len(tensors), leading=2)
            hidden, grad_output, *rest = tensors
            mask = rest.pop(0) if request.mask else None
            prompts = rest.pop(0) if request.prompts else None
            view = server._view(blocks.start, blocks.end)
            self._check_backward(view, hidden, grad_output, prompts)
            lora = self.lora_for(request, view)
            trained = None if lora is None else (lora, request.lora is not None)
            grads = await server._compute(self._run_backward, view, grad_output, mask,
                                          prompts, trained, hidden)
        except RequestError as e:
            raise RemoteError(e.code, str(e)) from None
        server.requests_served += 1
        lora_count = len(grads) - 1 - (prompts is not None)
        return tensor_wire.encode_message(
            grads, {"lora": lora_count},
            [compression] * (1 + (prompts is not None)) + ["none"] * lora_count)

    def _check_backward(self, view: BlockSpan, hidden, grad_output, prompts) -> None:
        try:  # here, not in the forward under autograd: integers cannot require gradients
            view._check_hidden(hidden)
            SpanTuning(self.hooks, prompts=prompts).check(view, hidden.shape[0])
        except SpanInputError as e:
            raise RequestError(protocol.BAD_INPUT, str(e)) from None
        if not isinstance(grad_output, torch.Tensor) or tuple(grad_output.shape) != tuple(
                hidden.shape):
            shape = list(grad_output.shape) if isinstance(grad_output, torch.Tensor) else None
            raise RequestError(protocol.BAD_INPUT, f"output gradients must have the shape of "
                                                   f"the hidden states {list(hidden.shape)}, "
                                                   f"got {shape}")
        if grad_output.dtype not in ACTIVATION_DTYPES:
            raise RequestError(protocol.BAD_INPUT, f"output gradients are {grad_output.dtype}, "
                                                   f"this span runs {view.dtype}")
        if not torch.isfinite(grad_output).all():
            raise RequestError(protocol.BAD_INPUT, "output gradients hold inf or NaN")
        tokens = hidden.shape[0] * hidden.shape[1]
        limit = self.server.config.max_backward_tokens
        if tokens > limit:
            raise RequestError(protocol.TOO_LARGE, f"{tokens} tokens in one backward request "
                                                   f"exceed this server's {limit}; send "
                                                   f"smaller chunks")

    def _run_backward(self, view: BlockSpan, grad_output: torch.Tensor,
                      mask: torch.Tensor | None, prompts: torch.Tensor | None,
                      lora: tuple[LoraWeights, bool] | None,
                      hidden: torch.Tensor) -> list[torch.Tensor]:
        """Forward again under autograd, then the gradients of the inputs, the prompts and
        (when `lora` is (weights, True): uploaded, hence trained) the LoRA weights."""
        hidden = hidden.detach().to(view.device).clone().requires_grad_(True)
        wanted = [hidden]
        if prompts is not None:
            prompts = prompts.detach().to(view.device).clone().requires_grad_(True)
            wanted.append(prompts)
        weights = None
        if lora is not None:
            weights, trained = lora
            if trained:
                weights = weights.trainable()
                for key in weights.ordered():
                    wanted.extend(weights.weights[key])
        # prompts were checked by _check_backward, before any work
        tuning = SpanTuning(self.hooks, prompts=prompts, lora=weights, differentiable=True)
        output = view.forward(hidden, mask, tuning)
        grads = torch.autograd.grad(output, wanted, grad_output.to(output.device, output.dtype),
                                    allow_unused=True)
        return [(g if g is not None else torch.zeros_like(leaf)).detach().cpu()
                for g, leaf in zip(grads, wanted)]
