"""Judging a low-precision fast step by its distance to a float32 run of the same probe (issue 9).

Why: two bf16 (or fp16) computations of the same span that round in different places differ from
each other by about as much as each differs from the exact result, and over a deep span that is
several percent: on an H200 a torch.compile'd 32-layer Llama-3-8B step and the plain bf16 step
differed by up to 2.12 (3% of the largest value), and a check of "fast equals plain within a few
bf16 units", made for replays of the very same kernels, rejected it. Yet the compiled step was
the more accurate one: on the CPU it is 0.7-0.9% (relative L2) from a float32 run of the same
span, the plain bf16 step 1.3-1.6% (``scripts/compiled_precision.py``). The question a check must
answer is "is the candidate as good as the plain path?", and only a float32 reference answers it.

**The float32-reference rule** (``FLOAT32_REFERENCE_RULE``): on each probe step, with ``ref`` the
output of the plain path run in float32 (same weights upcast, same inputs), ``plain`` the plain
path in the span's dtype and ``candidate`` the fast step, the candidate is accepted when

    |candidate - ref|_2   <= L2_FACTOR  * |plain - ref|_2   + u * |ref|_2      and
    max |candidate - ref| <= MAX_FACTOR * max |plain - ref| + u * max |ref|,

``u`` the dtype's unit roundoff (2^-8 for bf16: what rounding the output alone may cost). The
margins: 1.25 on the L2 error (a candidate that rounds as often as the plain path, in other
places, lands within a few tens of percent of its error; a wrong computation lands far outside),
2 on the largest element's error (a few wrong elements, which L2 would average away, are still
caught; the largest of 4096 errors is a noisier statistic than L2, hence the wider margin).
float32 spans keep the exact-equality style check of ``fast_decode.tolerance``: there the plain
path is the reference. Quantized spans too (their weights cannot be upcast in place).

The float32 reference upcasts the span's weights in place, layer chunk by layer chunk (bf16 and
fp16 values are exact in float32, so casting back restores them bit for bit), runs the probe
through each chunk, and casts the chunk back before the next: at most ``REFERENCE_MEMORY_SHARE``
of the free memory goes to float32 copies (a Llama-3-8B span fits in one chunk on an H200: 32 GB
beside its 16 GB; on a fuller GPU it takes more, smaller chunks). It runs at load, before any
session exists (cached graphs would point at the replaced storage).

This module never touches the network.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

if TYPE_CHECKING:
    from blocks.span import BlockSpan

# Ours: the share of free device (or host) memory the float32 copies of a chunk may take.
REFERENCE_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class Float32ReferenceRule:
    """The margins of the float32-reference rule (module docstring)."""

    l2_factor: float = 1.25
    max_factor: float = 2.0


FLOAT32_REFERENCE_RULE = Float32ReferenceRule()


def applies(span: BlockSpan) -> bool:
    """Whether the span's fast steps are judged by the float32-reference rule."""
    return span.dtype in (torch.bfloat16, torch.float16) and span.quant == "none"


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@dataclass(frozen=True)
class ProbeCase:
    """One probe sequence: a prefix, then single-token steps (all in the span's dtype)."""

    prefix: torch.Tensor  # [batch, prefix length, hidden]
    steps: tuple[torch.Tensor, ...]  # each [batch, 1, hidden]


@dataclass(frozen=True)
class StepErrors:
    """Errors of one probe step against the float32 reference."""

    plain_l2: float
    candidate_l2: float
    plain_max: float
    candidate_max: float
    ref_max: float
    distance_l2: float  # candidate against plain

    def problem(self, dtype: torch.dtype, rule: Float32ReferenceRule) -> str | None:
        u = unit_roundoff(dtype)
        if not math.isfinite(self.candidate_l2) or not math.isfinite(self.candidate_max):
            return "non-finite output"
        if self.candidate_l2 > rule.l2_factor * self.plain_l2 + u:
            return (f"relative L2 error against float32 {self.candidate_l2:.4f} > "
                    f"{rule.l2_factor} x the plain path's {self.plain_l2:.4f} + {u:.4f}")
        if self.candidate_max > rule.max_factor * self.plain_max + u * self.ref_max:
            return (f"largest error against float32 {self.candidate_max:.4g} > "
                    f"{rule.max_factor} x the plain path's {self.plain_max:.4g} + "
                    f"{u:.4f} x {self.ref_max:.4g}")
        return None


@dataclass(frozen=True)
class Verdict:
    """What the rule found over a whole probe: ``problem`` None means accepted."""

    problem: str | None
    errors: tuple[StepErrors, ...]

    def summary(self) -> str:
        if not self.errors:
            return "no probe step ran"
        worst = max(self.errors, key=lambda e: e.candidate_l2)
        return (f"relative L2 error against float32 up to {worst.candidate_l2:.4f} "
                f"(plain path at that step {worst.plain_l2:.4f}; over the probe: candidate "
                f"{max(e.candidate_l2 for e in self.errors):.4f}, plain "
                f"{max(e.plain_l2 for e in self.errors):.4f}); candidate vs plain up to "
                f"{self.max_distance:.4f}")

    @property
    def max_distance(self) -> float:
        return max((e.distance_l2 for e in self.errors), default=0.0)


def step_errors(candidate: torch.Tensor, plain: torch.Tensor, ref: torch.Tensor) -> StepErrors:
    if candidate.shape != ref.shape:
        nan = float("nan")
        return StepErrors(0.0, nan, 0.0, nan, 0.0, nan)
    ref = ref.float()
    return StepErrors(
        plain_l2=relative_l2(plain, ref),
        candidate_l2=relative_l2(candidate, ref),
        plain_max=float((plain.float() - ref).abs().max()),
        candidate_max=float((candidate.float() - ref).abs().max()),
        ref_max=float(ref.abs().max()),
        distance_l2=relative_l2(candidate, plain),
    )


def judge(
    span: BlockSpan,
    cases: Sequence[ProbeCase],
    new_cache: Callable[[int, int], Any],
    step: Callable[[torch.Tensor, Any, int], torch.Tensor],
    rule: Float32ReferenceRule = FLOAT32_REFERENCE_RULE,
    reference: list[list[torch.Tensor]] | None = None,
) -> Verdict:
    """Run the plain path and ``step`` (on ``new_cache(batch, max_len)``) over ``cases`` and
    judge ``step`` by the float32-reference rule. ``reference``: float32 outputs already
    computed for these cases (``float32_reference``)."""
    if reference is None:
        reference = float32_reference(span, cases)
    errors = []
    for case, wanted in zip(cases, reference, strict=True):
        batch, prefix = case.prefix.shape[:2]
        plain_cache = DynamicCache(config=span._config)
        fast_cache = new_cache(batch, prefix + len(case.steps))
        span._run(case.prefix, plain_cache, None)
        span._run(case.prefix, fast_cache, None)
        for index, (hidden, ref) in enumerate(zip(case.steps, wanted, strict=True)):
            plain = span._run(hidden, plain_cache, None)
            got = step(hidden, fast_cache, prefix + index)
            errors.append(step_errors(got, plain, ref))
            problem = errors[-1].problem(span.dtype, rule)
            if problem is not None:
                where = f"batch {batch}, position {prefix + index}"
                return Verdict(f"{where}: {problem}", tuple(errors))
    return Verdict(None, tuple(errors))


# ----------------------------------------------------------------- the float32 reference
@contextlib.contextmanager
def float32_weights(module: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Every parameter and buffer of ``module`` in ``dtype`` upcast to float32 in place, cast
    back (exactly) on exit."""
    changed: list[torch.Tensor] = []
    try:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.dtype == dtype:
                tensor.data = tensor.data.float()
                changed.append(tensor)
        yield
    finally:
        for tensor in changed:
            tensor.data = tensor.data.to(dtype)


@contextlib.contextmanager
def _full_float32_matmuls() -> Iterator[None]:
    """float32 products in float32 (not TF32, which someone may have allowed process-wide)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: one chunk


class NoReferenceMemory(RuntimeError):
    """Not even one layer's float32 copy fits in the share of free memory the check may take."""


def chunk_layers(span: BlockSpan) -> int:
    """How many layers of the span are upcast at once; raises NoReferenceMemory where even one
    layer would take more than ``REFERENCE_MEMORY_SHARE`` of the free memory (no out-of-memory
    error half-way through an upcast)."""
    layers = span._loaded.layers[span._lo : span._hi]
    per_layer = max(
        sum(p.numel() * 4 for p in layer.parameters() if p.dtype == span.dtype) for layer in layers
    )
    budget = REFERENCE_MEMORY_SHARE * _free_bytes(span.device)
    if per_layer > budget:
        raise NoReferenceMemory(
            f"a layer's float32 copy takes {per_layer / 2**30:.2f} GiB, more than "
            f"{REFERENCE_MEMORY_SHARE:.0%} of the {budget / REFERENCE_MEMORY_SHARE / 2**30:.2f} "
            f"GiB free on {span.device}"
        )
    return max(1, min(span.num_blocks, int(budget // max(per_layer, 1))))


def float32_reference(
    span: BlockSpan, cases: Sequence[ProbeCase], chunk: int | None = None
) -> list[list[torch.Tensor]]:
    """The float32 outputs of each case's single-token steps through the span's plain path,
    ``chunk`` layers upcast at a time (default: ``chunk_layers``)."""
    from blocks.span import PLAIN_DECODE

    chunk = chunk or chunk_layers(span)
    inputs = [[case.prefix.float(), *(s.float() for s in case.steps)] for case in cases]
    for first in range(span.start, span.end, chunk):
        view = span.subspan(first, min(first + chunk, span.end), decode=PLAIN_DECODE)
        with float32_weights(view._model, span.dtype), _full_float32_matmuls():
            outputs = []
            for sequence in inputs:
                cache = DynamicCache(config=view._config)
                outputs.append([view._run(x, cache, None) for x in sequence])
        inputs = outputs
    if span.device.type == "cuda":
        torch.cuda.empty_cache()  # the float32 copies' memory goes back
    return [sequence[1:] for sequence in inputs]
