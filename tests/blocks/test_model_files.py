"""ModelFiles and default_model_id: reading exactly the tensors asked for, clear errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model_parts.files import ModelFiles, ModelFilesError, default_model_id
from tests.model_factory import build_model, save_model


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model("qwen2", tmp_path_factory.mktemp("single") / "Tiny.Qwen2_v1")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sharded") / "tiny-llama"
    return save_model("llama", directory, max_shard_size="20KB")


def test_reads_exactly_the_prefix_asked_for(single: Path, sharded: Path) -> None:
    reference = build_model("llama").state_dict()
    files = ModelFiles(sharded)
    assert len({files._weight_map[n] for n in files.tensor_names}) > 2  # really sharded
    layer = files.read_prefix("model.layers.2.")
    assert set(layer) == {n for n in reference if n.startswith("model.layers.2.")}
    for name, tensor in layer.items():
        assert torch.equal(tensor, reference[name])
    assert set(ModelFiles(single).read_prefix("lm_head.")) <= {"lm_head.weight"}


def test_read_casts_floats_and_stored_dtype(single: Path) -> None:
    files = ModelFiles(single)
    assert files.stored_dtype() == torch.float32
    tensors = files.read(["model.norm.weight"], dtype=torch.bfloat16)
    assert tensors["model.norm.weight"].dtype == torch.bfloat16


def test_tensors_read_do_not_depend_on_the_file_afterwards(tmp_path: Path, single: Path) -> None:
    copy = shutil.copytree(single, tmp_path / "copy")
    name = "model.layers.0.mlp.down_proj.weight"
    tensors = ModelFiles(copy).read([name])
    before = tensors[name].clone()
    weights = copy / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # rewritten in place: same inode
    assert torch.equal(tensors[name], before)
    weights.write_bytes(b"")  # truncated: a mapping's pages would now fault (SIGBUS)
    assert torch.equal(tensors[name], before)


def test_missing_pieces_raise_model_files_errors(tmp_path: Path, sharded: Path) -> None:
    with pytest.raises(ModelFilesError, match="does not exist"):
        ModelFiles(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFilesError, match=r"no config\.json"):
        ModelFiles(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ModelFilesError, match=r"neither model\.safetensors nor"):
        ModelFiles(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(ModelFilesError, match="cannot read"):
        ModelFiles(tmp_path / "empty")

    broken = shutil.copytree(sharded, tmp_path / "broken")
    files = ModelFiles(broken)
    with pytest.raises(ModelFilesError, match="not in the checkpoint"):
        files.read(["model.layers.99.mlp.up_proj.weight"])
    shard = files._weight_map["model.layers.3.mlp.up_proj.weight"]
    (broken / shard).unlink()
    with pytest.raises(ModelFilesError, match="missing shard"):
        files.read_prefix("model.layers.3.")
    files.read_prefix("model.layers.0.")  # other shards still readable
    save_file({"other": torch.zeros(1)}, broken / shard)
    with pytest.raises(ModelFilesError, match="lacks tensor"):
        files.read_prefix("model.layers.3.")
    (broken / shard).write_bytes(b"garbage")
    with pytest.raises(ModelFilesError, match="cannot read"):
        files.read_prefix("model.layers.3.")
    index = broken / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "../escape.safetensors"}}))
    with pytest.raises(ModelFilesError, match="outside"):
        ModelFiles(broken)
    index.write_text(json.dumps({"weight_map": ["x"]}))
    with pytest.raises(ModelFilesError, match="weight_map"):
        ModelFiles(broken)


def test_default_model_id_is_stable_and_config_specific(tmp_path: Path, single: Path) -> None:
    model_id = default_model_id(single)
    assert re.fullmatch(r"tiny-qwen2-v1-[0-9a-f]{8}", model_id)
    copy = shutil.copytree(single, tmp_path / "Tiny.Qwen2_v1")
    assert default_model_id(copy) == model_id  # location does not matter

    config = json.loads((copy / "config.json").read_text())
    config["transformers_version"] = "0.0.1"  # re-saved by another version: same model
    (copy / "config.json").write_text(json.dumps(config, indent=4))
    assert default_model_id(copy) == model_id

    config["rms_norm_eps"] = 1e-5  # a different model
    (copy / "config.json").write_text(json.dumps(config))
    assert default_model_id(copy) != model_id

    renamed = shutil.copytree(single, tmp_path / "other-name")
    assert default_model_id(renamed).endswith(model_id[-8:])
    assert default_model_id(renamed).startswith("other-name-")
    with pytest.raises(ModelFilesError):
        default_model_id(tmp_path / "nowhere")
