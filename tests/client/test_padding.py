"""The client's record of a session's padding: what each step sends and the positions."""

from __future__ import annotations

import pytest
import torch

from client.padding import PaddingMask
from model_parts.skeleton import ModelInputError


def test_a_session_without_padding_holds_and_sends_nothing() -> None:
    padding = PaddingMask(2, 16)
    padding.record(0, padding.check(torch.ones(2, 4, dtype=torch.long), 4), 4)
    assert not padding.any and padding.wire(0, 4) is None
    assert padding.positions(4, None, 1) == 4


def test_padding_is_sent_with_its_positions_and_counted_out_of_position_ids() -> None:
    padding = PaddingMask(2, 16)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    positions = padding.positions(0, mask, 4)
    assert positions.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]  # transformers' generate
    padding.record(0, mask, 4)
    assert padding.wire(0, 4) == bytes([0, 0, 1, 1, 1, 1, 1, 1])
    assert padding.wire(2, 4) is None  # all tokens: a server assumes so without a mask
    assert padding.wire(0, 6) == bytes([0, 0, 1, 1, 1, 1] + [1] * 6)  # a replay from 0
    # the next token of each row: its position counts the tokens before it
    assert padding.positions(4, None, 1).tolist() == [[2], [4]]
    padding.record(4, None, 1)
    # moved back and stepped again over the padded positions, now without padding
    padding.record(0, None, 4)
    assert padding.wire(0, 5) is None


@pytest.mark.parametrize(("mask", "message"), [
    (torch.ones(2, 3, dtype=torch.long), "shape"),
    (torch.full((2, 4), 0.5), "only 0"),
    (torch.full((2, 4), 2), "only 0"),
    (torch.ones(2, 4, dtype=torch.complex64), "not torch.complex64"),
    ([[1, 1, 1, 1]] * 2, "shape"),
])
def test_bad_masks_are_refused(mask, message) -> None:
    with pytest.raises(ModelInputError, match=message):
        PaddingMask(2, 16).check(mask, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.int8])
def test_masks_of_zeros_and_ones_of_any_dtype_are_taken(dtype) -> None:
    """As transformers takes them: 0.0/1.0 floats are the integer mask."""
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(PaddingMask(2, 16).check(mask.to(dtype), 4), mask)
