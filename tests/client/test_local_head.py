"""LocalHead: the family's own embedding and head code, reading only its tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from client.local_head import LocalHead
from model_parts.skeleton import DeviceOptions, ModelInputError
from tests.model_factory import FAMILIES, VOCAB_SIZE, save_model


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(request.param, tmp_path_factory.mktemp(request.param) / request.param)


def test_embed_and_logits_equal_the_local_model(family_dir: Path) -> None:
    reference = AutoModelForCausalLM.from_pretrained(family_dir, dtype=torch.float32).eval()
    head = LocalHead.load(family_dir)
    ids = torch.randint(3, VOCAB_SIZE, (3, 9), generator=torch.Generator().manual_seed(0))
    captured: list[object] = []
    last_layer = reference.base_model.get_submodule(_layers_path(reference))[-1]
    handle = last_layer.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        out = reference(ids, output_hidden_states=True)
    handle.remove()
    last = captured[0] if isinstance(captured[0], torch.Tensor) else captured[0][0]
    # Bit-identical: the same transformers code runs on the same tensors.
    assert torch.equal(head.embed(ids), out.hidden_states[0])
    assert torch.equal(head.logits(last), out.logits)


def test_embed_with_a_position_offset_equals_the_tail_of_a_full_embed(family_dir: Path) -> None:
    head = LocalHead.load(family_dir)
    ids = torch.randint(3, VOCAB_SIZE, (2, 10), generator=torch.Generator().manual_seed(1))
    full = head.embed(ids)
    assert torch.equal(head.embed(ids[:, 6:], 6), full[:, 6:])
    positions = torch.arange(6, 10).expand(2, -1)
    assert torch.equal(head.embed(ids[:, 6:], positions), full[:, 6:])


def _layers_path(model: torch.nn.Module) -> str:
    from model_parts.skeleton import find_layer_list

    path, _ = find_layer_list(model)
    return path.removeprefix(f"{model.base_model_prefix}.")


@pytest.fixture(scope="module")
def gpt2_head(tmp_path_factory: pytest.TempPathFactory) -> LocalHead:
    return LocalHead.load(save_model("gpt2", tmp_path_factory.mktemp("gpt2") / "gpt2"))


def test_learned_positions_matter_for_gpt2(gpt2_head: LocalHead) -> None:
    ids = torch.tensor([[5, 6, 7]])
    assert not torch.equal(gpt2_head.embed(ids, 0), gpt2_head.embed(ids, 3))


def test_bad_inputs_raise_clear_errors(gpt2_head: LocalHead) -> None:
    with pytest.raises(ModelInputError, match="in \\[0, 128\\)"):
        gpt2_head.embed(torch.tensor([[1, VOCAB_SIZE]]))
    with pytest.raises(ModelInputError, match="in \\[0, 128\\)"):
        gpt2_head.embed(torch.tensor([[-1]]))
    with pytest.raises(ModelInputError, match="integers"):
        gpt2_head.embed(torch.tensor([[1.0]]))
    with pytest.raises(ModelInputError, match="non-empty"):
        gpt2_head.embed(torch.tensor([1, 2]))
    with pytest.raises(ModelInputError, match="shape of the input ids"):
        gpt2_head.embed(torch.tensor([[1, 2]]), torch.tensor([[0]]))
    with pytest.raises(ModelInputError, match="batch, length"):
        gpt2_head.logits(torch.zeros(2, gpt2_head.hidden_size + 1))
    with pytest.raises(ModelInputError, match="float64"):
        gpt2_head.logits(torch.zeros(1, 2, gpt2_head.hidden_size, dtype=torch.float64))


def test_head_reads_no_layer_tensors(tmp_path: Path) -> None:
    directory = save_model("llama", tmp_path / "sharded", max_shard_size="20KB")
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {shard for name, shard in weight_map.items() if not name.startswith("model.layers.")}
    for shard in set(weight_map.values()) - needed:
        (directory / shard).unlink()
    head = LocalHead.load(directory, DeviceOptions(dtype="bfloat16"))
    assert head.dtype == torch.bfloat16
    logits = head.logits(head.embed(torch.tensor([[3, 4, 5]])))
    assert logits.shape == (1, 3, VOCAB_SIZE) and logits.dtype == torch.bfloat16


def test_direct_module_paths_equal_the_full_forward(family_dir: Path) -> None:
    """Where the head calls the family's modules directly, results equal the whole forward."""
    head = LocalHead.load(family_dir)
    ids = torch.randint(3, VOCAB_SIZE, (3, 7), generator=torch.Generator().manual_seed(2))
    hidden = torch.randn(3, 7, head.hidden_size, generator=torch.Generator().manual_seed(3))
    fast = head.embed(ids, 4), head.logits(hidden)
    head._embed_chain = head._logits_chain = None  # force the whole forward
    assert torch.equal(fast[0], head.embed(ids, 4))
    assert torch.equal(fast[1], head.logits(hidden))


def test_direct_paths_are_found_where_they_exist(tmp_path: Path) -> None:
    llama = LocalHead.load(save_model("llama", tmp_path / "llama"))
    assert llama._embed_chain is not None and llama._logits_chain is not None
    gpt2 = LocalHead.load(save_model("gpt2", tmp_path / "gpt2"))
    assert gpt2._embed_chain is None  # position embeddings: the whole forward is needed
    assert gpt2._logits_chain is not None


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_tokens_are_the_argmax_of_the_logits(tmp_path: Path, device: str,
                                                    dtype: str) -> None:
    """Only the ids come back, on the CPU, equal to the argmax of the last position's logits;
    on a GPU through one CUDA graph per batch size (captured once, then replayed)."""
    head = LocalHead.load(save_model("llama", tmp_path / "llama"), DeviceOptions(device, dtype))
    generator = torch.Generator().manual_seed(4)
    for batch, length in ((1, 1), (3, 1), (1, 1), (2, 4)):
        hidden = torch.randn(batch, length, head.hidden_size, generator=generator)
        hidden = hidden.to(device, head.dtype)
        ids = head.greedy_tokens(hidden)
        assert ids.device.type == "cpu" and ids.shape == (batch,)
        # The same product as the head's (one position): the same kernels on a GPU.
        assert torch.equal(ids, head.logits(hidden[:, -1:])[:, -1].argmax(-1).cpu())
    if device == "cuda":
        assert set(head._greedy_graphs._graphs) == {1, 2, 3}
        assert all(graph is not None for graph in head._greedy_graphs._graphs.values())
    with pytest.raises(ModelInputError):
        head.greedy_tokens(torch.zeros(1, 1, head.hidden_size + 1, dtype=head.dtype))
