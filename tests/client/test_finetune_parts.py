"""The client's fine-tuning parts that need no swarm: option checks, chunking, LoRA targets,
snapshots and the PEFT format (round trip, and PEFT itself loading what we save)."""

from __future__ import annotations

import pytest
import torch

from client.finetune import TuningOptions
from client.lora import LoraConfig, LoraConfigError, RemoteLora
from client.ptune import PromptTuning
from client.training import SwarmTrainer, TrainingConfig
from tests.model_factory import HIDDEN_SIZE, NUM_LAYERS, build_model, tiny_config


@pytest.mark.parametrize("kwargs, match", [
    ({"tuning_mode": "prefix"}, "tuning_mode must be one of"),
    ({"tuning_mode": "ptune"}, "pre_seq_len"),
    ({"pre_seq_len": 4}, "pre_seq_len is for"),
    ({"lora_rank": 4}, "tuning_mode='lora'"),
    ({"tuning_mode": "lora", "lora": LoraConfig(), "lora_rank": 4}, "not both"),
    ({"tuning_mode": "lora", "adapter": "x"}, "not both"),
    # the saved adapter's config decides these: they were silently ignored
    ({"tuning_mode": "lora", "lora_path": "a", "lora_rank": 16}, "lora_path loads"),
    ({"tuning_mode": "lora", "lora_path": "a", "lora": LoraConfig()}, "lora_path loads"),
])
def test_bad_tuning_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TuningOptions.pop_from(dict(kwargs))


def test_lora_targets_given_as_one_string_are_refused_by_name():
    with pytest.raises(LoraConfigError, match=r"list of names, e.g. \['q_proj'\]"):
        TuningOptions.pop_from({"tuning_mode": "lora", "lora_target_modules": "q_proj"})


def test_tuning_options_leave_model_options_alone():
    kwargs = {"tuning_mode": "lora", "lora_rank": 4, "lora_alpha": 8, "compression": "float16"}
    options = TuningOptions.pop_from(kwargs)
    assert kwargs == {"compression": "float16"}
    assert options.lora == LoraConfig(rank=4, alpha=8)


def test_chunks_split_rows_and_per_row_prompts():
    trainer = SwarmTrainer(blocks=None, config=TrainingConfig(chunk_tokens=20))
    hidden = torch.zeros(5, 10, 8)
    mask = torch.ones(5, 10, dtype=torch.long)
    shared = torch.zeros(4, 1, 2, 8)
    per_row = torch.arange(5.0).view(1, 5, 1, 1).expand(4, 5, 2, 8)
    chunks = trainer._chunks(hidden, mask, shared)
    assert [c.rows for c in chunks] == [(0, 2), (2, 4), (4, 5)]
    assert all(c.prompts is shared and c.mask.shape[0] == c.rows[1] - c.rows[0] for c in chunks)
    rows = trainer._chunks(hidden, None, per_row)
    assert [c.prompts[0, :, 0, 0].tolist() for c in rows] == [[0, 1], [2, 3], [4]]
    long = trainer._chunks(torch.zeros(3, 50, 8), None, None)  # one row is over the budget
    assert [c.rows for c in long] == [(0, 1), (1, 2), (2, 3)]


def test_a_part_of_a_chunk_keeps_absolute_rows_its_mask_and_its_prompts():
    """What one request of a span carries when the span's server takes fewer rows than the
    chunk has (client/training.py cuts to each server's limits): rows counted in the whole
    batch (the per-row prompts' gradients are summed there), its rows of the mask and of
    per-row prompts, shared prompts as they are."""
    trainer = SwarmTrainer(blocks=None, config=TrainingConfig(chunk_tokens=40))
    mask = torch.arange(70).view(7, 10) % 2
    per_row = torch.arange(7.0).view(1, 7, 1, 1).expand(4, 7, 2, 8)
    chunk = trainer._chunks(torch.zeros(7, 10, 8), mask, per_row)[1]  # rows 4 to 7
    assert chunk.rows == (4, 7)
    part = chunk.part(1, 3)
    assert part.rows == (5, 7) and part.runs == []
    assert torch.equal(part.mask, mask[5:7])
    assert part.prompts[0, :, 0, 0].tolist() == [5, 6]
    shared = torch.zeros(4, 1, 2, 8)
    assert trainer._chunks(torch.zeros(7, 10, 8), None, shared)[1].part(0, 1).prompts is shared


def test_lora_targets_snapshot_and_digest():
    config = tiny_config("llama")
    lora = RemoteLora(config, LoraConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj")))
    assert lora.layers_path == "model.layers"
    assert lora.keys[:2] == [(0, "self_attn.q_proj"), (0, "self_attn.v_proj")]
    assert len(lora.keys) == 2 * NUM_LAYERS
    assert all(b.abs().sum() == 0 for b in lora.lora_B)  # training starts at the frozen model
    snapshot = lora.snapshot(torch.float32)
    meta, tensors = snapshot.span(1, 3)
    assert meta["modules"] == ["self_attn.q_proj", "self_attn.v_proj"] and len(tensors) == 8
    assert snapshot.keys_of(1, 3)[0] == (1, "self_attn.q_proj")
    with torch.no_grad():
        lora.lora_B[3].add_(1.0)  # block 1, v_proj
    changed = lora.snapshot(torch.float32)
    assert changed.span(1, 3)[0]["digest"] != meta["digest"]
    assert changed.span(2, 4)[0]["digest"] == snapshot.span(2, 4)[0]["digest"]
    with pytest.raises(LoraConfigError, match="no linear module"):
        RemoteLora(config, LoraConfig(target_modules=("nothing",)))


def test_saved_lora_is_peft_format(tmp_path):
    from peft import PeftModel

    config = tiny_config("llama")
    lora = RemoteLora(config, LoraConfig(rank=4, alpha=8))
    with torch.no_grad():
        for b in lora.lora_B:
            b.normal_(0, 0.1)
    lora.save_pretrained(tmp_path / "a", base_model="tiny")
    again = RemoteLora.from_pretrained(tmp_path / "a", config)
    assert all(torch.equal(x, y) for x, y in zip(again.parameters_in_order(),
                                                    lora.parameters_in_order()))
    peft = PeftModel.from_pretrained(build_model("llama"), tmp_path / "a")
    named = dict(peft.named_parameters())
    a = named["base_model.model.model.layers.2.self_attn.v_proj.lora_A.default.weight"]
    assert torch.equal(a, lora.lora_A[lora.keys.index((2, "self_attn.v_proj"))])
    state = lora.peft_state_dict()
    state.pop(next(iter(state)))
    with pytest.raises(LoraConfigError, match="lacks"):
        again.load_peft_state_dict(state)


def test_prompt_shapes():
    deep = PromptTuning("deep_ptune", 3, HIDDEN_SIZE, NUM_LAYERS, init_std=0.5)
    assert deep.shallow(2, torch.float32, torch.device("cpu")).shape == (2, 3, HIDDEN_SIZE)
    assert deep.deep(torch.float32, torch.device("cpu")).shape == (NUM_LAYERS, 1, 3, HIDDEN_SIZE)
    assert PromptTuning("ptune", 3, HIDDEN_SIZE, NUM_LAYERS).deep(torch.float32, None) is None
    with pytest.raises(ValueError, match="pre_seq_len"):
        PromptTuning("ptune", 0, HIDDEN_SIZE, NUM_LAYERS)


async def test_a_failed_lora_upload_leaves_no_lock_behind():
    """`_upload_locks` kept the (peer, digest) lock of every upload that failed."""
    from types import SimpleNamespace

    from client.routing import RouteSpan
    from overlay.host import Host
    from overlay.identity import Identity
    from overlay.streams import ConnectionLost

    host = Host()
    try:
        trainer = SwarmTrainer(SimpleNamespace(model_id="m", swarm=SimpleNamespace(host=host)),
                               TrainingConfig(timeout=2.0))
        nowhere = RouteSpan(str(Identity.generate().peer_id), 0, 2)  # no address known
        with pytest.raises(ConnectionLost, match="no known address"):
            await trainer._upload(nowhere, {"digest": "d1"}, [torch.zeros(2)])
        assert trainer._upload_locks == {} and trainer._uploaded == set()
    finally:
        await host.close()
