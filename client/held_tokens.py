"""The token ids an inference session holds, so that a call reusing the session keeps only
the positions on which its input_ids agree with them (client/generation.py,
client/causal_lm.py); a session given another prompt gave wrong tokens without an error.

Steps made with token ids record them; steps of hidden states or embeddings leave their
positions unknown, and so does every position after an unknown one. No I/O: recording costs
O(new positions) per step, comparing happens once when a call begins.
"""

from __future__ import annotations

import torch

# Recorded at positions that are known but hold no token (a model's tuned prompts); never
# equal to a token id.
NOT_A_TOKEN = -1


class HeldTokens:
    """The token ids of positions [0, known) of one session, [batch, max_length]."""

    def __init__(self, batch_size: int, max_length: int):
        self.batch_size = batch_size
        self.max_length = max_length
        self.known = 0
        self._ids: torch.Tensor | None = None  # made at the first step with ids

    def record(self, position: int, length: int, ids: torch.Tensor | None) -> None:
        """A step of `length` positions from `position` on, made of `ids` [batch, length]
        (None: hidden states, unknown ids). Positions past `position` are forgotten."""
        known = min(self.known, position)
        if ids is None or known < position:  # unknown, or after an unknown position
            self.known = known
            return
        if self._ids is None:
            self._ids = torch.full((self.batch_size, self.max_length), NOT_A_TOKEN,
                                   dtype=torch.long)
        self._ids[:, position:position + length] = ids.detach().to("cpu", torch.long)
        self.known = position + length

    def reorder(self, index: torch.Tensor) -> None:
        """Row i takes the ids of row index[i] (beam search)."""
        if self._ids is not None and self.known:
            self._ids[:, :self.known] = self._ids[:, :self.known].index_select(0, index)

    def ids(self, start: int, end: int) -> torch.Tensor:
        """The ids of known positions [start, end)."""
        assert self._ids is not None and end <= self.known
        return self._ids[:, start:end]


def agreeing_length(held: torch.Tensor, held_mask: torch.Tensor | None, ids: torch.Tensor,
                    mask: torch.Tensor | None) -> int:
    """How many leading positions of `ids` [batch, n] (padding `mask`, None: all tokens) equal
    the `held` ones [batch, n] (padding `held_mask`) in every row: the positions a session may
    keep. Padding agrees with padding whatever its id (transformers fills it with any id)."""
    ids = ids.to("cpu", torch.long)
    new_mask = (torch.ones_like(ids) if mask is None else mask.to("cpu", torch.long)).bool()
    old_mask = (torch.ones_like(held) if held_mask is None else held_mask.to(torch.long)).bool()
    same = (new_mask == old_mask) & ((held == ids) | ~new_mask)
    differ = (~same).any(0).nonzero()
    return int(differ[0]) if differ.numel() else ids.shape[1]


__all__ = ["NOT_A_TOKEN", "HeldTokens", "agreeing_length"]
