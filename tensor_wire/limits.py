"""How much a peer may make a decoder allocate: the receiver's policy, not part of the format.

Every length on the wire is checked against the bytes present, but compressed payloads
legitimately decode to more than they occupy (lz4 up to 256x, int8_blockwise to float64 8x),
and a chunked message reserves its declared size before the chunks arrive. These two caps bound
both. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Caps a decoder enforces before it allocates; raise them for unusually large tensors."""

    # Declared size a ChunkAssembler accepts. 1 GiB is above any activation we expect (a
    # 2048-token batch of 16 at hidden size 8192 in float32 is exactly 1 GiB); the reservation is
    # address space, whose pages the kernel commits only as chunks are written.
    max_message_bytes: int = 1 << 30
    # Bytes of tensors one record or message may decode to (the sum of numel x item size): a
    # 1 GiB message of float16 or int8_blockwise activations decodes to 2-4 GiB of float32.
    max_decoded_bytes: int = 4 << 30


DEFAULT_LIMITS = Limits()
