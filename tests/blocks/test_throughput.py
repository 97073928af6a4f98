"""The announced throughput: one block measured, the figure cached on disk, and overrides."""

from __future__ import annotations

import json

import pytest
import torch

from blocks.span import BlockSpan
from blocks.throughput import (
    CACHE_ENV,
    ComputeRates,
    cache_key,
    cached_rates,
    default_cache_path,
    measure,
    network_rps,
)
from tests.model_factory import save_model


@pytest.fixture(scope="module")
def span(tmp_path_factory):
    return BlockSpan.load(save_model("llama", tmp_path_factory.mktemp("llama")), 1, 3)


def test_measuring_one_block_gives_positive_rates(span):
    rates = measure(span, repeats=2)
    assert rates.inference_rps > 0 and rates.forward_rps > 0
    # a forward pass of 128 tokens moves more tokens per second than single-token steps
    assert rates.forward_rps > rates.inference_rps


def test_the_announced_figure_is_per_block_capped_by_the_network_or_overridden():
    rates = ComputeRates(inference_rps=50.0, forward_rps=800.0, network_rps=150.0)
    assert rates.throughput(4) == 150.0  # 800 / 4 = 200, capped at 150
    assert rates.throughput(8) == 100.0
    assert ComputeRates(None, None, 150.0, override=7.5).throughput(8) == 7.5
    with pytest.raises(ValueError):
        ComputeRates(None, None).throughput(4)
    # 100 Mbit/s of 16-bit hidden states of size 8192: 763 tokens/s
    assert round(network_rps(8192)) == 763


def test_the_cache_measures_once_then_reuses_and_eval_measures_again(tmp_path):
    path = tmp_path / "sub" / "throughput.json"
    calls = []

    def fake_measure():
        calls.append(1)
        return ComputeRates(inference_rps=10.0 * len(calls), forward_rps=100.0 * len(calls))

    rates, measured = cached_rates("m|cpu|float32", fake_measure, path=path)
    assert measured and rates.forward_rps == 100.0
    rates, measured = cached_rates("m|cpu|float32", fake_measure, path=path)
    assert not measured and rates.forward_rps == 100.0 and len(calls) == 1
    rates, measured = cached_rates("m|cpu|bfloat16", fake_measure, path=path)  # another key
    assert measured and len(calls) == 2
    rates, measured = cached_rates("m|cpu|float32", fake_measure, force=True, path=path)
    assert measured and rates.forward_rps == 300.0
    stored = json.loads(path.read_text())
    assert set(stored) == {"m|cpu|float32", "m|cpu|bfloat16"}
    assert stored["m|cpu|float32"]["forward_rps"] == 300.0
    assert [p.name for p in path.parent.iterdir() if p.suffix == ".tmp"] == []  # atomic


def test_a_broken_cache_is_measured_over_not_fatal(tmp_path):
    path = tmp_path / "throughput.json"
    path.write_text("{not json")
    rates, measured = cached_rates("k", lambda: ComputeRates(1.0, 2.0), path=path)
    assert measured and json.loads(path.read_text())["k"]["forward_rps"] == 2.0
    path.write_text(json.dumps({"k": {"version": 1, "inference_rps": -1, "forward_rps": 2}}))
    assert cached_rates("k", lambda: ComputeRates(3.0, 4.0), path=path)[0].forward_rps == 4.0


def test_the_cache_key_names_model_device_dtype_quant_and_threads(monkeypatch, tmp_path):
    key = cache_key("tiny-llama-1234", torch.device("cpu"), torch.bfloat16, "none")
    model, device, dtype, quant, threads = key.split("|")
    assert (model, dtype, quant) == ("tiny-llama-1234", "bfloat16", "none")
    assert device and threads == f"threads={torch.get_num_threads()}"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere.json"))
    assert default_cache_path() == tmp_path / "elsewhere.json"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "overlay-node" / "throughput.json"
