"""CUDA graphs of the client's greedy head: final norm, LM head and argmax of one new position.

Why: on a GPU, a greedy token costs the head's weights read once (a Llama-3-8B head is 1 GB: about
0.25 ms on an H200) plus, run eagerly, a dozen small kernels launched one by one from Python
(RMSNorm alone is six: the float32 upcast, square, mean, rsqrt, scale, cast back), during which
the GPU mostly waits; measured on an H200: 0.94 ms per token for the head, logits and argmax.
Replaying the whole thing as one graph leaves one launch and the token ids' read-back (8 bytes a
sequence; the logits never leave the GPU).

One graph per batch size, captured at its first use: a capture is kept only if its replay gives
exactly (``torch.equal``) the eager run's logits and ids, the very same kernels on the same
inputs; otherwise that batch size stays eager.

This module never touches the network.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# Eager runs before a capture (cuBLAS workspaces, lazy allocations).
WARMUP_RUNS = 2


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, static_in: torch.Tensor,
                 static_ids: torch.Tensor) -> None:
        self.graph = graph
        self.static_in = static_in
        self.static_ids = static_ids


class GreedyHeadGraphs:
    """Greedy tokens for [batch, 1, hidden] inputs by CUDA graph replay, one graph per batch."""

    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 dtype: torch.dtype) -> None:
        self._logits = logits_fn  # [batch, 1, hidden] -> [batch, 1, vocab], on the device
        self._device = device
        self._dtype = dtype
        self._graphs: dict[int, _Graph | None] = {}  # None: the capture failed or differed

    def _run(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._logits(hidden)
        return logits, logits[:, -1].argmax(-1)

    def tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The argmax ids [batch] (on the CPU) of one position's hidden states [batch, 1, hidden]
        (on any device); None where this batch size has no graph (the caller runs eagerly).
        The caller holds the head's lock and has entered inference mode."""
        batch = hidden.shape[0]
        if batch not in self._graphs:
            self._graphs[batch] = self._capture(hidden)
        entry = self._graphs[batch]
        if entry is None:
            return None
        entry.static_in.copy_(hidden)
        entry.graph.replay()
        return entry.static_ids.cpu()

    def _capture(self, hidden: torch.Tensor) -> _Graph | None:
        static_in = hidden.to(self._device, self._dtype, copy=True)
        side = torch.cuda.Stream(device=self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                eager_logits, eager_ids = self._run(static_in)
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_logits, static_ids = self._run(static_in)
        except Exception as exc:  # a head the capture cannot handle: keep it eager
            torch.cuda.synchronize(self._device)
            log.warning("head: CUDA graph capture failed (%s: %s); eager head",
                        type(exc).__name__, exc)
            return None
        graph.replay()
        if not (torch.equal(static_logits, eager_logits) and torch.equal(static_ids, eager_ids)):
            log.warning("head: CUDA graph replay differs from the eager head; eager head")
            return None
        log.info("head: greedy CUDA graph captured for batch %d", hidden.shape[0])
        return _Graph(graph, static_in, static_ids)
