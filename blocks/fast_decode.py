"""Fast single-token decode steps for a block span, with transformers' own layers.

A decode step (one new token per sequence, no padding: the only kind a session has) on the plain
path runs the family's whole base-model forward: argument handling, cache bookkeeping, causal-mask
construction, rotary tables, the hooks that hand our hidden states to the first kept layer. On a
small span that costs about as much as the layers themselves, and on a GPU every one of those
small operations is a kernel launch. Two techniques cut it, each used only where it is checked to
give the plain path's results:

1. ``DirectDecoder`` (any device, dynamic caches): calls the span's decoder layers one after the
   other with the very arguments the base forward passes them. Which arguments those are is read
   off two plain steps at load time (pre-hooks on the layers, forward hooks on every other module
   of the model), and each is classified: the cache object, position tensors, the output of one of
   the model's own modules (the rotary embedding: called again with the same kind of inputs),
   constants. Anything else (an ALiBi tensor or a mask made by a plain function) means no direct
   path for that model: nothing here names a family. The attention mask the base forward passes
   for one token is ``None`` in every family that gets a direct path, and that is exact: with one
   query and no padding a causal mask lets the query see every cached key of a full-attention
   layer, and a dynamic sliding-window cache layer holds only the window. Before use, the direct
   path is run against the plain path on probe inputs (batch 1 and 3, and across each sliding
   window) and must agree within ``tolerance(dtype)``.

2. ``SessionGraph`` (CUDA, static caches): the session's cache is transformers' ``StaticCache``
   (buffers of the session's maximum length allocated once and written in place; the position is
   a device tensor that each step advances), so a single-token step of the base-model forward
   launches the same kernels on the same addresses every time. It is captured once per session
   as a CUDA graph and replayed for every step: one launch for the whole span. Static caches are
   used only for models that transformers declares free of graph breaks
   (``_can_compile_fullgraph``) whose cache layers are all plain static layers (no sliding
   windows), after an eager probe against the dynamic plain path; each capture is checked against
   an eager run of the same step before its output is used. An idle session's graph (and cache)
   is kept for the next session of the same shape, one per loaded span, so a client opening
   session after session does not pay the capture every time.

These checks compare runs of the same kernels (a static cache changes only the attention's
masking), so they ask for equality within ``tolerance(dtype)``, bf16 included. A torch.compile'd
step (blocks/compiled_decode.py) rounds in other places: in bf16 and fp16 it is judged instead by
its distance to a float32 run of the probe (blocks/reference_check.py).

This module never touches the network.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

from blocks.reference_check import ProbeCase

if TYPE_CHECKING:
    from blocks.compiled_decode import CompiledStep
    from blocks.span import BlockSpan

log = logging.getLogger(__name__)

# Verification: batch sizes and steps run on both paths; sliding windows up to this long are
# crossed by the probe (a prefill of window - 2 tokens, then steps past the window).
PROBE_BATCHES = (1, 3)
PROBE_STEPS = 4
PROBE_PREFIX = 3
MAX_PROBED_WINDOW = 4096
# Eager runs before a CUDA graph capture (cuBLAS workspaces, lazy allocations, autotuning).
GRAPH_WARMUP_RUNS = 2
# Replays timed after a capture, for the log.
TIMED_REPLAYS = 5


@dataclass(frozen=True)
class DecodeOptions:
    """Which fast paths a span may use for single-token steps (each is still checked first).

    ``static_cache=None``: static caches (and CUDA graphs over them) on CUDA, dynamic on the CPU.
    ``compile=None``: the static-cache step compiled by torch.compile where CUDA graphs replay it
    (``serve --decode compiled``).
    """

    direct_layers: bool = True
    static_cache: bool | None = None
    cuda_graphs: bool = True
    # torch.compile of the static-cache step (blocks/compiled_decode.py); None: on CUDA only.
    # Off here (a compile costs ~35 s at load); ``serve`` asks for it by default (--decode).
    compile: bool | None = False


def tolerance(dtype: torch.dtype) -> float:
    """Largest |fast - plain| accepted, relative to max(1, max |plain|): float32 rounding for
    float32 (the issue's 1e-5), a few bf16/fp16 units otherwise."""
    return 1e-5 if dtype == torch.float32 else 2e-2


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    if got.shape != want.shape or not torch.isfinite(got).all():
        return False
    scale = max(1.0, float(want.abs().max()))
    return float((got.float() - want.float()).abs().max()) <= tolerance(want.dtype) * scale


class NoFastPath(Exception):
    """This model's layers cannot be called directly (the reason is the message)."""


# ----------------------------------------------------------------- argument sources
@dataclass(frozen=True)
class _Const:
    value: Any


@dataclass(frozen=True)
class _CacheRef:
    pass


@dataclass(frozen=True)
class _HiddenRef:
    stand_in: bool  # the zeros given as "inputs_embeds" when the embedding width differs


@dataclass(frozen=True)
class _PositionsRef:
    shape: tuple[int, ...]
    dtype: torch.dtype
    batch_dim: bool  # shape[0] is the batch size


@dataclass(frozen=True)
class _OutputRef:
    index: int  # into the decoder's module calls


@dataclass(frozen=True)
class _TupleRef:
    items: tuple[Any, ...]


@dataclass(frozen=True)
class _Call:
    module: nn.Module
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class _LayerCall:
    hidden_as_kwarg: bool
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]


_CONSTANT_TYPES = (bool, int, float, str, torch.dtype, torch.device)


@dataclass
class _Recording:
    """What one plain single-token step passed to the layers and computed outside them."""

    position: int
    batch: int
    cache: Any
    hidden: torch.Tensor
    stand_in: torch.Tensor
    layer_inputs: list[tuple[tuple[Any, ...], dict[str, Any], int]]  # + module calls done before
    calls: list[tuple[nn.Module, tuple[Any, ...], dict[str, Any], Any]]


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


class _Classifier:
    """Names each recorded value by where it comes from; raises NoFastPath for the rest."""

    def __init__(self, recording: _Recording) -> None:
        self.r = recording
        self.used: set[int] = set()

    def source(self, value: Any, before: int) -> Any:
        r = self.r
        if value is r.cache:
            return _CacheRef()
        if value is None or isinstance(value, _CONSTANT_TYPES):
            return _Const(value)
        for index in range(before - 1, -1, -1):
            output = r.calls[index][3]
            if output is value or (
                isinstance(value, torch.Tensor)
                and isinstance(output, torch.Tensor)
                and _same_tensor(output, value)
            ):
                self.used.add(index)
                return _OutputRef(index)
        if isinstance(value, torch.Tensor):
            if _same_tensor(value, r.hidden):
                return _HiddenRef(stand_in=False)
            if _same_tensor(value, r.stand_in):
                return _HiddenRef(stand_in=True)
            integral = not (value.is_floating_point() or value.is_complex())
            if integral and value.numel() and bool((value == r.position).all()):
                batch_dim = value.ndim > 1 and value.shape[0] == r.batch
                return _PositionsRef(tuple(value.shape), value.dtype, batch_dim)
            raise NoFastPath(
                f"a layer input of shape {tuple(value.shape)} is computed outside any module"
            )
        if isinstance(value, tuple | list):
            return _TupleRef(tuple(self.source(item, before) for item in value))
        raise NoFastPath(f"a layer input of type {type(value).__name__} cannot be reproduced")


def _plan(recording: _Recording) -> tuple[list[_Call], list[_LayerCall]]:
    classifier = _Classifier(recording)
    layers = []
    for args, kwargs, done in recording.layer_inputs:
        kwargs = dict(kwargs)
        hidden_as_kwarg = not args
        if hidden_as_kwarg:
            if "hidden_states" not in kwargs:
                raise NoFastPath("a layer received its hidden states under an unknown name")
            kwargs.pop("hidden_states")
        rest = args[1:]
        layers.append(
            _LayerCall(
                hidden_as_kwarg,
                tuple(classifier.source(a, done) for a in rest),
                tuple((k, classifier.source(v, done)) for k, v in kwargs.items()),
            )
        )
    # The module calls the layers' inputs depend on (transitively), in the order they ran.
    calls: dict[int, _Call] = {}
    pending = set(classifier.used)
    while pending - calls.keys():
        index = max(pending - calls.keys())
        module, args, kwargs, _ = recording.calls[index]
        before = set(classifier.used)
        calls[index] = _Call(
            module,
            tuple(classifier.source(a, index) for a in args),
            tuple((k, classifier.source(v, index)) for k, v in kwargs.items()),
        )
        pending |= classifier.used - before
    order = sorted(calls)
    renumber = {old: new for new, old in enumerate(order)}

    def remap(source: Any) -> Any:
        if isinstance(source, _OutputRef):
            return _OutputRef(renumber[source.index])
        if isinstance(source, _TupleRef):
            return _TupleRef(tuple(remap(item) for item in source.items))
        return source

    def remap_call(call: _Call | _LayerCall) -> Any:
        args = tuple(remap(a) for a in call.args)
        kwargs = tuple((k, remap(v)) for k, v in call.kwargs)
        if isinstance(call, _Call):
            return _Call(call.module, args, kwargs)
        return _LayerCall(call.hidden_as_kwarg, args, kwargs)

    return [remap_call(calls[i]) for i in order], [remap_call(layer) for layer in layers]


class _Env:
    __slots__ = ("batch", "cache", "hidden", "outputs", "position", "positions", "stand_in_fn")

    def __init__(self, hidden, cache, position, stand_in_fn):
        self.hidden = hidden
        self.cache = cache
        self.position = position
        self.batch = hidden.shape[0]
        self.stand_in_fn = stand_in_fn
        self.outputs: list[Any] = []
        self.positions: dict[Any, torch.Tensor] = {}


def _resolve(source: Any, env: _Env) -> Any:
    kind = type(source)
    if kind is _Const:
        return source.value
    if kind is _OutputRef:
        return env.outputs[source.index]
    if kind is _CacheRef:
        return env.cache
    if kind is _PositionsRef:
        tensor = env.positions.get(source)
        if tensor is None:
            shape = (env.batch, *source.shape[1:]) if source.batch_dim else source.shape
            tensor = torch.full(shape, env.position, dtype=source.dtype, device=env.hidden.device)
            env.positions[source] = tensor
        return tensor
    if kind is _HiddenRef:
        return env.stand_in_fn(env.hidden) if source.stand_in else env.hidden
    if kind is _TupleRef:
        return tuple(_resolve(item, env) for item in source.items)
    raise AssertionError(source)


def _layer_output_hidden(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


class DirectDecoder:
    """A span's single-token step as direct calls of its layers (see the module docstring)."""

    def __init__(
        self,
        layers: Sequence[nn.Module],
        calls: list[_Call],
        layer_calls: list[_LayerCall],
        stand_in_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self._layers = list(layers)
        self._calls = calls
        self._layer_calls = layer_calls
        self._stand_in_fn = stand_in_fn

    def run(self, hidden: torch.Tensor, cache: Any, position: int) -> torch.Tensor:
        """One step at ``position`` (the number of cached tokens); the caller holds the span's
        lock, has set its cache slots and entered inference mode."""
        env = _Env(hidden, cache, position, self._stand_in_fn)
        for call in self._calls:
            env.outputs.append(
                call.module(
                    *[_resolve(a, env) for a in call.args],
                    **{k: _resolve(v, env) for k, v in call.kwargs},
                )
            )
        for layer, plan in zip(self._layers, self._layer_calls):
            args = [_resolve(a, env) for a in plan.args]
            kwargs = {k: _resolve(v, env) for k, v in plan.kwargs}
            if plan.hidden_as_kwarg:
                output = layer(*args, hidden_states=hidden, **kwargs)
            else:
                output = layer(hidden, *args, **kwargs)
            hidden = _layer_output_hidden(output)
        return hidden


# ----------------------------------------------------------------- building and checking
def _random_hidden(span: BlockSpan, generator: torch.Generator, batch: int, length: int):
    probe = torch.randn(batch, length, span.hidden_size, generator=generator)
    return probe.to(span.device, span.dtype)


def _record(span: BlockSpan, cache: Any, hidden: torch.Tensor, position: int) -> _Recording:
    layers = list(span._loaded.layers[span._lo : span._hi])
    inside = {id(m) for layer in layers for m in layer.modules()}
    layer_inputs: list[tuple[tuple[Any, ...], dict[str, Any], int]] = []
    calls: list[tuple[nn.Module, tuple[Any, ...], dict[str, Any], Any]] = []
    stand_in = span._stand_in(hidden)

    def before_layer(module, args, kwargs):
        layer_inputs.append((args, dict(kwargs), len(calls)))

    def after_module(module, args, kwargs, output):
        calls.append((module, args, dict(kwargs), output))

    handles = [layer.register_forward_pre_hook(before_layer, with_kwargs=True) for layer in layers]
    handles += [
        module.register_forward_hook(after_module, with_kwargs=True)
        for module in span._model.modules()
        if id(module) not in inside and module is not span._model
    ]
    try:
        span._run(hidden, cache, None, stand_in=stand_in)
    finally:
        for handle in handles:
            handle.remove()
    if len(layer_inputs) != len(layers):
        raise NoFastPath("the model's forward did not call each layer of the span once")
    return _Recording(position, hidden.shape[0], cache, hidden, stand_in, layer_inputs, calls)


def _sliding_windows(span: BlockSpan) -> list[int]:
    cache = DynamicCache(config=span._config)
    probe = torch.zeros(1, 1, span.hidden_size, dtype=span.dtype, device=span.device)
    span._run(probe, cache, None)
    return sorted(
        {layer.get_max_length() for layer in cache.layers if getattr(layer, "is_sliding", False)}
    )


def _probe_prefixes(span: BlockSpan) -> list[int]:
    prefixes = [PROBE_PREFIX]
    for window in _sliding_windows(span):
        if PROBE_PREFIX < window - 2 <= MAX_PROBED_WINDOW:
            prefixes.append(window - 2)
    return prefixes


def _agrees(
    span: BlockSpan,
    new_cache: Callable[[int, int], Any],
    step: Callable[[torch.Tensor, Any, int], torch.Tensor],
    batches: Sequence[int] = PROBE_BATCHES,
) -> str | None:
    """Run the plain path (dynamic cache) and ``step`` (on ``new_cache(batch, max_len)``) from
    the same prefix on random inputs; None if every output agrees, else what differed (or what
    failed: a model that cannot run the other way is a model without that fast path)."""
    try:
        return _compare(span, new_cache, step, batches)
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"


def probe_cases(span: BlockSpan, batches: Sequence[int] = PROBE_BATCHES) -> list[ProbeCase]:
    """The random probe sequences the checks run: for each probed prefix length and batch size,
    a prefix and ``PROBE_STEPS`` single-token steps (fixed seed)."""
    generator = torch.Generator().manual_seed(0)
    cases = []
    for prefix in _probe_prefixes(span):
        for batch in batches:
            first = _random_hidden(span, generator, batch, prefix)
            steps = tuple(_random_hidden(span, generator, batch, 1) for _ in range(PROBE_STEPS))
            cases.append(ProbeCase(first, steps))
    return cases


def _compare(
    span: BlockSpan,
    new_cache: Callable[[int, int], Any],
    step: Callable[[torch.Tensor, Any, int], torch.Tensor],
    batches: Sequence[int],
) -> str | None:
    for case in probe_cases(span, batches):
        batch, prefix = case.prefix.shape[:2]
        plain_cache = DynamicCache(config=span._config)
        fast_cache = new_cache(batch, prefix + len(case.steps))
        span._run(case.prefix, plain_cache, None)
        span._run(case.prefix, fast_cache, None)
        for index, hidden in enumerate(case.steps):
            want = span._run(hidden, plain_cache, None)
            got = step(hidden, fast_cache, prefix + index)
            if not _close(got, want):
                diff = float((got.float() - want.float()).abs().max())
                return f"batch {batch}, position {prefix + index}: max difference {diff:.3g}"
    return None


def build_direct_decoder(span: BlockSpan) -> DirectDecoder:
    """Read the span's layer arguments off two plain steps, then check the direct path.

    Raises NoFastPath (with the reason) where the layers cannot be called directly or the result
    differs from the plain path.
    """
    generator = torch.Generator().manual_seed(1)
    cache = DynamicCache(config=span._config)
    span._run(_random_hidden(span, generator, 2, PROBE_PREFIX), cache, None)
    try:
        recordings = [
            _record(span, cache, _random_hidden(span, generator, 2, 1), PROBE_PREFIX + i)
            for i in range(2)
        ]
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise NoFastPath(f"a recorded step failed: {type(exc).__name__}: {exc}") from None
    plans = [_plan(recording) for recording in recordings]
    if plans[0] != plans[1]:
        raise NoFastPath("the layers' arguments change in kind from one position to the next")
    calls, layer_calls = plans[0]
    for layer in layer_calls:
        for name, source in layer.kwargs:
            if "mask" in name and source != _Const(None):
                raise NoFastPath(f"the layers receive a computed {name}")
    decoder = DirectDecoder(
        span._loaded.layers[span._lo : span._hi], calls, layer_calls, span._stand_in
    )

    def direct(hidden: torch.Tensor, cache: Any, position: int) -> torch.Tensor:
        return span._run_direct(decoder, hidden, cache, position)

    difference = _agrees(span, lambda batch, length: DynamicCache(config=span._config), direct)
    if difference is not None:
        raise NoFastPath(f"direct layer calls differ from the plain path ({difference})")
    return decoder


# ----------------------------------------------------------------- static caches, CUDA graphs
def new_static_cache(span: BlockSpan, batch_size: int, max_length: int) -> StaticCache:
    return StaticCache(config=span._config, max_cache_len=max_length)


def static_cache_problem(span: BlockSpan) -> str | None:
    """Why this span cannot use static caches (None: it can); checked on probe inputs."""
    if not getattr(type(span._model), "_can_compile_fullgraph", False):
        return f"transformers does not declare {type(span._model).__name__} graph-safe"
    probe = new_static_cache(span, 1, 8)
    kinds = {type(layer) for layer in probe.layers}
    if any(
        not issubclass(kind, StaticLayer) or issubclass(kind, StaticSlidingWindowLayer)
        for kind in kinds
    ):
        names = ", ".join(sorted(kind.__name__ for kind in kinds))
        return f"its static cache has layers other than plain static ones ({names})"

    def eager(hidden: torch.Tensor, cache: Any, position: int) -> torch.Tensor:
        return span._run(hidden, cache, None)

    difference = _agrees(span, lambda batch, length: new_static_cache(span, batch, length), eager)
    if difference is not None:
        return f"a static cache changes its results ({difference})"
    return None


class SessionGraph:
    """A CUDA graph of one single-token step of a span over one session's static cache.

    Replaying reads the input buffer, writes the step's keys and values at the cache's device-side
    position, advances it, and leaves the result in the output buffer.
    """

    def __init__(self, graph: Any, static_in: torch.Tensor, static_out: torch.Tensor) -> None:
        self._graph = graph
        self._in = static_in
        self._out = static_out

    def replay(self, hidden: torch.Tensor) -> torch.Tensor:
        self._in.copy_(hidden)
        self._graph.replay()
        return self._out.clone()


def capture_step(
    span: BlockSpan, cache: StaticCache, hidden: torch.Tensor, compiled: CompiledStep | None = None
) -> tuple[SessionGraph | None, torch.Tensor]:
    """Capture the span's single-token step over ``cache`` and run it once for ``hidden``.

    Each graph has its own memory pool (a decode step's intermediates are small): graphs sharing
    one pool broke PyTorch 2.11's allocator (an internal assert) once one of them was freed.
    ``compiled`` (blocks/compiled_decode.py): capture the compiled step instead of the eager one;
    it must pass ``CompiledStep.capture_problem`` (against an eager step of the same input), and
    where compiling fails or the check fails, the eager step is captured instead (logged).

    Returns the graph (None if the capture failed or its result differs from an eager run of the
    same step) and the step's output; either way the cache has advanced by this one step.
    """
    from blocks.compiled_decode import CompileFailed

    device = hidden.device
    static_in = hidden.clone()
    reference = None
    if compiled is not None:
        # The eager step first: what the compiled one must give (it also allocates the buffers
        # of a cache still empty, which the compiled step must find in place).
        reference = span._run(static_in, cache, None)
        cache.crop(-1)
        key = compiled.shape(static_in, cache)

        def run() -> torch.Tensor:
            return span._run_compiled(compiled, static_in, cache)
    else:

        def run() -> torch.Tensor:
            return span._run(static_in, cache, None)

    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_RUNS):
                eager = run()
                cache.crop(-1)
    except CompileFailed:  # logged; nothing ran
        torch.cuda.current_stream(device).wait_stream(side)
        return capture_step(span, cache, hidden)
    torch.cuda.current_stream(device).wait_stream(side)
    if compiled is not None and not compiled.usable(key):  # it ran, but uncompiled
        return capture_step(span, cache, hidden)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = run()
    except Exception as exc:  # a model the capture cannot handle: keep the eager path
        log.warning("CUDA graph capture failed (%s: %s); eager steps", type(exc).__name__, exc)
        torch.cuda.synchronize(device)
        if compiled is not None:
            compiled.failed[key] = f"its CUDA graph capture failed ({type(exc).__name__})"
            return capture_step(span, cache, hidden)
        return None, span._run(static_in, cache, None)
    graph.replay()
    if compiled is not None:
        problem = compiled.capture_problem(static_out, eager, reference)
        if problem is not None:
            compiled.failed[key] = problem
            log.warning("blocks [%d, %d): the compiled step: %s; eager CUDA graphs",
                        span.start, span.end, problem)
            cache.crop(-1)
            return capture_step(span, cache, hidden)
    elif not _close(static_out, eager):
        diff = float((static_out.float() - eager.float()).abs().max())
        log.warning("CUDA graph replay differs from the eager step (%.3g); eager steps", diff)
        return None, eager
    output = static_out.clone()
    milliseconds = _time_replays(graph, cache)
    if milliseconds is not None:
        log.info(
            "blocks [%d, %d): CUDA graph of the %s step, batch %d, cache length %d: %.2f ms "
            "per step on the GPU", span.start, span.end,
            "eager" if compiled is None else "compiled", static_in.shape[0],
            cache.layers[0].get_max_length(), milliseconds,
        )
    return SessionGraph(graph, static_in, static_out), output


def _time_replays(graph: Any, cache: StaticCache) -> float | None:
    """Milliseconds per replay of ``graph`` (the median of a few), for the log; the cache is
    moved back afterwards. None where the cache has no room for the extra steps."""
    position = int(cache.get_seq_length())
    if position + TIMED_REPLAYS > cache.layers[0].get_max_length():
        return None
    events = [torch.cuda.Event(enable_timing=True) for _ in range(TIMED_REPLAYS + 1)]
    events[0].record()
    for event in events[1:]:
        graph.replay()
        event.record()
    events[-1].synchronize()
    cache.crop(-TIMED_REPLAYS)
    times = sorted(a.elapsed_time(b) for a, b in itertools.pairwise(events))
    return times[len(times) // 2]


@dataclass
class IdleGraph:
    """A closed session's static cache and graph, kept for the next session of its shape."""

    key: tuple[int, int, int, int]  # (first layer, end layer, batch size, max length)
    cache: StaticCache
    graph: SessionGraph | None
