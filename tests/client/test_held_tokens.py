"""The token ids a session holds and how far a new call's input_ids agree with them (no I/O)."""

from __future__ import annotations

import torch

from client.held_tokens import NOT_A_TOKEN, HeldTokens, agreeing_length


def test_ids_are_known_up_to_the_first_step_without_them():
    held = HeldTokens(2, 16)
    held.record(0, 3, torch.tensor([[5, 6, 7], [8, 9, 10]]))
    held.record(3, 1, torch.tensor([[11], [12]]))
    assert held.known == 4
    assert held.ids(0, 4).tolist() == [[5, 6, 7, 11], [8, 9, 10, 12]]
    held.record(4, 2, None)  # embeddings: unknown ids, and every position after them
    held.record(6, 1, torch.tensor([[1], [2]]))
    assert held.known == 4


def test_a_step_after_a_rollback_replaces_the_ids():
    held = HeldTokens(1, 16)
    held.record(0, 5, torch.arange(5)[None])
    held.record(2, 1, torch.tensor([[9]]))  # the session moved back to 2
    assert held.known == 3 and held.ids(0, 3).tolist() == [[0, 1, 9]]
    held.record(1, 1, None)
    assert held.known == 1


def test_beam_reorders_move_the_rows():
    held = HeldTokens(3, 8)
    held.record(0, 2, torch.tensor([[1, 2], [3, 4], [5, 6]]))
    held.reorder(torch.tensor([2, 2, 0]))
    assert held.ids(0, 2).tolist() == [[5, 6], [5, 6], [1, 2]]


def test_agreement_is_the_common_prefix_of_every_row():
    held = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert agreeing_length(held, None, held.clone(), None) == 4
    assert agreeing_length(held, None, torch.tensor([[1, 2, 3, 0], [5, 6, 0, 8]]), None) == 2
    assert agreeing_length(held, None, torch.tensor([[9, 2, 3, 4], [5, 6, 7, 8]]), None) == 0
    assert agreeing_length(held[:, :0], None, held[:, :0], None) == 0


def test_padding_must_agree_and_its_ids_do_not_matter():
    held = torch.tensor([[0, 0, 3, 4], [5, 6, 7, 8]])
    held_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.uint8)
    other_pad = torch.tensor([[2, 2, 3, 4], [5, 6, 7, 8]])
    assert agreeing_length(held, held_mask, other_pad, held_mask.long()) == 4
    assert agreeing_length(held, held_mask, held, None) == 0  # padding now read as tokens
    assert agreeing_length(held, None, held, held_mask) == 0
    prompts = torch.full((2, 1), NOT_A_TOKEN)
    assert agreeing_length(torch.cat([prompts, held], 1)[:, 1:], held_mask, held,
                           held_mask) == 4
