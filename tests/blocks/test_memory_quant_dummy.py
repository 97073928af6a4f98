"""Memory estimates (--num-blocks auto), --quant int8|nf4 and --load-format dummy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from blocks.fast_decode import DecodeOptions
from blocks.footprint import block_footprint
from blocks.memory import (
    GIB,
    BlockFootprint,
    MemoryEstimateError,
    autograd_reserve,
    blocks_that_fit,
    weight_bytes,
)
from blocks.quantization import QuantizationError, quantize_linears
from blocks.span import BlockSpan
from client.local_head import LocalHead
from model_parts.dummy import DummyModelFiles, fill_with_dummy_weights, open_model_files
from model_parts.files import ModelFilesError
from tests.model_factory import NUM_LAYERS, save_model, tiny_config

BLOCK = BlockFootprint(linear_weights=1000, linear_rows=10, other_params=20,
                       cache_bytes_per_token=8)


def test_weight_bytes_per_quantization() -> None:
    assert weight_bytes(BLOCK, 2) == 2 * 1020
    assert weight_bytes(BLOCK, 2, "int8") == 1000 + 10 * 4 + 40
    assert weight_bytes(BLOCK, 2, "nf4") == 516 + 40  # 4.127 bits per weight, rounded up
    with pytest.raises(ValueError, match="unknown quantization"):
        weight_bytes(BLOCK, 2, "int3")


def test_blocks_that_fit_counts_weights_cache_and_reserve() -> None:
    reserve = autograd_reserve(14336)
    assert reserve == 2 * GIB
    per_block = weight_bytes(BLOCK, 2) + 8 * 100
    fit = blocks_that_fit(reserve + 7 * per_block + 5, BLOCK, hidden_size=14336, dtype_bytes=2,
                          cache_tokens=100, total_blocks=32)
    assert fit.num_blocks == 7
    capped = blocks_that_fit(reserve + 99 * per_block, BLOCK, hidden_size=14336, dtype_bytes=2,
                             cache_tokens=100, total_blocks=32)
    assert capped.num_blocks == 32
    with pytest.raises(MemoryEstimateError, match="not even one block fits"):
        blocks_that_fit(reserve, BLOCK, hidden_size=14336, dtype_bytes=2, cache_tokens=100,
                        total_blocks=32)


def test_footprint_matches_a_loaded_span(tmp_path: Path) -> None:
    directory = save_model("llama", tmp_path / "llama")
    span = BlockSpan.load(directory, 0, 1)
    footprint = block_footprint(tiny_config("llama"), torch.float32)
    loaded = sum(p.numel() * p.element_size() for p in span._loaded.layers[0].parameters())
    assert weight_bytes(footprint, 4) == loaded
    assert footprint.cache_bytes_per_token == span.cache_bytes_per_token


@pytest.mark.parametrize(("quant", "bound"), [("int8", 0.1), ("nf4", 0.5)])
def test_quantized_spans_run_close_to_full_precision(tmp_path: Path, quant: str,
                                                     bound: float) -> None:
    pytest.importorskip("bitsandbytes")
    directory = save_model("llama", tmp_path / "llama")
    full = BlockSpan.load(directory, 0, NUM_LAYERS)
    try:
        quantized = BlockSpan.load(directory, 0, NUM_LAYERS, quant=quant)
    except QuantizationError as exc:  # this bitsandbytes cannot do it on the CPU: said clearly
        assert "cannot run" in str(exc)
        pytest.skip(str(exc))
    assert quantized.quant == quant and quantized.dtype == torch.float32
    hidden = torch.randn(2, 6, full.hidden_size, generator=torch.Generator().manual_seed(0))
    want, got = full.forward(hidden), quantized.forward(hidden)
    assert float((got - want).norm() / want.norm()) < bound
    weights = [m for m in quantized._loaded.layers.modules() if type(m) is torch.nn.Linear]
    assert not weights  # every linear layer was replaced
    # The fast path is checked against the (quantized) plain path like any other.
    plain = BlockSpan.load(directory, 0, NUM_LAYERS, quant=quant,
                           decode=DecodeOptions(direct_layers=False, static_cache=False))
    with quantized.new_session(1, 12) as a, plain.new_session(1, 12) as b:
        a.step(hidden[:1, :4]), b.step(hidden[:1, :4])
        for index in range(4, 6):
            step = hidden[:1, index : index + 1]
            assert torch.allclose(a.step(step), b.step(step), atol=1e-5)


def test_unknown_quantization_is_refused() -> None:
    with pytest.raises(QuantizationError, match="unknown quantization"):
        quantize_linears(torch.nn.Sequential(torch.nn.Linear(4, 4)), "int3",
                         torch.device("cpu"), torch.float32)


def test_dummy_weights_from_config_alone_match_a_local_reference(tmp_path: Path) -> None:
    directory = tmp_path / "dummy-llama"
    directory.mkdir()
    config = tiny_config("llama")
    config.initializer_range = 0.15  # spread enough for well-separated greedy choices
    config.save_pretrained(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json"]
    files = open_model_files(directory, "dummy")
    assert isinstance(files, DummyModelFiles)
    head = LocalHead.load(files)
    spans = [BlockSpan.load(files, 0, 2), BlockSpan.load(files, 2, NUM_LAYERS)]
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    fill_with_dummy_weights(reference)
    ids = torch.tensor([[1, 5, 9, 33]])
    hidden = head.embed(ids)
    for span in spans:
        hidden = span.forward(hidden)
    with torch.no_grad():
        want = reference(ids).logits
    assert float((head.logits(hidden) - want).abs().max()) < 1e-4
    with pytest.raises(ModelFilesError, match=r"no config\.json"):
        DummyModelFiles(tmp_path)
    with pytest.raises(ValueError, match="unknown load format"):
        open_model_files(directory, "pickle")
    assert json.loads((directory / "config.json").read_text())["model_type"] == "llama"
