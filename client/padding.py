"""Which positions of an inference session are padding (left-padded prompts of a batch).

The client keeps the mask of every position it has sent, [batch, max_length] with 1 = token
and 0 = padding, so that each span's step carries the padding of its new positions (the
servers keep their own copy: docs/block_protocol.md, "Padding") and a replacement server gets
the padding of everything replayed into it. Position ids follow from it as transformers'
generation derives them: each token's position counts the tokens before it in its row, and
padding gets 0. A session that never saw padding holds nothing and sends nothing.
"""

from __future__ import annotations

import torch

from model_parts.skeleton import ModelInputError


def token_mask(mask: object) -> torch.Tensor:
    """`mask` (1 = token, 0 = padding) as an int64 tensor on its own device. Booleans, integers
    and floats are taken if every value is exactly 0 or 1 (transformers' causal LMs take float
    masks of 0.0 / 1.0 too); anything else is a ModelInputError, never a guess."""
    if not isinstance(mask, torch.Tensor) or mask.is_complex():
        kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ModelInputError(f"the attention mask must be a tensor of 0 (padding) and 1 "
                              f"(token), not {kind}")
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ModelInputError("the attention mask must hold only 0 (padding) and 1 (token)")
    return mask.to(torch.long)


def generation_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for an attention mask [batch, length] as transformers' generate derives
    them: each token counts the tokens before it in its row, padding gets 0."""
    mask = mask.to(torch.long)
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


class PaddingMask:
    """The padding of one session's positions, as steps recorded it."""

    def __init__(self, batch_size: int, max_length: int):
        self.batch_size = batch_size
        self.max_length = max_length
        self._mask: torch.Tensor | None = None  # made at the first padded step

    @property
    def any(self) -> bool:
        return self._mask is not None

    def check(self, mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """`mask` for a step of `length` new positions as a [batch, length] long tensor of 0/1
        on the CPU (None: all tokens); ModelInputError if it is not one."""
        if mask is None:
            return None
        shape = (self.batch_size, length)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
            raise ModelInputError(f"the attention mask of a step must have shape {shape}")
        return token_mask(mask.detach()).cpu()

    def record(self, position: int, mask: torch.Tensor | None, length: int) -> None:
        """A step of `length` positions from `position` on, with padding `mask` (checked)."""
        if self._mask is None:
            if mask is None or bool(mask.all()):
                return
            self._mask = torch.ones(self.batch_size, self.max_length, dtype=torch.uint8)
        self._mask[:, position:position + length] = 1 if mask is None else mask

    def positions(self, position: int, mask: torch.Tensor | None, length: int
                  ) -> int | torch.Tensor:
        """Position ids of `length` new positions from `position` on with padding `mask`:
        `position` itself where no padding is involved, else [batch, length]."""
        if self._mask is None and (mask is None or bool(mask.all())):
            return position
        before = (self._mask[:, :position].long() if self._mask is not None
                  else torch.ones(self.batch_size, position, dtype=torch.long))
        new = torch.ones(self.batch_size, length, dtype=torch.long) if mask is None else mask
        counted = before.sum(-1, keepdim=True) + new.cumsum(-1) - 1
        return counted.masked_fill(new == 0, 0)

    def held(self, start: int, end: int) -> torch.Tensor | None:
        """The recorded mask of positions [start, end) (None: all tokens)."""
        return None if self._mask is None else self._mask[:, start:end]

    def reorder(self, index: torch.Tensor) -> None:
        """Row i takes the padding of row index[i] (beam search)."""
        if self._mask is not None:
            self._mask = self._mask.index_select(0, index)

    def wire(self, start: int, end: int) -> bytes | None:
        """The mask of positions [start, end) as a step sends it (row-major bytes), or None
        when they are all tokens (what a server assumes without a mask)."""
        if self._mask is None:
            return None
        part = self._mask[:, start:end]
        if bool(part.all()):
            return None
        return part.contiguous().numpy().tobytes()
