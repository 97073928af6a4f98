"""The tiny Llama most client tests serve (saved once per module) and the same model in memory,
the local transformers reference their results are compared against."""

from __future__ import annotations

import pytest

from tests.model_factory import build_model, save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model("llama", tmp_path_factory.mktemp("model") / "llama")


@pytest.fixture(scope="module")
def reference():
    return build_model("llama")
