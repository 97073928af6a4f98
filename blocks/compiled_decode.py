"""A span's single-token step compiled by torch.compile (inductor), for ``serve --decode compiled``.

Why: the CUDA graph of blocks/fast_decode.py replays transformers' layers exactly as they run
eagerly: for a Llama about 40 kernels per layer (norms, rotary, SiLU * mul, residual adds, cache
writes, seven matrix products), 1300 per step of a 32-block span, most of them tiny, so an 8B
span's step took twice the time its weights take to read. Inductor fuses the elementwise work
between the matrix products into a few generated kernels per layer. This is transformers' own
documented fast path (a ``StaticCache`` plus ``torch.compile`` of the forward); the compiled
function is then captured as one CUDA graph per session shape, as the eager one was.

What is compiled: the span's whole base-model forward for one new token, with the hooks that
hand it our hidden states and capture the last layer's output, as one graph (``fullgraph``):
the layers are different module objects, so compiling them one by one would recompile per
layer. ``dynamic=False``: every shape is fixed, so each (batch size, cache length) is its own
compile (transformers' mask code reads the static cache's length as a Python int). To keep the
number of shapes small, the static caches of a compiled span are allocated at a rounded-up
length (``cache_length``: the next power of two from 256), so a session of 144 tokens and one
of 200 share one compiled step; the server's cache budget counts that length.

When: at load, batch 1 at the smallest length is compiled and checked: in float32 against the
plain path (dynamic cache, eager forward) within ``fast_decode.tolerance``; in bf16/fp16 by the
float32-reference rule (blocks/reference_check.py: no farther from a float32 run of the probe
than the plain bf16 path, within a stated margin; two bf16 computations that round differently
differ by as much as each differs from the exact result, so "equal to plain bf16" is the wrong
test). Any other shape compiles at the first single-token step of the first session that has
it, and that step waits for it (the log says so, with the time taken). Each capture of a
compiled step is checked before it is used (``CompiledStep.capture_problem``): its replay must
equal the compiled step run without a graph, and that must be as near the eager step as the
load-time probe found it (within ``CAPTURE_SLACK``; float32: equal). A compile that fails or
differs is logged with its reason, and the span (or that shape) keeps the eager graph path
(``--decode fast``). Sub-spans (slices a client asks for) are not compiled: each would be a
compile of its own.

Status (2026-12-02, H200, torch 2.11): an 8B span's step compiles in 31-36 s. The old load-time
check (compiled equal to plain bf16 within a few bf16 units) rejected it; under the
float32-reference rule it is accepted (3.5% from float32 in relative L2, the plain bf16 step
4.2%), and its CUDA graph takes 5.3 ms per step against the eager graph's 7.1 ms, so it is
``serve``'s default on CUDA (docs/benchmarks.md).

This module never touches the network.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from blocks import fast_decode, reference_check
from blocks.fast_decode import NoFastPath

if TYPE_CHECKING:
    from blocks.span import BlockSpan

log = logging.getLogger(__name__)

# Ours: static caches of compiled spans hold a power of two of positions, at least this many,
# so that a few compiled shapes cover every session length (six lengths up to 8192).
MIN_CACHE_LENGTH = 256
# Ours: compiled shapes per span; a session of another shape uses the eager CUDA graph.
MAX_COMPILED_SHAPES = 8
# torch._dynamo keeps this many compiled variants per function (default 8; past it, it runs
# the function uncompiled): every span's step is one function, one variant per shape.
DYNAMO_RECOMPILE_LIMIT = 64
# Ours: a compiled capture in bf16/fp16 serves if its output is at most this many times as far
# (relative L2) from the eager step's as the compiled and plain steps were at load (a compiled
# step that computes something else, such as another span's layers, lands at distances near 1).
CAPTURE_SLACK = 4.0


def cache_length(max_length: int) -> int:
    """The length of a compiled span's static cache for a session of ``max_length`` tokens."""
    length = MIN_CACHE_LENGTH
    while length < max_length:
        length *= 2
    return length


class CompileFailed(RuntimeError):
    """torch.compile could not compile a step (the reason is the message)."""


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name) < DYNAMO_RECOMPILE_LIMIT:
        setattr(config, name, DYNAMO_RECOMPILE_LIMIT)


class CompiledStep:
    """The compiled single-token step of one span, one compiled variant per shape."""

    def __init__(self, span: BlockSpan) -> None:
        _raise_recompile_limit()
        self._span = span
        self._fn = torch.compile(self._forward, dynamic=False, fullgraph=True)
        self.compile_seconds: dict[tuple[int, int], float] = {}  # by (batch size, cache length)
        self.failed: dict[tuple[int, int], str] = {}  # shapes that stay eager, with the reason
        # bf16/fp16: the largest relative L2 distance between compiled and plain steps in the
        # load-time probe (None: float32 or quantized, where the plain path is the reference).
        self.probe_distance: float | None = None

    def _forward(self, hidden: torch.Tensor, cache: Any) -> torch.Tensor:
        """What dynamo traces: the span's eager single-token step (``BlockSpan._run``, unlocked)."""
        span = self._span
        return span._loaded.run(
            span._model,
            span._lo,
            span._hi,
            hidden,
            inputs_embeds=span._stand_in(hidden),
            attention_mask=None,
            use_cache=True,
            **{span.cache_kwarg: cache},
        )

    @staticmethod
    def shape(hidden: torch.Tensor, cache: Any) -> tuple[int, int]:
        return hidden.shape[0], cache.layers[0].get_max_length()

    def usable(self, key: tuple[int, int]) -> bool:
        """Whether a step of shape ``key`` runs compiled (or may be compiled now)."""
        if key in self.failed:
            return False
        return key in self.compile_seconds or len(self.compile_seconds) < MAX_COMPILED_SHAPES

    def capture_problem(
        self, replayed: torch.Tensor, compiled: torch.Tensor, eager: torch.Tensor
    ) -> str | None:
        """Why a CUDA graph of the compiled step may not serve (None: it may). ``replayed``: the
        graph's output; ``compiled``: the compiled step run without a graph on the same input at
        the same position; ``eager``: the plain (uncompiled) step there."""
        if not fast_decode._close(replayed, compiled):  # the graph replays the same kernels
            diff = float((replayed.float() - compiled.float()).abs().max())
            return f"its CUDA graph differs from the compiled step ({diff:.3g})"
        if self.probe_distance is None:
            if not fast_decode._close(compiled, eager):
                diff = float((compiled.float() - eager.float()).abs().max())
                return f"it differs from the eager step ({diff:.3g})"
            return None
        bound = CAPTURE_SLACK * max(self.probe_distance, reference_check.unit_roundoff(eager.dtype))
        distance = reference_check.relative_l2(compiled, eager)
        if not distance <= bound:
            return (f"it is {distance:.4f} (relative L2) from the eager step, over {CAPTURE_SLACK}"
                    f" x the {self.probe_distance:.4f} of the load-time probe")
        return None

    def run(self, hidden: torch.Tensor, cache: Any) -> torch.Tensor:
        """One compiled step (compiling its shape first if new). The caller holds the span's lock
        and has entered inference mode. Raises CompileFailed if compilation failed (nothing ran:
        the cache is as it was).

        Spans of the same structure share compiled code: dynamo's guards do not pin module
        objects (their parameters are inputs), so a second span of a shape reuses the first's
        compiled step, and its "compile" takes a fraction of a second."""
        key = self.shape(hidden, cache)
        if key in self.compile_seconds:
            return self._fn(hidden, cache)
        span = self._span
        log.info(
            "blocks [%d, %d): compiling the single-token step for batch %d, cache length %d "
            "(torch.compile, once per shape; this step waits for it)",
            span.start, span.end, *key,
        )
        began = time.perf_counter()
        try:
            output = self._fn(hidden, cache)
        except Exception as exc:  # dynamo, inductor or Triton: every failure means "stay eager"
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            self.failed[key] = reason
            log.warning("blocks [%d, %d): torch.compile failed (%s); eager CUDA graphs",
                        span.start, span.end, reason)
            raise CompileFailed(reason) from None
        seconds = time.perf_counter() - began
        self.compile_seconds[key] = seconds
        log.info("blocks [%d, %d): compiled the step for batch %d, cache length %d in %.1f s",
                 span.start, span.end, *key, seconds)
        return output


def build_compiled_step(span: BlockSpan) -> CompiledStep:
    """Compile the span's step for batch 1 at the smallest cache length and check it; raises
    NoFastPath with the reason if it fails or is judged worse than the plain path.

    The check: in float32, equality with the plain path (``fast_decode.tolerance``); in bf16 or
    fp16, the float32-reference rule (blocks/reference_check.py): the compiled step must be about
    as close to a float32 run of the probe as the plain path is, or closer."""
    step = CompiledStep(span)

    def compiled(hidden: torch.Tensor, cache: Any, position: int) -> torch.Tensor:
        return span._run_compiled(step, hidden, cache)

    def new_cache(batch: int, length: int) -> Any:
        return fast_decode.new_static_cache(span, batch, cache_length(length))

    verdict = None
    if reference_check.applies(span):
        cases = fast_decode.probe_cases(span, batches=(1,))
        try:
            # Eager, before anything is compiled: the weights are upcast in place meanwhile.
            reference = reference_check.float32_reference(span, cases)
        except (RuntimeError, ValueError, TypeError) as exc:  # no memory for it, say
            raise NoFastPath(f"no float32 reference to judge compiled steps by "
                             f"({type(exc).__name__}: {exc})") from None
        try:
            verdict = reference_check.judge(span, cases, new_cache, compiled, reference=reference)
            difference = verdict.problem
        except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
            difference = f"{type(exc).__name__}: {exc}"
    else:
        difference = fast_decode._agrees(span, new_cache, compiled, batches=(1,))
    if not step.compile_seconds:
        reason = next(iter(step.failed.values()), difference or "no shape was compiled")
        raise NoFastPath(f"torch.compile did not compile the step ({reason})")
    if difference is not None:
        detail = f"; {verdict.summary()}" if verdict is not None else ""
        raise NoFastPath(f"compiled steps differ from the plain path ({difference}{detail})")
    if verdict is not None:
        step.probe_distance = verdict.max_distance
        log.info("blocks [%d, %d): compiled step accepted by the float32-reference rule: %s",
                 span.start, span.end, verdict.summary())
    return step
