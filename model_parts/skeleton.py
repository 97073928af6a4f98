"""Build the part of a Hugging Face decoder-only model that one peer runs, with transformers.

A block server runs layers [start, end) of a model; a client runs the embeddings and the head.
Both start from the same *skeleton*: the family's own ``*ForCausalLM`` class, built from the
model's full config with every parameter on the meta device (no memory, no initialisation) and
every buffer real (rotary frequencies and the like are computed exactly as transformers computes
them). Building all layers, then keeping some, means each kept layer was constructed with its real
index, so whatever a family decides per layer at construction time (layer types, dense or MoE)
is right. The kept part is then filled with tensors read from the checkpoint, nothing else.

Nothing here names a model family: the layer list is found from the model's own
``_no_split_modules``, per-layer config lists are recognised by name and length, and checkpoint
formats that the installed transformers converts on load (for example Mixtral's per-expert
tensors in transformers 5) go through transformers' own converter.

This module may not read whole checkpoints, download anything, or re-implement a model.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from model_parts.files import ModelFiles, ModelFilesError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

_META_LOCK = threading.Lock()


class UnsupportedModelError(ValueError):
    """The model cannot be split into independently runnable layers by this code."""


class ModelInputError(ValueError):
    """A tensor or argument given to a model part is malformed (shape, dtype, range...)."""


@dataclass(frozen=True)
class DeviceOptions:
    """Where and in what precision a model part runs. ``dtype="auto"``: as stored."""

    device: str = "cpu"
    dtype: str = "auto"


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device, refusing CUDA where there is none (a clear error, not a crash later)."""
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"invalid device {device!r}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def load_config(files: ModelFiles) -> PretrainedConfig:
    """The transformers config of the model directory (local files only)."""
    try:
        return AutoConfig.from_pretrained(files.directory, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelFilesError(f"cannot load the config of {files.directory}: {exc}") from None


def resolve_dtype(files: ModelFiles, dtype: str | torch.dtype) -> torch.dtype:
    """``"auto"`` means the stored dtype (config.json's); names map to torch dtypes."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype == "auto":
        stored = files.stored_dtype()
        return stored if stored in DTYPES.values() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers stay real.

    Parameters are moved as they are registered, so their (random) initialisation afterwards
    costs nothing. Process-wide while active, hence the lock: build models from one thread.
    """
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            moved = module._parameters[name]
            module._parameters[name] = type(moved)(
                moved.to("meta"), requires_grad=moved.requires_grad
            )

    with _META_LOCK:
        nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
        try:
            yield
        finally:
            nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_skeleton(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The family's causal-LM class for ``config``: parameters on meta, buffers real, eval mode.

    Built under ``dtype`` as the default dtype, as ``from_pretrained`` does, so that buffers match.
    """
    config = copy.deepcopy(config)
    try:
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as exc:
        raise UnsupportedModelError(f"transformers has no causal LM for it: {exc}") from exc
    return model.eval()


def find_layer_list(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """The dotted path (from ``model``) and the ModuleList of the model's decoder layers.

    The layer class is the one transformers itself keeps whole when it splits a model across
    devices (``_no_split_modules``); the list must have one entry per hidden layer.
    """
    num_layers = model.config.get_text_config().num_hidden_layers
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == num_layers
        and num_layers > 0
        and (not layer_classes or type(module[0]).__name__ in layer_classes)
    ]
    if len(candidates) != 1:
        found = ", ".join(name for name, _ in candidates) or "none"
        raise UnsupportedModelError(
            f"{type(model).__name__}: cannot identify the list of {num_layers} decoder layers "
            f"(candidates: {found})"
        )
    return candidates[0]


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` of ``root``."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def restrict_config(config: PretrainedConfig, start: int, end: int) -> None:
    """Make ``config`` (in place) describe layers [start, end) as layers [0, end - start).

    The model's forward, its caches and its masks read the config at run time with the span's
    local layer indices: ``num_hidden_layers`` becomes the span length and every per-layer list
    (``layer_types`` and the like: an attribute named ``*layer*`` with one entry per layer) is
    sliced. Heterogeneous configs (per-layer overrides) are refused.
    """
    if getattr(config, "is_heterogeneous", False):
        raise UnsupportedModelError("configs with per-layer overrides are not supported")
    total = config.num_hidden_layers
    for key, value in list(vars(config).items()):
        if "layer" in key and isinstance(value, list | tuple) and len(value) == total:
            setattr(config, key, type(value)(value[start:end]))
    config.num_hidden_layers = end - start


def renumber_layers(layers: nn.ModuleList, start: int) -> None:
    """Give the kept layers local indices 0..n-1 (their cache slots in the span's own cache)."""
    for local_index, layer in enumerate(layers):
        for module in layer.modules():
            if getattr(module, "layer_idx", None) == start + local_index:
                module.layer_idx = local_index


def checkpoint_key_map(files: ModelFiles, model: PreTrainedModel) -> dict[str, str]:
    """Checkpoint tensor name -> the name ``model`` (a causal LM) gives it.

    Checkpoints saved from a base model (old GPT-2) lack the ``transformer.`` prefix of the
    causal-LM class: such names get it where the model has a parameter of that name.
    """
    prefix = f"{model.base_model_prefix}."
    names = files.tensor_names
    if any(name.startswith(prefix) for name in names):
        return {name: name for name in names}
    own = {name for name, _ in model.named_parameters()}
    return {name: prefix + name if prefix + name in own else name for name in names}


def _float32_patterns(model: PreTrainedModel, dtype: torch.dtype) -> set[str]:
    """Module-name patterns transformers keeps in float32 when loading in ``dtype``."""
    strict = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    loose = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype == torch.float16:
        return strict | loose
    return strict if dtype == torch.bfloat16 else set()


def _transformers_weight_mapping(model: PreTrainedModel) -> tuple[list[Any], bool] | None:
    """transformers' checkpoint-conversion rules for ``model``, and whether any of them changes
    tensors rather than only names. None: the installed transformers has no such rules."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:
        return None
    rules = list(get_model_conversion_mapping(model))
    return rules, any(isinstance(rule, WeightConverter) for rule in rules)


def load_tensors(
    model: PreTrainedModel, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    """Put ``tensors`` into ``model``'s meta parameters, cast to ``dtype``, on the CPU.

    Names are the model's own (``model.state_dict()``), or a checkpoint format that the installed
    transformers converts on load (renamed or fused tensors): those go through its converter,
    as do all tensors of a model for which transformers defines a tensor conversion. Tensors the
    model has no place for are skipped there; callers check that no parameter stayed empty.
    """
    float32_patterns = _float32_patterns(model, dtype)
    conversion = _transformers_weight_mapping(model)
    own = dict(model.named_parameters())
    converts = conversion is not None and conversion[1]
    if converts or not all(name in own for name in tensors):
        if conversion is None:
            unknown = sorted(set(tensors) - own.keys())
            raise UnsupportedModelError(
                f"checkpoint tensors do not match the model and this transformers version has "
                f"no weight converter: {unknown[:5]}"
            )
        _load_with_transformers_conversion(model, tensors, dtype, conversion[0], float32_patterns)
        return
    for name, tensor in tensors.items():
        target = own[name]
        if tuple(target.shape) != tuple(tensor.shape):
            raise UnsupportedModelError(
                f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(target.shape)}"
            )
        keep_float32 = any(pattern in name for pattern in float32_patterns)
        cast = torch.float32 if keep_float32 else dtype
        value = tensor.to(cast) if tensor.is_floating_point() else tensor
        module_path, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_path)
        module._parameters[param_name] = nn.Parameter(value, requires_grad=False)


def _load_with_transformers_conversion(
    model: PreTrainedModel,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    mapping: list[Any],
    float32_patterns: set[str],
) -> None:
    """Checkpoint formats that differ from the module layout: let transformers convert them."""
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    load_config = LoadStateDictConfig(
        dtype=dtype,
        dtype_plan=dict.fromkeys(float32_patterns, torch.float32),
        device_map={"": "cpu"},
        weight_mapping=mapping,
    )
    info, _ = convert_and_load_state_dict_in_model(
        model=model, state_dict=dict(tensors), load_config=load_config
    )
    # Unexpected keys (stale buffers such as old rotary ``inv_freq``) are skipped, as
    # from_pretrained skips them; parameters left unfilled are the caller's check.
    problems = [
        *(f"mismatched {key}" for key in sorted(info.mismatched_keys)),
        *(f"conversion {key}: {error}" for key, error in info.conversion_errors.items()),
    ]
    if problems:
        raise UnsupportedModelError(f"cannot load checkpoint tensors: {'; '.join(problems[:5])}")
    for param in model.parameters():
        param.requires_grad_(False)


def position_limit(model: nn.Module, config: PretrainedConfig, layers_path: str = ""
                   ) -> int | None:
    """How many positions the family can run at all, or None for any number.

    A table of learned absolute positions (GPT-2's ``wpe``, OPT's ``embed_positions``) is an
    embedding of the base model besides the tokens' one, outside the layers, and its lookup
    fails past its last row; rotary and ALiBi positions are computed for any index. A block
    span's base forward looks positions up even though it replaces their sum, so servers and
    clients are both bound by the table (and by the config's limit: OPT's table holds an
    offset of 2 rows more).
    ``layers_path``: where ``model`` keeps its decoder layers, whose modules are not searched."""
    tokens = model.get_input_embeddings()
    rows = [
        module.num_embeddings
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding) and module is not tokens
        and not (layers_path and (name == layers_path or name.startswith(f"{layers_path}.")))
    ]
    if not rows:
        return None
    limit = min(rows)
    declared = getattr(config, "max_position_embeddings", None)
    return min(limit, declared) if isinstance(declared, int) and declared > 0 else limit


def meta_parameters(module: nn.Module) -> list[str]:
    """Names of parameters of ``module`` that hold no data yet."""
    return [name for name, param in module.named_parameters() if param.device.type == "meta"]
