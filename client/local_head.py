"""The client's own part of the model: embeddings in, final norm and LM head out.

``LocalHead`` holds what a Hugging Face causal LM does before its first decoder layer and after
its last: the token embeddings plus whatever the family applies to them (BLOOM's embedding
layer norm, GPT-2's position embeddings, Gemma's scaling...), and the final norm, LM head and
any logit post-processing. It reads only those tensors from the model directory.

It does not re-implement any of that: it runs the family's own causal-LM ``forward`` on a model
whose decoder layers are replaced by one stand-in layer. To embed, the stand-in stops the forward
at its input and returns what it was given; to produce logits, the stand-in passes the caller's
hidden states on as if it were the last layer.

That forward also builds attention masks and rotary tables the head never needs, a fixed cost of
a few hundred microseconds per call, paid on every generated token. So at load time the head
records which of the family's modules the forward applied in a row to the tokens (embeddings,
BLOOM's norm...) and to the hidden states (final norm, LM head), and calls those modules directly
where that gives bit-identical results on probe inputs; otherwise (position embeddings, logit
soft-capping done inline...) it keeps using the whole forward.

This module may not run decoder layers, and never touches the network.
"""

from __future__ import annotations

import inspect
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from client.head_graph import GreedyHeadGraphs
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
    resolve_device,
    resolve_dtype,
    restrict_config,
    set_submodule,
)


class _Stop(Exception):
    """Raised by the stand-in layer to end a forward pass once it has seen its input."""


class _LayerOutput(torch.Tensor):
    """Hidden states that also read as a 1-tuple of themselves.

    Families differ in what a decoder layer returns: the hidden states (Llama in transformers 5)
    or a tuple starting with them (BLOOM, Falcon). Indexing with ``0`` gives the plain tensor;
    everything else is an ordinary tensor whose results are plain tensors.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, int) and index == 0:
            return self.as_subclass(torch.Tensor)
        return torch.Tensor.__getitem__(self.as_subclass(torch.Tensor), index)


class _StandInLayer(nn.Module):
    """Takes the place of the decoder layers: captures its input or emits given hidden states."""

    def __init__(self, first_layer: nn.Module) -> None:
        super().__init__()
        # Plain attributes some forwards read from layers (e.g. ``attention_type``).
        for key, value in vars(first_layer).items():
            plain = isinstance(value, int | float | str | bool)
            if plain and not key.startswith("_") and key != "training":
                setattr(self, key, value)
        self.emit: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.emit is None:
            raise _Stop(hidden_states)
        return self.emit.as_subclass(_LayerOutput)


class LocalHead:
    """Embeddings and LM head of a model, run with the family's own transformers code.

    Build with :meth:`load`. Thread-safe: one computation at a time.
    """

    def __init__(self, causal_lm: nn.Module, stand_in: _StandInLayer) -> None:
        self._model = causal_lm
        self._stand_in = stand_in
        self._lock = threading.Lock()
        config = causal_lm.config.get_text_config()
        self.hidden_size: int = config.hidden_size
        self.vocab_size: int = config.vocab_size
        embeddings = causal_lm.get_input_embeddings()
        self._embedding_dim: int = embeddings.weight.shape[1]
        self.dtype: torch.dtype = embeddings.weight.dtype
        self.device: torch.device = embeddings.weight.device
        base_forward = inspect.signature(causal_lm.base_model.forward).parameters
        self._takes_position_ids = "position_ids" in base_forward
        # positions past a learned table of them (GPT-2, OPT) exist nowhere: None for any
        self.position_limit = position_limit(causal_lm.base_model, causal_lm.config)
        self._embed_chain: list[nn.Module] | None = None
        self._logits_chain: list[nn.Module] | None = None
        with torch.inference_mode():
            self._find_direct_paths()
        self._greedy_graphs: GreedyHeadGraphs | None = None
        if self.device.type == "cuda" and self._logits_chain is not None:
            chain = self._logits_chain
            self._greedy_graphs = GreedyHeadGraphs(
                lambda hidden: _run_chain(chain, hidden), self.device, self.dtype
            )

    @classmethod
    def load(
        cls, model: ModelFiles | str | Path, options: DeviceOptions | None = None
    ) -> LocalHead:
        """Read the embedding, final-norm and head tensors (only those) and build the head."""
        options = options or DeviceOptions()
        files = ModelFiles(model) if isinstance(model, str | Path) else model
        config = load_config(files)
        device = resolve_device(options.device)
        dtype = resolve_dtype(files, options.dtype)

        causal_lm = build_skeleton(config, dtype)
        path, all_layers = find_layer_list(causal_lm)
        key_map = checkpoint_key_map(files, causal_lm)
        stand_in = _StandInLayer(all_layers[0])
        set_submodule(causal_lm, path, nn.ModuleList([stand_in]))
        restrict_config(causal_lm.config, 0, 1)

        names = {
            name: model_name
            for name, model_name in key_map.items()
            if not model_name.startswith(f"{path}.")
        }
        tensors = files.read(sorted(names), **files.read_options(device, dtype))
        load_tensors(causal_lm, {names[name]: tensor for name, tensor in tensors.items()}, dtype)
        if meta_parameters(causal_lm):
            causal_lm.tie_weights()
        missing = meta_parameters(causal_lm)
        if missing:
            raise UnsupportedModelError(f"the checkpoint lacks head tensors: {missing[:5]}")
        causal_lm.to(device)
        return cls(causal_lm, stand_in)

    def embed(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | int | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states entering the first block for ``input_ids`` [batch, length].

        ``position_ids``: an int is the first position (a session's position, for new tokens
        after a prefix); a tensor gives [batch, length] ids; None leaves positions to the family,
        as for a full sequence (from 0, or counted from ``attention_mask`` as OPT does).
        ``attention_mask``: [batch, length], 1 for tokens and 0 for padding, of a full sequence.
        Only families with learned position embeddings (GPT-2, OPT) use positions here.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.numel() == 0:
            raise ModelInputError("input ids must be a non-empty [batch, length] tensor")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ModelInputError(f"input ids must be integers, not {input_ids.dtype}")
        # One read-back for both bounds (each is a wait for the device when ids live on a GPU).
        low, high = torch.stack((input_ids.min(), input_ids.max())).tolist()
        if low < 0 or high >= self.vocab_size:
            raise ModelInputError(f"input ids must lie in [0, {self.vocab_size})")
        if attention_mask is not None and (
            not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape
        ):
            raise ModelInputError("attention mask must have the shape of the input ids")
        if not isinstance(position_ids, int | None) and (
            not isinstance(position_ids, torch.Tensor) or position_ids.shape != input_ids.shape
        ):
            raise ModelInputError("position ids must have the shape of the input ids")
        input_ids = input_ids.to(self.device)
        if self._embed_chain is not None:  # checked at load to ignore positions and masks
            with self._lock, torch.inference_mode():
                return _run_chain(self._embed_chain, input_ids)
        kwargs: dict[str, Any] = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(self.device)
        if isinstance(position_ids, int):
            length = input_ids.shape[1]
            positions = torch.arange(position_ids, position_ids + length, device=self.device)
            position_ids = positions.unsqueeze(0).expand(input_ids.shape[0], -1)
        if position_ids is not None and self._takes_position_ids:
            kwargs["position_ids"] = position_ids.to(self.device)
        with self._lock, torch.inference_mode():
            return self._embed_by_forward(input_ids, kwargs)

    @property
    def input_embeddings(self) -> nn.Module | None:
        """The family's embedding module when it alone maps ids to the first block's input
        (Llama, Mistral, Falcon, Gemma...), else None (BLOOM's norm, GPT-2's positions)."""
        embeddings = self._model.get_input_embeddings()
        return embeddings if self._embed_chain == [embeddings] else None

    @property
    def output_embeddings(self) -> nn.Module | None:
        """The family's LM head module (it runs after the final norm)."""
        return self._model.get_output_embeddings()

    def _embed_by_forward(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        self._stand_in.emit = None
        try:
            self._model.base_model(input_ids=input_ids, use_cache=False, **kwargs)
        except _Stop as stop:
            return stop.args[0]
        raise UnsupportedModelError("the model's forward never reached its decoder layers")

    def logits(self, hidden_states: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """Logits [batch, length, vocab] for hidden states leaving the last block; with `grad`,
        under autograd (fine-tuning: gradients flow back to the hidden states)."""
        self._check_hidden(hidden_states)
        hidden = hidden_states.to(self.device)
        with self._lock, torch.inference_mode(not grad):
            return self._logits_of(hidden)

    def greedy_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The most likely next token of each sequence, [batch] int64 on the CPU, for hidden
        states leaving the last block [batch, length, hidden] (the last position's).

        The argmax runs where the head is and only the ids come back. On a GPU the final norm,
        LM head and argmax replay as one CUDA graph per batch size (client/head_graph.py; equal
        to the eager run, checked at capture), where the family's logits are a chain of modules.
        """
        self._check_hidden(hidden_states)
        last = hidden_states[:, -1:]
        with self._lock, torch.inference_mode():
            if self._greedy_graphs is not None:
                ids = self._greedy_graphs.tokens(last)
                if ids is not None:
                    return ids
            logits = self._logits_of(last.to(self.device))
            return logits[:, -1].argmax(-1).cpu()

    def _check_hidden(self, hidden_states: torch.Tensor) -> None:
        if (
            not isinstance(hidden_states, torch.Tensor)
            or hidden_states.ndim != 3
            or hidden_states.shape[-1] != self.hidden_size
            or hidden_states.shape[0] < 1
            or hidden_states.shape[1] < 1
        ):
            raise ModelInputError(f"hidden states must be [batch, length, {self.hidden_size}]")
        if hidden_states.dtype != self.dtype:
            raise ModelInputError(f"hidden states are {hidden_states.dtype}, head is {self.dtype}")

    def _logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._logits_chain is not None:
            return _run_chain(self._logits_chain, hidden)
        return self._logits_by_forward(hidden)

    def _logits_by_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # What goes in as "embeddings" is ignored; only its shape must suit the model.
        batch, length, _ = hidden.shape
        stand_in = (
            hidden
            if self._embedding_dim == self.hidden_size
            else hidden.new_zeros(batch, length, self._embedding_dim)
        )
        self._stand_in.emit = hidden
        try:
            output = self._model(inputs_embeds=stand_in, use_cache=False)
        finally:
            self._stand_in.emit = None
        return output.logits.as_subclass(torch.Tensor)

    # ------------------------------------------------------------- direct paths
    def _find_direct_paths(self) -> None:
        """Find module chains that reproduce the forward exactly, checked on probe inputs."""
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.vocab_size, (2, 5), generator=generator).to(self.device)
        calls = _record_calls(self._model, lambda: self._embed_by_forward(ids, {}))
        chain = _chain_from(ids, calls)
        probes = [(ids, {})]
        if self._takes_position_ids:
            later = torch.arange(7, 12, device=self.device).expand(2, -1)
            probes.append((ids, {"position_ids": later}))
        padding = torch.ones_like(ids)
        padding[0, :2] = 0
        probes.append((ids, {"attention_mask": padding}))
        if chain and all(
            torch.equal(_run_chain(chain, probe), self._embed_by_forward(probe, kwargs))
            for probe, kwargs in probes
        ):
            self._embed_chain = chain

        def random_hidden(batch: int, length: int) -> torch.Tensor:
            probe = torch.randn(batch, length, self.hidden_size, generator=generator)
            return probe.to(self.device, self.dtype)

        hidden = random_hidden(2, 3)
        calls = _record_calls(self._model, lambda: self._logits_by_forward(hidden))
        emitted = [i for i, (module, _, _) in enumerate(calls) if module is self._stand_in]
        if len(emitted) != 1:
            return
        after = calls[emitted[0] + 1 :]
        chain = _chain_from(calls[emitted[0]][2], after)
        if chain and all(
            torch.equal(_run_chain(chain, probe), self._logits_by_forward(probe))
            for probe in (hidden, random_hidden(1, 4))
        ):
            self._logits_chain = chain


_Call = tuple[nn.Module, tuple[Any, ...], Any]


def _record_calls(model: nn.Module, run: Any) -> list[_Call]:
    """Every module call (module, positional args, output) made while ``run()`` runs, in the
    order the calls finished."""
    calls: list[_Call] = []

    def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        calls.append((module, args, output))

    handles = [module.register_forward_hook(record) for module in model.modules()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _same_tensor(a: object, b: torch.Tensor) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.dtype == b.dtype
    )


def _chain_from(start: torch.Tensor, calls: list[_Call]) -> list[nn.Module]:
    """The modules that, one after the other, took the previous one's output (first: ``start``)
    as their first argument and returned a tensor."""
    chain: list[nn.Module] = []
    current = start
    for module, args, output in calls:
        if args and isinstance(output, torch.Tensor) and _same_tensor(args[0], current):
            chain.append(module)
            current = output
    return chain


def _run_chain(chain: list[nn.Module], value: torch.Tensor) -> torch.Tensor:
    for module in chain:
        value = module(value)
    return value.as_subclass(torch.Tensor)
