"""The LoRA formats shared by clients and servers: PEFT's file layout and tensor names, and
the content digest of LoRA tensors as they travel (`lora_digest`).

Torch only (tensor bytes); no server runtime, so the client may import it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence

import msgpack
import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's saved names: base_model.model.<path of the decoder layers>.<i>.<module>.lora_A.weight
PEFT_KEY = re.compile(r"base_model\.model\.(?P<layers>.+?)\.(?P<index>\d+)\.(?P<module>.+)"
                      r"\.lora_(?P<ab>[AB])\.weight")



def lora_digest(start: int, end: int, rank: int, alpha: float, rslora: bool,
                modules: Iterable[str],
                tensors: Iterable[tuple[str, tuple[int, ...], bytes | memoryview]]) -> str:
    """SHA-256 naming an uploaded LoRA: its layout and every tensor's dtype, shape and bytes
    (in the order of LoraPutRequest). Client and server compute it alike, so the server can
    check an upload is what its name says before other requests refer to it."""
    h = hashlib.sha256(msgpack.packb(
        ["lora/1", start, end, rank, float(alpha), rslora, list(modules)]))
    for dtype, shape, data in tensors:
        h.update(msgpack.packb([dtype, list(shape)]))
        h.update(data)
    return h.hexdigest()

def peft_key(layers_path: str, block: int, module: str, which: str) -> str:
    return f"base_model.model.{layers_path}.{block}.{module}.lora_{which}.weight"


def _wire_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().contiguous().cpu().view(torch.uint8).numpy()).cast("B")


def tensors_digest(start: int, end: int, rank: int, alpha: float, rslora: bool,
                   modules: Sequence[str], tensors: Iterable[torch.Tensor]) -> str:
    """The content digest of LoRA tensors in wire order (blocks, then modules; A then B)."""
    return lora_digest(start, end, rank, alpha, rslora, modules,
                       ((str(t.dtype).removeprefix("torch."), tuple(t.shape), _wire_bytes(t))
                        for t in tensors))
