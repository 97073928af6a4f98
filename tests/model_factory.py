"""Small random-weight decoder-only models of each supported family, for tests.

Every test that needs a real model (span loading, the local head, servers, the demo's checks) builds
it here from a config, with fixed seeds, and saves it in the standard Hugging Face layout:
``config.json`` plus ``model.safetensors``, or shards with ``model.safetensors.index.json``.

Weights are drawn with a larger spread than transformers' default initialisation (0.02), so that
logits are well separated and a greedy argmax does not hinge on float rounding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    DeepseekV3Config,
    FalconConfig,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

VOCAB_SIZE = 128
HIDDEN_SIZE = 64
NUM_LAYERS = 4
NUM_HEADS = 4
MAX_POSITIONS = 256
# Spread of the random weights: large enough for distinct logits, small enough to stay finite.
INIT_STD = 0.15

_COMMON = {"vocab_size": VOCAB_SIZE, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _llama_like(**extra: object) -> dict[str, object]:
    return {
        **_COMMON,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": 2 * HIDDEN_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_HEADS // 2,
        "max_position_embeddings": MAX_POSITIONS,
        **extra,
    }


def _configs() -> dict[str, PretrainedConfig]:
    return {
        "llama": LlamaConfig(**_llama_like(tie_word_embeddings=False)),
        # A short sliding window, so that 64 generated tokens run past it.
        "mistral": MistralConfig(**_llama_like(sliding_window=24, tie_word_embeddings=False)),
        "qwen2": Qwen2Config(**_llama_like(tie_word_embeddings=True)),
        "mixtral": MixtralConfig(
            **_llama_like(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
        ),
        "bloom": BloomConfig(
            **_COMMON, hidden_size=HIDDEN_SIZE, n_layer=NUM_LAYERS, n_head=NUM_HEADS
        ),
        "falcon": FalconConfig(
            **_COMMON,
            hidden_size=HIDDEN_SIZE,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            max_position_embeddings=MAX_POSITIONS,
        ),
        "falcon-alibi": FalconConfig(
            **_COMMON,
            hidden_size=HIDDEN_SIZE,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            alibi=True,
            multi_query=False,
            max_position_embeddings=MAX_POSITIONS,
        ),
        "gpt2": GPT2Config(
            **_COMMON,
            n_embd=HIDDEN_SIZE,
            n_layer=NUM_LAYERS,
            n_head=NUM_HEADS,
            n_positions=MAX_POSITIONS,
        ),
        # Beyond the required six: alternating sliding/global layers with logit soft-capping...
        "gemma2": Gemma2Config(**_llama_like(head_dim=HIDDEN_SIZE // NUM_HEADS, sliding_window=8)),
        # ...dense and MoE layers chosen by layer index, latent (MLA) attention...
        "deepseek_v3": DeepseekV3Config(
            **_llama_like(
                num_key_value_heads=NUM_HEADS,
                moe_intermediate_size=HIDDEN_SIZE // 2,
                n_routed_experts=4,
                num_experts_per_tok=2,
                n_group=1,
                topk_group=1,
                first_k_dense_replace=1,
                q_lora_rank=16,
                kv_lora_rank=16,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=16,
                tie_word_embeddings=False,
            )
        ),
        # ...and layers nested one level down, with embeddings projected to the hidden size.
        "opt": OPTConfig(
            **_COMMON,
            hidden_size=HIDDEN_SIZE,
            ffn_dim=2 * HIDDEN_SIZE,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            word_embed_proj_dim=HIDDEN_SIZE // 2,
            max_position_embeddings=MAX_POSITIONS,
        ),
    }


FAMILIES: tuple[str, ...] = tuple(_configs())


def tiny_config(family: str, num_layers: int = NUM_LAYERS) -> PretrainedConfig:
    """A fresh config of ``family`` (a key of ``FAMILIES``), with ``num_layers`` blocks."""
    configs = _configs()
    if family not in configs:
        raise KeyError(f"unknown test family {family!r}; known: {', '.join(configs)}")
    config = configs[family]
    if num_layers != NUM_LAYERS:
        config.num_hidden_layers = num_layers  # every family maps this name to its own
    return config


def build_model(family: str, seed: int = 0, num_layers: int = NUM_LAYERS) -> PreTrainedModel:
    """A float32 causal LM of ``family`` with seeded random weights, in eval mode."""
    config = tiny_config(family, num_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, INIT_STD, generator=generator)
            elif "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                # Norm scales around 1 (Gemma-style norms store scale - 1; unused here).
                param.normal_(1.0, 0.1, generator=generator)
            else:
                param.normal_(0.0, 0.05, generator=generator)
    model.tie_weights()
    return model.eval()


def save_model(
    family: str, directory: Path, seed: int = 0, max_shard_size: str | None = None,
    num_layers: int = NUM_LAYERS,
) -> Path:
    """Build and save a model of ``family`` to ``directory`` (created); returns the directory.

    ``max_shard_size`` (e.g. ``"100KB"``) splits the weights into shards with an index.
    """
    model = build_model(family, seed, num_layers)
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return directory
