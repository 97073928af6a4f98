"""A short measurement of what a span computes, for its DHT announcement (units:
blocks/announcement.py). Issue 6 adds the network estimate, caching on disk and an override."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from blocks.span import BlockSpan

FORWARD_TOKENS = 128  # a typical prompt chunk


@dataclass(frozen=True, slots=True)
class ComputeRates:
    inference_rps: float  # tokens/s through one block, single-token steps
    forward_rps: float  # tokens/s through one block, long forward passes

    def throughput(self, num_blocks: int) -> float:
        """Tokens/s the server adds to every block of a span of `num_blocks` blocks."""
        return self.forward_rps / num_blocks


def measure(span: BlockSpan, repeats: int = 3) -> ComputeRates:
    hidden = torch.randn(1, FORWARD_TOKENS, span.hidden_size, dtype=span.dtype)
    span.forward(hidden[:, :8])  # warm-up: first calls pay for lazy initialisation
    forward = min(_timed(span.forward, hidden) for _ in range(repeats))
    with span.new_session(1, repeats + 2) as session:
        session.step(hidden[:, :1])
        step = min(_timed(session.step, hidden[:, i:i + 1]) for i in range(1, repeats + 1))
    blocks = span.num_blocks
    return ComputeRates(inference_rps=blocks / step, forward_rps=FORWARD_TOKENS * blocks / forward)


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return max(time.perf_counter() - start, 1e-9)
