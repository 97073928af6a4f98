"""A span of a model's transformer blocks, run with transformers' own code; and its sessions.

``BlockSpan`` holds decoder layers [start, end) of a Hugging Face decoder-only model and runs
them through the family's own base-model ``forward``: rotary embeddings, ALiBi, attention masks
and attention caches are transformers', not ours. That forward also does things meant for the
whole model (embedding lookup, scaling, position embeddings before the first layer; the final
norm after the last): a hook on the first kept layer hands it our hidden states unchanged, and a
hook on the last kept layer captures its output, so neither end is re-implemented or guessed.
The embeddings are absent and the other non-layer parameters are zeros: they only compute what
the hooks discard. A sub-span (any slice a client asks for) reuses the loaded layers.

``SpanSession`` is one inference session: a transformers cache for this span only, fed with new
positions only; the position is the number of cached tokens, so position ids and masks follow
from the cache exactly as in transformers' own generation. A session may hold padding
(left-padded prompts of a batch, given with the steps that add it): it then passes the family's
forward the attention mask of all its positions and position ids that count tokens only, as
transformers' generation derives them from its mask. Sessions can move back (speculative
decoding) and report their exact cache size, for the server's cache budget.

This module may not do I/O beyond reading the model directory, and never touches the network.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig

from blocks import compiled_decode, fast_decode
from blocks.compiled_decode import CompiledStep, CompileFailed
from blocks.fast_decode import DecodeOptions, DirectDecoder, IdleGraph, NoFastPath
from blocks.quantization import quantize_linears
from model_parts.dummy import DummyModelFiles
from model_parts.files import ModelFiles
from model_parts.skeleton import (
    DeviceOptions,
    ModelInputError,
    UnsupportedModelError,
    build_skeleton,
    checkpoint_key_map,
    find_layer_list,
    load_config,
    load_tensors,
    meta_parameters,
    position_limit,
    renumber_layers,
    resolve_device,
    resolve_dtype,
    restrict_config,
    set_submodule,
)

log = logging.getLogger(__name__)

# No single-token fast path at all (and no probes to set one up): the plain path only.
PLAIN_DECODE = DecodeOptions(direct_layers=False, static_cache=False, compile=False)


# Hidden states of these dtypes are converted to the span's own: a client may run its head
# in another precision than a server its blocks (servers of one model may even differ), as
# the same model run locally in mixed precision would convert between layers.
ACTIVATION_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


class SpanInputError(ModelInputError):
    """A request to a span or session is malformed (shape, dtype, length, position)."""


class SessionTooLongError(SpanInputError):
    """A step would run past the session's max_length."""


class SessionClosedError(RuntimeError):
    """The session was closed; its cache is gone."""


class RunTuning(Protocol):
    """What a request adds to one run of a span (blocks/tuning.py): ``applied`` is entered
    while the run holds the span's lock and yields the hidden states to feed the first layer."""

    differentiable: bool

    def applied(
        self, span: BlockSpan, hidden: torch.Tensor
    ) -> contextlib.AbstractContextManager[torch.Tensor]: ...


class _AbsentEmbedding(nn.Module):
    """Stands in for the token embedding a span never uses (hidden states come in instead)."""

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise UnsupportedModelError("a block span holds no embeddings; send hidden states")


def _layer_output_hidden(output: Any) -> torch.Tensor:
    """A decoder layer returns its hidden states, or a tuple starting with them, by family."""
    return output if isinstance(output, torch.Tensor) else output[0]


@dataclass(frozen=True)
class _CacheLayerCost:
    """Bytes one cache layer holds: ``per_token`` per cached position and sequence, at most
    ``max_tokens`` positions (sliding windows; 0 = unbounded), plus a fixed ``constant``."""

    per_token: int
    max_tokens: int
    constant: int


def _tensor_bytes(obj: object) -> int:
    seen: set[int] = set()
    total = 0
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            total += value.numel() * value.element_size()
    return total


class _LoadedLayers:
    """The decoder layers a server loaded, shared by its span and every sub-span of it.

    Runs are serialised by one lock. For each run it records which layer receives the input
    (the run's first) and which one's output is the result (its last); hooks on those layers
    act only for the run that named them. Each layer's ``layer_idx`` is its slot in the
    running (sub-)span's cache, so it is set for each run's range.
    """

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self.lock = threading.Lock()
        self._first: nn.Module | None = None
        self._last: nn.Module | None = None
        self._pending: torch.Tensor | None = None
        self._captured: torch.Tensor | None = None
        self._hooked_first: set[int] = set()
        self._hooked_last: set[int] = set()
        self._slot_owners = [
            [m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
            for layer in layers
        ]
        self._slots_from = 0
        # Single-token fast paths (blocks/fast_decode.py): one idle session's static cache and
        # CUDA graph kept for the next session of the same shape.
        self.idle_graph: IdleGraph | None = None

    def set_slots(self, lo: int) -> None:
        """Number the layers' cache slots from layer ``lo`` (a run's first layer). Caller holds
        ``lock``."""
        if self._slots_from != lo:
            for index in range(len(self.layers)):
                for module in self._slot_owners[index]:
                    module.layer_idx = index - lo
            self._slots_from = lo

    def hook(self, lo: int, hi: int) -> None:
        """Make layers ``lo`` and ``hi - 1`` able to act as a run's first and last layer."""
        if lo not in self._hooked_first:
            self.layers[lo].register_forward_pre_hook(self._substitute_input, with_kwargs=True)
            self._hooked_first.add(lo)
        if hi - 1 not in self._hooked_last:
            self.layers[hi - 1].register_forward_hook(self._capture_output)
            self._hooked_last.add(hi - 1)

    def _substitute_input(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if module is not self._first:
            return None
        if args:
            return (self._pending, *args[1:]), kwargs
        kwargs["hidden_states"] = self._pending
        return args, kwargs

    def _capture_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if module is self._last:
            self._captured = _layer_output_hidden(output)

    def run(self, model: nn.Module, lo: int, hi: int, hidden: torch.Tensor, **kwargs: Any) -> Any:
        """Run ``model`` (a base model over layers [lo, hi)) with ``hidden`` entering layer lo;
        returns what layer hi - 1 output. Caller holds ``lock``."""
        self.set_slots(lo)
        self._first, self._last, self._pending = self.layers[lo], self.layers[hi - 1], hidden
        try:
            model(**kwargs)
            output = self._captured
        finally:
            self._first = self._last = self._pending = self._captured = None
        if output is None:
            raise UnsupportedModelError("the model's forward did not run the span's last layer")
        return output


def _clone_with_layers(
    base: nn.Module, path: str, layers: nn.ModuleList, config: PretrainedConfig
) -> nn.Module:
    """A shallow copy of ``base`` whose layer list at ``path`` is ``layers`` and whose config is
    ``config``; every other submodule (rotary embeddings, stand-ins) is shared, not copied."""
    original_config = base.config
    root = copy.copy(base)
    root._modules = dict(base._modules)
    cloned = [root]
    *parents, name = path.split(".")
    for part in parents:
        child = copy.copy(cloned[-1]._modules[part])
        child._modules = dict(child._modules)
        cloned[-1]._modules[part] = child
        cloned.append(child)
    cloned[-1]._modules[name] = layers
    for module in cloned:
        if getattr(module, "config", None) is original_config:
            module.config = config
    return root


class BlockSpan:
    """Decoder layers [start, end) of one model, ready to run on one device.

    Build with :meth:`load`; :meth:`subspan` gives a span over fewer of the same layers, sharing
    their weights. Thread-safe: one computation at a time over a span and its sub-spans.
    """

    def __init__(
        self,
        loaded: _LoadedLayers,
        model: nn.Module,
        config: PretrainedConfig,
        blocks: tuple[int, int],
        layer_range: tuple[int, int],
        layers_path: str,
    ) -> None:
        self._loaded = loaded
        self._model = model
        self._config = config
        self.start, self.end = blocks
        self._lo, self._hi = layer_range
        self._layers_path = layers_path
        self.hidden_size: int = config.hidden_size
        # The first floating-point parameter: quantized weights are stored as integers.
        params = list(loaded.layers[self._lo].parameters())
        first_param = next((p for p in params if p.is_floating_point()), params[0])
        self.dtype: torch.dtype = first_param.dtype
        self.device: torch.device = first_param.device
        embeddings = model.get_input_embeddings()
        self._embedding_dim = getattr(embeddings, "embedding_dim", self.hidden_size)
        self.position_limit = position_limit(model, config, layers_path)
        # Families that take position ids get them for padded sessions; the others (ALiBi:
        # BLOOM) derive positions from the attention mask themselves.
        forward = inspect.signature(model.forward).parameters
        self._takes_position_ids = "position_ids" in forward
        # transformers 5.24 renamed the base forward's `past_key_values` to `cache` (the old
        # name still works, with a FutureWarning in every server's log): the installed name.
        self.cache_kwarg = "cache" if "cache" in forward else "past_key_values"
        loaded.hook(self._lo, self._hi)
        self._cache_costs: list[_CacheLayerCost] = []
        self._decode_options = DecodeOptions()
        self._direct: DirectDecoder | None = None
        self._direct_checked = False
        self._static = False
        self._compiled: CompiledStep | None = None
        self.fast_path_notes: dict[str, str] = {}  # why a fast path is off, by path
        self.quant = "none"

    @classmethod
    def load(
        cls,
        model: ModelFiles | DummyModelFiles | str | Path,
        start: int,
        end: int,
        options: DeviceOptions | None = None,
        decode: DecodeOptions | None = None,
        quant: str = "none",
    ) -> BlockSpan:
        """Read layers [start, end) of the model directory (only their tensors) and build them.

        ``decode``: which single-token fast paths to try (blocks/fast_decode.py); each is checked
        against the plain path here, at load, before any session uses it. ``quant``: the layers'
        linear weights in ``int8`` or ``nf4`` through bitsandbytes (blocks/quantization.py).
        ``model`` may be a ``DummyModelFiles`` (random weights from the config alone).
        """
        options = options or DeviceOptions()
        files = ModelFiles(model) if isinstance(model, str | Path) else model
        config = load_config(files)
        total = config.get_text_config().num_hidden_layers
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= total):
            raise ValueError(f"blocks [{start}, {end}) are not a non-empty range in [0, {total})")
        device = resolve_device(options.device)
        dtype = resolve_dtype(files, options.dtype)

        causal_lm = build_skeleton(config, dtype)
        path, all_layers = find_layer_list(causal_lm)
        key_map = checkpoint_key_map(files, causal_lm)
        kept = nn.ModuleList(all_layers[start:end])
        set_submodule(causal_lm, path, kept)
        renumber_layers(kept, start)
        restrict_config(causal_lm.config, start, end)

        wanted = {}
        for name, model_name in key_map.items():
            index, dot, rest = model_name.removeprefix(f"{path}.").partition(".")
            in_layers = model_name.startswith(f"{path}.") and dot and index.isdigit()
            if in_layers and start <= int(index) < end:
                wanted[name] = f"{path}.{int(index) - start}.{rest}"
        tensors = files.read(sorted(wanted), **files.read_options(device, dtype))
        load_tensors(causal_lm, {wanted[name]: tensor for name, tensor in tensors.items()}, dtype)
        missing = meta_parameters(kept)
        if missing:
            index, _, rest = missing[0].partition(".")
            raise UnsupportedModelError(
                f"the checkpoint lacks {len(missing)} tensors of blocks [{start}, {end}), "
                f"e.g. {path}.{start + int(index)}.{rest}"
            )
        quantize_linears(kept, quant, device, dtype)

        base = causal_lm.base_model
        if base.config is not causal_lm.config:
            restrict_config(base.config, start, end)
        embeddings = base.get_input_embeddings()
        base.set_input_embeddings(
            _AbsentEmbedding(getattr(embeddings, "embedding_dim", config.hidden_size))
        )
        for name in meta_parameters(base):
            module_path, _, param_name = name.rpartition(".")
            owner = base.get_submodule(module_path)
            shape = owner._parameters[param_name].shape
            owner._parameters[param_name] = nn.Parameter(
                torch.zeros(shape, dtype=dtype), requires_grad=False
            )
        base.to(device)
        layers_path = path.removeprefix(f"{causal_lm.base_model_prefix}.")
        loaded = _LoadedLayers(kept)
        span = cls(loaded, base, base.config, (start, end), (0, end - start), layers_path)
        span.quant = quant
        span._cache_costs = span._measure_cache_costs()
        span._set_up_fast_paths(decode or DecodeOptions())
        return span

    def subspan(self, start: int, end: int, decode: DecodeOptions | None = None) -> BlockSpan:
        """Blocks [start, end) of this span, sharing its weights (a client may run any slice).
        ``decode``: its fast paths (default: this span's; ``PLAIN_DECODE``: none, no probes)."""
        if not (isinstance(start, int) and isinstance(end, int)) or not (
            self.start <= start < end <= self.end
        ):
            raise SpanInputError(
                f"blocks [{start}, {end}) are not a non-empty range in [{self.start}, {self.end})"
            )
        if (start, end) == (self.start, self.end):
            return self
        lo, hi = self._lo + start - self.start, self._lo + end - self.start
        config = copy.deepcopy(self._config)
        restrict_config(config, start - self.start, end - self.start)
        layers = nn.ModuleList(self._loaded.layers[lo:hi])
        model = _clone_with_layers(self._model, self._layers_path, layers, config)
        view = BlockSpan(self._loaded, model, config, (start, end), (lo, hi), self._layers_path)
        view._cache_costs = self._cache_costs[start - self.start : end - self.start]
        view.quant = self.quant
        view._set_up_fast_paths(decode or self._decode_options, lazy_direct=True)
        return view

    # ------------------------------------------------------------ fast paths
    def _set_up_fast_paths(self, options: DecodeOptions, lazy_direct: bool = False) -> None:
        self._decode_options = options
        static = options.static_cache
        if static is None:
            static = self.device.type == "cuda"
        if static:
            problem = fast_decode.static_cache_problem(self)
            self._static = problem is None
            if problem is not None:
                self.fast_path_notes["static_cache"] = problem
                log.info("blocks [%d, %d): no static cache: %s", self.start, self.end, problem)
        compile_ = options.compile
        if compile_ is None:
            compile_ = self.device.type == "cuda" and options.cuda_graphs
        if compile_ and self._static and lazy_direct:
            self.fast_path_notes["compiled"] = "a sub-span is not compiled (eager CUDA graphs)"
        elif compile_ and self._static:
            try:
                self._compiled = compiled_decode.build_compiled_step(self)
            except NoFastPath as exc:
                self.fast_path_notes["compiled"] = str(exc)
                log.warning("blocks [%d, %d): no compiled steps: %s", self.start, self.end, exc)
        if not lazy_direct and not self._static:
            self._direct_decoder()

    def _direct_decoder(self) -> DirectDecoder | None:
        """The direct single-token path, built and checked on first use (None: unavailable)."""
        if not self._direct_checked:
            self._direct_checked = True
            if self._decode_options.direct_layers:
                try:
                    self._direct = fast_decode.build_direct_decoder(self)
                except NoFastPath as exc:
                    self.fast_path_notes["direct_layers"] = str(exc)
                    log.info("blocks [%d, %d): plain decode steps: %s", self.start, self.end, exc)
        return self._direct

    @property
    def uses_cuda_graphs(self) -> bool:
        return self._static and self.device.type == "cuda" and self._decode_options.cuda_graphs

    @property
    def decode_paths(self) -> dict[str, bool]:
        """Which single-token fast paths this span uses (for logs, info and benchmarks)."""
        return {
            "direct_layers": not self._static and self._direct_decoder() is not None,
            "static_cache": self._static,
            "cuda_graphs": self.uses_cuda_graphs,
            "compiled": self._compiled is not None,
        }

    def session_cache_length(self, max_length: int) -> int:
        """Positions a session of ``max_length`` tokens holds in its cache: compiled spans round
        static caches up (blocks/compiled_decode.py ``cache_length``), so that few shapes
        compile; the server's cache budget counts this."""
        if self._compiled is not None:
            return compiled_decode.cache_length(max_length)
        return max_length

    def _stand_in(self, hidden: torch.Tensor) -> torch.Tensor:
        """What goes in as "inputs_embeds" (ignored: the first layer gets ``hidden``)."""
        if self._embedding_dim == self.hidden_size:
            return hidden
        batch, length, _ = hidden.shape
        return hidden.new_zeros(batch, length, self._embedding_dim)

    def _run_direct(
        self, decoder: DirectDecoder, hidden: torch.Tensor, cache: Any, position: int
    ) -> torch.Tensor:
        with self._loaded.lock, torch.inference_mode():
            self._loaded.set_slots(self._lo)
            return decoder.run(hidden, cache, position)

    def _run_compiled(
        self, step: CompiledStep, hidden: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        with self._loaded.lock, torch.inference_mode():
            self._loaded.set_slots(self._lo)
            return step.run(hidden, cache)

    def _step_compiled(self, hidden: torch.Tensor, cache: Any) -> torch.Tensor:
        """A single-token step, compiled where that shape compiles (no CUDA graphs: CPU)."""
        step = self._compiled
        if step is not None and step.usable(step.shape(hidden, cache)):
            try:
                return self._run_compiled(step, hidden, cache)
            except CompileFailed:
                pass  # logged; nothing ran
        return self._run(hidden, cache, None)

    def _run(
        self,
        hidden: torch.Tensor,
        cache: Any | None,
        attention_mask: torch.Tensor | None,
        stand_in: torch.Tensor | None = None,
        tuning: RunTuning | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pass of the base model's forward through this span's layers; ``tuning`` (deep
        prompts, LoRA: blocks/tuning.py) is applied for this run only, under autograd if it
        is differentiable. ``position_ids`` [batch, length] only where the family takes them."""
        if stand_in is None:
            stand_in = self._stand_in(hidden)
        extra = {} if position_ids is None or not self._takes_position_ids else {
            "position_ids": position_ids}
        grad = tuning is not None and tuning.differentiable
        with (
            self._loaded.lock,
            torch.enable_grad() if grad else torch.inference_mode(),
            contextlib.nullcontext(hidden) if tuning is None else tuning.applied(self, hidden)
            as hidden,
        ):
            return self._loaded.run(
                self._model,
                self._lo,
                self._hi,
                hidden,
                inputs_embeds=stand_in,
                attention_mask=attention_mask,
                use_cache=cache is not None,
                **{self.cache_kwarg: cache},
                **extra,
            )

    # ------------------------------------------------------------ validation
    def _check_hidden(self, hidden: object, batch_size: int | None = None) -> torch.Tensor:
        if not isinstance(hidden, torch.Tensor):
            raise SpanInputError(f"hidden states must be a torch.Tensor, not {type(hidden)}")
        if hidden.ndim != 3:
            raise SpanInputError(
                f"hidden states must be [batch, length, {self.hidden_size}], got shape "
                f"{tuple(hidden.shape)}"
            )
        batch, length, size = hidden.shape
        if size != self.hidden_size:
            raise SpanInputError(f"hidden size is {size}, this model's is {self.hidden_size}")
        if batch < 1 or length < 1:
            raise SpanInputError(f"empty hidden states of shape {tuple(hidden.shape)}")
        if hidden.dtype != self.dtype and hidden.dtype not in ACTIVATION_DTYPES:
            raise SpanInputError(f"hidden states are {hidden.dtype}, this span runs {self.dtype} "
                                 f"(and converts float32, float16 and bfloat16)")
        if batch_size is not None and batch != batch_size:
            raise SpanInputError(f"batch size is {batch}, the session was opened for {batch_size}")
        return hidden.to(self.device, self.dtype, non_blocking=True)

    # ------------------------------------------------------------- public API
    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    @property
    def layers_path(self) -> str:
        """Dotted path of the decoder-layer list inside the base model ("layers", "h"...)."""
        return self._layers_path

    def layer(self, block: int) -> nn.Module:
        """The decoder layer of (absolute) block ``block`` of this span."""
        if not self.start <= block < self.end:
            raise SpanInputError(f"block {block} is not in [{self.start}, {self.end})")
        return self._loaded.layers[self._lo + block - self.start]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        tuning: RunTuning | None = None,
    ) -> torch.Tensor:
        """Run full sequences through the span, no cache. ``attention_mask``: [batch, length],
        1 for real tokens and 0 for padding, as transformers takes it."""
        hidden = self._check_hidden(hidden_states)
        self._check_positions(hidden.shape[1])
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(
                hidden.shape[:2]
            ):
                raise SpanInputError(
                    f"attention mask must be a tensor of shape {tuple(hidden.shape[:2])}"
                )
            if attention_mask.is_floating_point() or attention_mask.is_complex():
                raise SpanInputError("attention mask must hold integers or booleans (1 = token)")
            if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise SpanInputError("attention mask must hold only 0 (padding) and 1 (token)")
            attention_mask = attention_mask.to(self.device)
        return self._run(hidden, None, attention_mask, tuning=tuning)

    def new_session(
        self, batch_size: int, max_length: int, cache_length: int | None = None
    ) -> SpanSession:
        """Open an inference session for ``batch_size`` sequences of up to ``max_length`` tokens.

        ``cache_length``: positions a static cache holds (at least ``max_length``; default
        ``session_cache_length(max_length)``)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise SpanInputError(f"batch size must be a positive integer, got {batch_size!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise SpanInputError(f"max length must be a positive integer, got {max_length!r}")
        self._check_positions(max_length, "max_length")
        if cache_length is None:
            cache_length = self.session_cache_length(max_length)
        return SpanSession(self, batch_size, max_length, max(cache_length, max_length))

    def _check_positions(self, length: int, what: str = "sequences of") -> None:
        limit = self.position_limit
        if limit is not None and length > limit:
            raise SessionTooLongError(f"{what} {length} tokens: this model has positions for "
                                      f"{limit} tokens only (a learned table of positions)")

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self._config)

    def _new_session_cache(self, batch_size: int, length: int) -> tuple[Any, Any]:
        """A session's cache and CUDA graph: static (``length`` positions; an idle session's,
        with its graph, if it had this shape) or dynamic."""
        if not self._static:
            return self._new_cache(), None
        key = (self._lo, self._hi, batch_size, length)
        idle, self._loaded.idle_graph = self._loaded.idle_graph, None
        if idle is not None and idle.key == key:
            with torch.inference_mode():
                idle.cache.reset()
            return idle.cache, idle.graph
        del idle  # another shape: free its memory before allocating this session's
        return fast_decode.new_static_cache(self, batch_size, length), None

    def _keep_idle(self, cache: Any, graph: Any, batch_size: int, length: int) -> None:
        if self._static:
            key = (self._lo, self._hi, batch_size, length)
            self._loaded.idle_graph = IdleGraph(key, cache, graph)

    def _step_graph(self, session: SpanSession, hidden: torch.Tensor) -> torch.Tensor:
        """A single-token step of a static-cache session through its CUDA graph."""
        if session._graph is not None:
            with self._loaded.lock, torch.inference_mode():
                return session._graph.replay(hidden)
        compiled = self._compiled
        if compiled is not None and not compiled.usable(
            (hidden.shape[0], session._cache.layers[0].get_max_length())
        ):
            compiled = None
        with torch.inference_mode():
            graph, output = fast_decode.capture_step(self, session._cache, hidden, compiled)
        if graph is None:
            self._decode_options = dataclasses.replace(self._decode_options, cuda_graphs=False)
            self.fast_path_notes["cuda_graphs"] = "capture failed or differed; see the log"
        session._graph = graph
        return output

    # ----------------------------------------------------------- cache costs
    def _measure_cache_costs(self) -> list[_CacheLayerCost]:
        """Measure what each cache layer holds after one and after two tokens (batch 1).

        Measured rather than derived from config fields, whose names differ between families
        (``num_key_value_heads``, ``multi_query``, ``n_head``...). Also proves that every layer
        of the span writes its own cache slot.
        """
        cache = self._new_cache()
        probe = torch.zeros(1, 1, self.hidden_size, dtype=self.dtype, device=self.device)
        self._run(probe, cache, None)
        one = [_tensor_bytes(layer) for layer in cache.layers]
        self._run(probe, cache, None)
        two = [_tensor_bytes(layer) for layer in cache.layers]
        if len(cache.layers) != self.num_blocks or cache.get_seq_length() != 2:
            raise UnsupportedModelError("the span's layers do not fill one cache slot each")
        costs = []
        for layer, after_one, after_two in zip(cache.layers, one, two, strict=True):
            per_token = after_two - after_one
            if per_token <= 0:
                raise UnsupportedModelError("a layer of the span caches nothing per token")
            max_tokens = layer.get_max_length() if getattr(layer, "is_sliding", False) else 0
            costs.append(_CacheLayerCost(per_token, max(max_tokens, 0), after_one - per_token))
        return costs

    @property
    def cache_bytes_per_token(self) -> int:
        """Cache bytes per position of one sequence, over all layers of the span."""
        return sum(cost.per_token for cost in self._cache_costs)

    def cache_tokens(self, batch_size: int, max_length: int) -> int:
        """Cache a session reserves, in block-tokens: one per position, sequence and block
        (the unit of a server's ``--cache-tokens`` budget, which counts tokens on every block)."""
        return batch_size * max_length * self.num_blocks

    def cache_bytes(self, batch_size: int, max_length: int) -> int:
        """Bytes of attention cache a session of (batch_size, max_length) holds at most.

        Exact for full-attention layers at ``max_length``; a sliding-window layer counts its
        window (between steps it keeps ``window - 1`` positions).
        """
        total = 0
        for cost in self._cache_costs:
            tokens = min(max_length, cost.max_tokens) if cost.max_tokens else max_length
            total += batch_size * tokens * cost.per_token + cost.constant
        return total


class SpanSession:
    """One inference session on a span: its own attention cache, stepped with new positions.

    A session serves one stream of requests: step it from one thread (or task) at a time. A step
    that fails inside the model (out of memory, say) closes the session; bad input does not.
    """

    def __init__(
        self, span: BlockSpan, batch_size: int, max_length: int, cache_length: int
    ) -> None:
        self.span = span
        self.batch_size = batch_size
        self.max_length = max_length
        self._cache_length = cache_length
        self._cache: Any | None
        self._cache, self._graph = span._new_session_cache(batch_size, cache_length)
        self._position = 0
        self._failed = False
        # Padding (left-padded prompts of a batch): [batch, max_length], 1 = token, made at the
        # first padded step; and the first padded position below `position`, if any.
        self._mask: torch.Tensor | None = None
        self._first_pad: int | None = None
        self._order_version = 0  # reorders applied (beam search)

    @property
    def position(self) -> int:
        """Number of positions in the cache: where the next step's first token goes."""
        return self._position

    @property
    def closed(self) -> bool:
        return self._cache is None

    def _live_cache(self) -> Any:
        if self._cache is None:
            raise SessionClosedError("the inference session is closed")
        return self._cache

    def step(
        self,
        hidden_new: torch.Tensor,
        tuning: RunTuning | None = None,
        mask: bytes | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run new positions (one or several) through the span; returns their hidden states.

        ``mask``: which new positions are padding ([batch, length] or its bytes row-major; 1 =
        token, 0 = padding; None: all tokens). Once a session holds padding, every step runs
        with the attention mask of all its positions and position ids counting tokens only, as
        transformers' generation derives them from the mask: the plain path, no fast path."""
        cache = self._live_cache()
        hidden = self.span._check_hidden(hidden_new, self.batch_size)
        length = hidden.shape[1]
        self._check_length(self._position, length)
        new_mask = _padding(mask, self.batch_size, length, hidden.device)
        return self._run_step(cache, hidden, new_mask, tuning)

    def _run_step(self, cache: Any, hidden: torch.Tensor, new_mask: torch.Tensor | None,
                  tuning: RunTuning | None) -> torch.Tensor:
        """`step` once its inputs are checked (`hidden` on the span's device and dtype)."""
        length = hidden.shape[1]
        if new_mask is not None or self._first_pad is not None:
            return self._step_padded(cache, hidden, new_mask, tuning)
        mask = None
        if length > 1 and self._position > 0:
            # Explicit: several queries on a non-empty cache must see every cached key.
            mask = torch.ones(
                self.batch_size, self._position + length, dtype=torch.long, device=hidden.device
            )
        span = self.span
        try:
            if tuning is not None:  # LoRA, deep prompts: the plain path applies them
                output = span._run(hidden, cache, mask, tuning=tuning)
            elif length > 1:
                output = span._run(hidden, cache, mask)
            elif span._static:
                if span.uses_cuda_graphs:
                    output = span._step_graph(self, hidden)
                elif span._compiled is not None:
                    output = span._step_compiled(hidden, cache)
                else:
                    output = span._run(hidden, cache, None)
            else:
                direct = span._direct_decoder()
                if direct is None:
                    output = span._run(hidden, cache, None)
                else:
                    output = span._run_direct(direct, hidden, cache, self._position)
        except BaseException:
            # Some layers may have cached the new positions and others not: unusable.
            self._failed = True
            self.close()
            raise
        self._position += length
        return output

    def step_at(
        self,
        position: int,
        hidden_new: torch.Tensor,
        tuning: RunTuning | None = None,
        mask: bytes | torch.Tensor | None = None,
        reorder: tuple[int, Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """A step as a client sends it: from ``position`` (at most the current one: earlier
        means roll back first), after the beam-search ``reorder`` (version, ids) if any.

        Every check runs before anything changes: a refused step leaves the session as it was
        (a rollback or reorder done before finding the step's tensor malformed would have lost
        positions or permuted rows that the client still counts on)."""
        cache = self._live_cache()
        hidden = self.span._check_hidden(hidden_new, self.batch_size)
        length = hidden.shape[1]
        if not isinstance(position, int) or not 0 <= position <= self._position:
            raise SpanInputError(
                f"step starts at position {position} but the session holds only {self._position}"
            )
        self._check_length(position, length)
        new_mask = _padding(mask, self.batch_size, length, hidden.device)
        if position < self._position:
            self._check_rollback()
        if reorder is not None:
            self._check_reorder(*reorder)
        self.rollback(position)
        if reorder is not None:
            self.reorder(*reorder)
        return self._run_step(cache, hidden, new_mask, tuning)

    def _check_length(self, position: int, length: int) -> None:
        if position + length > self.max_length:
            raise SessionTooLongError(
                f"{position + length} tokens exceed the session's max_length {self.max_length}"
            )

    def _step_padded(
        self,
        cache: Any,
        hidden: torch.Tensor,
        new_mask: torch.Tensor | None,
        tuning: RunTuning | None,
    ) -> torch.Tensor:
        position, length = self._position, hidden.shape[1]
        if self._mask is None:  # one byte per position: small next to the cache it indexes
            self._mask = torch.ones(
                self.batch_size, self.max_length, dtype=torch.uint8, device=hidden.device
            )
        end = position + length
        self._mask[:, position:end] = 1 if new_mask is None else new_mask
        full = self._mask[:, :end].long()  # as transformers' generate passes it
        # transformers' generation: positions count the tokens before; padding gets 0
        positions = (full.cumsum(-1) - 1).masked_fill(full == 0, 0)[:, position:]
        try:
            output = self.span._run(hidden, cache, full, tuning=tuning, position_ids=positions)
        except BaseException:
            self._failed = True
            self.close()
            raise
        if new_mask is not None and self._first_pad is None:
            padded_columns = (new_mask == 0).any(0).nonzero()
            if len(padded_columns):
                self._first_pad = position + int(padded_columns[0])
        self._position = end
        return output

    def reorder(self, version: int, ids: Sequence[int]) -> None:
        """Beam search: row i of the cache (and of the padding) becomes row ``ids[i]``.

        ``version`` numbers the session's reorders from 1: one already applied (a step sent
        again) is skipped, one that skips a version is refused."""
        cache = self._live_cache()
        if version <= self._order_version:
            return
        self._check_reorder(version, ids)
        index = torch.tensor(ids, dtype=torch.long, device=self.span.device)
        with torch.inference_mode():
            if self.span._static:
                # In place: a static cache's buffers are where its CUDA graph reads them.
                for layer in cache.layers:
                    for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                        if isinstance(tensor, torch.Tensor):
                            tensor.copy_(tensor.index_select(0, index))
            else:
                cache.reorder_cache(index)  # transformers' own, for every kind of layer
            if self._mask is not None:
                self._mask.copy_(self._mask.index_select(0, index))
        self._order_version = version

    def _check_reorder(self, version: int, ids: Sequence[int]) -> None:
        if version <= self._order_version:
            return  # already applied: skipped
        if version != self._order_version + 1:
            raise SpanInputError(f"reorder {version} after {self._order_version}: one is missing")
        if len(ids) != self.batch_size or not all(0 <= i < self.batch_size for i in ids):
            raise SpanInputError(f"a reorder names one row in [0, {self.batch_size}) per row")

    def rollback(self, position: int) -> None:
        """Move back to ``position`` (forget later positions), e.g. after rejected draft tokens."""
        cache = self._live_cache()
        if not isinstance(position, int) or not 0 <= position <= self._position:
            raise SpanInputError(
                f"can only roll back to a position in [0, {self._position}], not {position!r}"
            )
        remove = self._position - position
        if remove == 0:
            return
        self._check_rollback()
        with torch.inference_mode():
            cache.crop(-remove)
        self._position = position
        if self._first_pad is not None and self._first_pad >= position:
            self._first_pad = None  # the padding was all after `position`

    def _check_rollback(self) -> None:
        for layer in self._live_cache().layers:
            if getattr(layer, "is_sliding", False) and layer.get_seq_length() >= (
                layer.get_max_length()
            ):
                raise SpanInputError(
                    f"cannot roll back: a sliding-window layer (window {layer.get_max_length()}) "
                    f"has already dropped positions before {self._position}"
                )

    @property
    def cache_bytes(self) -> int:
        """Bytes the cache holds now."""
        cache = self._live_cache()
        return sum(_tensor_bytes(layer) for layer in cache.layers)

    def close(self) -> None:
        """Free the cache (a static one may be kept for the next session). Idempotent."""
        cache, graph, self._cache, self._graph = self._cache, self._graph, None, None
        if cache is not None and not self._failed:
            self.span._keep_idle(cache, graph, self.batch_size, self._cache_length)

    def __enter__(self) -> SpanSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _padding(
    mask: bytes | torch.Tensor | None, batch: int, length: int, device: torch.device
) -> torch.Tensor | None:
    """A step's padding mask as a [batch, length] long tensor, or None when it has no padding;
    SpanInputError unless it has exactly one 0/1 value per new position."""
    if mask is None:
        return None
    if isinstance(mask, bytes | bytearray | memoryview):
        if len(mask) != batch * length:
            raise SpanInputError(
                f"the mask has {len(mask)} bytes, the step has {batch} x {length} positions"
            )
        mask = torch.frombuffer(bytearray(mask), dtype=torch.uint8).view(batch, length)
    elif not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, length):
        raise SpanInputError(f"the mask must have the step's shape ({batch}, {length})")
    elif mask.is_floating_point() or mask.is_complex():
        raise SpanInputError("the mask must hold integers or booleans (1 = token)")
    if bool(((mask != 0) & (mask != 1)).any()):
        raise SpanInputError("the mask must hold only 0 (padding) and 1 (token)")
    if bool(mask.all()):
        return None
    return mask.to(device=device, dtype=torch.long)
