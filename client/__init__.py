"""The client: route choice, inference sessions, generation.

`client.RemoteModel` (asyncio) and `client.DistributedModelForCausalLM` (transformers-style)
load on first use, so `import client` pulls in neither torch nor transformers.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "RemoteModel": "client.model",
    "ModelOptions": "client.model",
    "DistributedModelForCausalLM": "client.causal_lm",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
