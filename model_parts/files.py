"""A local model directory in the standard Hugging Face layout, read tensor by tensor.

``config.json`` plus either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. A server reads only the tensors of its span and a client only
the embeddings and the head, so nothing here ever loads a whole checkpoint: callers name the
tensors (or a name prefix) they need, and each shard is opened with ``safe_open`` (memory-mapped)
only when one of its tensors is asked for.

Also the stable default model id: the directory's name plus a hash of its ``config.json``, so that
servers and clients holding different configs never mix in the DHT. The id is computed from the
raw JSON, never from transformers' parsed config, so that peers with different transformers
versions agree on it.

This module may not download anything, and does not import transformers.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# config.json keys that change when the same model is re-saved, not when the model changes.
_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "_commit_hash"})
MODEL_ID_HASH_CHARS = 8
# safetensors' header dtype codes of the floating types a model may be stored in.
_FLOAT_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


class ModelFilesError(ValueError):
    """The model directory is missing, incomplete or malformed."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFilesError(f"missing file {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFilesError(f"cannot read {path}: {exc}") from None


def _check_directory(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ModelFilesError(f"model directory {model_dir} does not exist or is not a directory")
    if not (model_dir / CONFIG_FILE).is_file():
        raise ModelFilesError(f"model directory {model_dir} has no {CONFIG_FILE}")


def read_raw_config(model_dir: Path) -> dict[str, Any]:
    """The directory's config.json as a dict, with a clear error for anything else."""
    _check_directory(model_dir)
    config = _read_json(model_dir / CONFIG_FILE)
    if not isinstance(config, dict):
        raise ModelFilesError(f"{model_dir / CONFIG_FILE} is not a JSON object")
    return config


def config_dtype(raw_config: dict[str, Any]) -> torch.dtype | None:
    """The weights' dtype that config.json names (``dtype``, or the older ``torch_dtype``)."""
    for key in ("dtype", "torch_dtype"):
        value = raw_config.get(key)
        if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
            return getattr(torch, value)
    return None


def default_model_id(model_dir: str | Path) -> str:
    """A stable id such as ``"tiny-llama-3f2a9c1e"``: directory name + hash of config.json.

    The name part is lower-cased with anything outside ``[a-z0-9-]`` replaced by ``-`` (no dots:
    DHT keys are ``"{model_id}.{block}"``). Keys that change on every re-save (the transformers
    version, the source path) are left out of the hash.
    """
    model_dir = Path(model_dir)
    config = read_raw_config(model_dir)
    stable = {key: value for key, value in config.items() if key not in _VOLATILE_CONFIG_KEYS}
    canonical = json.dumps(stable, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(canonical.encode("ascii")).hexdigest()[:MODEL_ID_HASH_CHARS]
    name = re.sub(r"[^a-z0-9-]+", "-", model_dir.resolve().name.lower()).strip("-") or "model"
    return f"{name}-{digest}"


class ModelFiles:
    """The weights and config of one model directory; tensors are read on demand.

    Opening is cheap: it reads ``config.json`` and the index (or the single file's header).
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.directory = Path(model_dir)
        self.raw_config: dict[str, Any] = read_raw_config(self.directory)
        self._weight_map = self._read_weight_map()

    def _read_weight_map(self) -> dict[str, str]:
        index_path = self.directory / INDEX_FILE
        if index_path.is_file():
            index = _read_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise ModelFilesError(f"{index_path} has no valid 'weight_map'")
            for shard in set(weight_map.values()):
                if Path(shard).name != shard:
                    raise ModelFilesError(f"{index_path} names a shard outside its folder: {shard}")
            return dict(weight_map)
        single = self.directory / SINGLE_FILE
        if not single.is_file():
            raise ModelFilesError(
                f"model directory {self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE}"
            )
        try:
            with safe_open(single, framework="pt") as handle:
                return dict.fromkeys(handle.keys(), SINGLE_FILE)
        except Exception as exc:  # safetensors raises its own error types
            raise ModelFilesError(f"cannot read {single}: {exc}") from None

    generates_weights = False  # model_parts/dummy.py's DummyModelFiles does

    def read_options(self, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """How a loader should call ``read``: on the CPU as stored (the loader casts, keeping
        what transformers keeps in float32, then moves)."""
        return {}

    @property
    def tensor_names(self) -> list[str]:
        """All tensor names in the checkpoint, sorted."""
        return sorted(self._weight_map)

    def names_with_prefix(self, prefix: str) -> list[str]:
        """Checkpoint tensor names that start with ``prefix``, sorted."""
        return sorted(name for name in self._weight_map if name.startswith(prefix))

    def stored_dtype(self) -> torch.dtype:
        """The dtype the weights are stored in: config.json's, else the first float tensor's.

        This is what ``dtype="auto"`` means. Only safetensors headers are read.
        """
        named = config_dtype(self.raw_config)
        if named is not None:
            return named
        for name in self.tensor_names:
            path = self.directory / self._weight_map[name]
            try:
                with safe_open(path, framework="pt") as handle:
                    code = handle.get_slice(name).get_dtype()
            except Exception as exc:  # safetensors raises its own error types
                raise ModelFilesError(f"cannot read {path}: {exc}") from None
            if code in _FLOAT_DTYPES:
                return _FLOAT_DTYPES[code]
        return torch.float32

    def read(
        self,
        names: Iterable[str],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> dict[str, torch.Tensor]:
        """Read exactly the tensors ``names``; floating ones are cast to ``dtype`` if given."""
        by_shard: dict[str, list[str]] = {}
        for name in names:
            shard = self._weight_map.get(name)
            if shard is None:
                raise ModelFilesError(f"tensor {name!r} is not in the checkpoint {self.directory}")
            by_shard.setdefault(shard, []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for shard, shard_names in sorted(by_shard.items()):
            path = self.directory / shard
            if not path.is_file():
                raise ModelFilesError(f"missing shard {path} (listed in {INDEX_FILE})")
            try:
                with safe_open(path, framework="pt", device="cpu") as handle:
                    present = set(handle.keys())
                    for name in shard_names:
                        if name not in present:
                            raise ModelFilesError(f"shard {path} lacks tensor {name!r}")
                        tensors[name] = handle.get_tensor(name)
            except ModelFilesError:
                raise
            except Exception as exc:  # safetensors raises its own error types
                raise ModelFilesError(f"cannot read {path}: {exc}") from None
        for name, tensor in tensors.items():
            cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            # Always a copy: a tensor from safe_open is a view of the memory-mapped file, and a
            # server must not depend on the checkpoint staying as it was (a file rewritten or
            # truncated under a mapping changes weights silently or kills it with SIGBUS).
            tensors[name] = tensor.to(device=device, dtype=cast, copy=True)
        return tensors

    def read_prefix(
        self,
        prefix: str,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> dict[str, torch.Tensor]:
        """Read every tensor whose name starts with ``prefix``."""
        return self.read(self.names_with_prefix(prefix), dtype=dtype, device=device)
