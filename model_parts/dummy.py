"""``--load-format dummy`` (vLLM's name): random weights built from ``config.json`` alone.

For benchmarks on shapes whose checkpoints would not fit on disk (a 70B model in bf16 is 140 GB):
a directory holding only a ``config.json`` stands for the whole model. ``DummyModelFiles`` answers
like ``ModelFiles`` (tensor names, dtype, ``read``), but its tensor names are the causal-LM
skeleton's own parameters and ``read`` generates each tensor where it is needed, in the dtype it
is needed, so a 70B span never passes through host memory.

Values are a function of the tensor's name, shape, dtype and device type only (a generator seeded
from the name), so a server, a client and a local reference built by ``dummy_tensor`` hold the
very same weights. Matrices are normal with the config's ``initializer_range`` (transformers'
initialisation spread); 1-D norm scales are ones and other vectors (biases) zeros, so activations
stay finite through many layers.

This module may not download anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from model_parts.files import ModelFiles, ModelFilesError, config_dtype, read_raw_config
from model_parts.skeleton import build_skeleton, load_config

LOAD_FORMATS = ("auto", "safetensors", "dummy")
# transformers' PretrainedConfig default for initializer_range.
DEFAULT_INIT_STD = 0.02
_NORM_MARKERS = ("norm", "ln_", "ln.")


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1


def dummy_tensor(
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    std: float = DEFAULT_INIT_STD,
) -> torch.Tensor:
    """The dummy value of tensor ``name``: the same wherever it is generated on one device type."""
    device = torch.device(device)
    if len(shape) <= 1:
        fill = 1.0 if any(marker in name for marker in _NORM_MARKERS) else 0.0
        return torch.full(shape, fill, dtype=dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(_seed(name))
    values = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    return values.mul_(std)


def fill_with_dummy_weights(model: torch.nn.Module, std: float | None = None) -> None:
    """Give every parameter of a (materialised) model its dummy value, in place: the local
    reference a benchmark compares against."""
    std = std if std is not None else getattr(model.config, "initializer_range", DEFAULT_INIT_STD)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(dummy_tensor(name, tuple(param.shape), param.dtype, param.device, std))


class DummyModelFiles:
    """A model directory with only a config.json, read as if it had every tensor (see above)."""

    generates_weights = True

    def __init__(self, model_dir: str | Path) -> None:
        self.directory = Path(model_dir)
        self.raw_config: dict[str, Any] = read_raw_config(self.directory)
        config = load_config(self)  # type: ignore[arg-type]
        self._std = float(getattr(config, "initializer_range", DEFAULT_INIT_STD))
        skeleton = build_skeleton(config, torch.float32)
        self._shapes = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}

    @property
    def tensor_names(self) -> list[str]:
        return sorted(self._shapes)

    def names_with_prefix(self, prefix: str) -> list[str]:
        return sorted(name for name in self._shapes if name.startswith(prefix))

    def stored_dtype(self) -> torch.dtype:
        return config_dtype(self.raw_config) or torch.float32

    def read_options(self, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """Generate where and as what the caller needs the tensors (no host copy)."""
        return {"device": device, "dtype": dtype}

    def read(
        self,
        names: Iterable[str],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> dict[str, torch.Tensor]:
        dtype = dtype or self.stored_dtype()
        tensors = {}
        for name in names:
            if name not in self._shapes:
                raise ModelFilesError(f"tensor {name!r} is not part of this model")
            tensors[name] = dummy_tensor(name, self._shapes[name], dtype, device, self._std)
        return tensors

    def read_prefix(self, prefix: str, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self.read(self.names_with_prefix(prefix), **kwargs)


def open_model_files(model_dir: str | Path, load_format: str = "auto") -> Any:
    """``ModelFiles`` for a checkpoint, ``DummyModelFiles`` for ``load_format="dummy"``."""
    if load_format not in LOAD_FORMATS:
        known = ", ".join(LOAD_FORMATS)
        raise ValueError(f"unknown load format {load_format!r}; use one of {known}")
    if load_format == "dummy":
        return DummyModelFiles(model_dir)
    return ModelFiles(model_dir)
