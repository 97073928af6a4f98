"""A decoder block's memory footprint, read off the model's meta skeleton (no weights loaded).

Parameter counts come from transformers' own classes built on the meta device; the cache per
token from the config: keys and values of ``num_key_value_heads`` (else all attention heads) of
``head_dim`` (else hidden size / heads). That is exact for multi-head and grouped-query
attention and an estimate elsewhere (latent attention); the loaded span measures its real cache
cost afterwards, which is what the cache budget uses.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from blocks.memory import BlockFootprint, FitEstimate, blocks_that_fit
from model_parts.skeleton import build_skeleton, find_layer_list


def block_footprint(config: PretrainedConfig, dtype: torch.dtype, start: int = 0) -> BlockFootprint:
    """The largest footprint among the model's blocks from ``start`` on (layers may differ:
    dense and mixture-of-experts layers in one model)."""
    skeleton = build_skeleton(config, dtype)
    _, layers = find_layer_list(skeleton)
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    cache = 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    best: BlockFootprint | None = None
    for layer in list(layers)[start:]:
        linear = [m for m in layer.modules() if type(m) is nn.Linear]
        linear_ids = {id(m.weight) for m in linear}
        footprint = BlockFootprint(
            linear_weights=sum(m.weight.numel() for m in linear),
            linear_rows=sum(m.out_features for m in linear),
            other_params=sum(p.numel() for p in layer.parameters() if id(p) not in linear_ids),
            cache_bytes_per_token=cache,
        )
        total = footprint.linear_weights + footprint.other_params
        if best is None or total > best.linear_weights + best.other_params:
            best = footprint
    assert best is not None
    return best


def free_device_bytes(device: torch.device) -> int:
    """Free memory where the span would go: CUDA's free bytes, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("cannot read the available memory from /proc/meminfo")


def choose_num_blocks(
    config: PretrainedConfig,
    device: torch.device,
    dtype: torch.dtype,
    quant: str,
    cache_tokens: int,
    start: int = 0,
) -> FitEstimate:
    """``--num-blocks auto``: how many blocks from ``start`` fit on ``device`` now."""
    text = config.get_text_config()
    total = text.num_hidden_layers - start
    return blocks_that_fit(
        free_device_bytes(device),
        block_footprint(config, dtype, start),
        hidden_size=text.hidden_size,
        dtype_bytes=torch.empty((), dtype=dtype).element_size(),
        quant=quant,
        cache_tokens=cache_tokens,
        total_blocks=total,
    )
