"""Trainable prompts the client owns: prompt tuning and deep prompt tuning (Petals' modes).

- "ptune": `pre_seq_len` prompt embeddings prepended to the embedded input on the client; the
  servers see a longer sequence and nothing else (Lester et al., 2021, "The Power of Scale for
  Parameter-Efficient Prompt Tuning").
- "deep_ptune": also one prompt per block, [num_blocks, pre_seq_len, hidden], sent with each
  request; a server adds entry i to the hidden states entering block i at the prefix positions
  (P-Tuning v2, Liu et al., 2022; Petals adds them the same way, before every block). They
  start at zero, so deep tuning starts where plain prompt tuning does.

Prompts are kept in float32 (as Petals keeps them) and cast to the model's dtype when used.
This module may not do I/O.
"""

from __future__ import annotations

import torch
from torch import nn

TUNING_MODES = ("ptune", "deep_ptune", "lora")


class PromptTuning(nn.Module):
    def __init__(self, mode: str, pre_seq_len: int, hidden_size: int, num_blocks: int,
                 init_std: float = 1.0):
        super().__init__()
        if mode not in ("ptune", "deep_ptune"):
            raise ValueError(f"prompt tuning mode must be ptune or deep_ptune, not {mode!r}")
        if not isinstance(pre_seq_len, int) or pre_seq_len < 1:
            raise ValueError(f"{mode} needs pre_seq_len >= 1, got {pre_seq_len!r}")
        self.mode = mode
        self.pre_seq_len = pre_seq_len
        self.num_blocks = num_blocks
        self.hidden_size = hidden_size
        # Initialised at the spread of the model's token embeddings (init_std), so the
        # first prompts look like tokens to the blocks.
        self.prompt_embeddings = nn.Parameter(
            torch.randn(pre_seq_len, hidden_size, dtype=torch.float32) * init_std)
        self.intermediate_prompt_embeddings = None
        if mode == "deep_ptune":
            self.intermediate_prompt_embeddings = nn.Parameter(
                torch.zeros(num_blocks, pre_seq_len, hidden_size, dtype=torch.float32))

    def shallow(self, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[batch, pre_seq_len, hidden]: to prepend to the embedded input."""
        prompts = self.prompt_embeddings.to(device, dtype)
        return prompts.unsqueeze(0).expand(batch, -1, -1)

    def deep(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """[num_blocks, 1, pre_seq_len, hidden] (shared by the batch), or None for ptune."""
        if self.intermediate_prompt_embeddings is None:
            return None
        return self.intermediate_prompt_embeddings.to(device, dtype).unsqueeze(1)
