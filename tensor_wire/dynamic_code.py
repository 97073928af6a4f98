"""The standard signed 8-bit dynamic quantization map, defined here so it need not travel.

int8_blockwise maps every value, divided by its block's absmax, to the nearest of 256 code
values. Shipping the table costs 1 KiB per tensor (12% of a (1, 1, 8192) activation), so code
id 1 names this table instead. It is the "dynamic tree" data type of Dettmers, "8-Bit
Approximations for Parallelism in Deep Learning" (ICLR 2016), in the form bitsandbytes'
`create_dynamic_map(signed=True)` builds: for exponent i = 0..6, the midpoints of
linspace(0.1, 1, 2**i + 1) scaled by 10**(i - 6), with both signs, plus 0 and 1. We compute it
in float64 and round once to float32, so any implementation can rebuild it bit for bit; its
SHA-256 is pinned in FORMAT.md and in the tests. It differs from bitsandbytes' own table by at
most a float32 rounding step, which does not matter: we always pass our table to bitsandbytes.

Pure Python: no torch import.
"""

from __future__ import annotations

import struct
from functools import cache
from itertools import pairwise

_F32 = struct.Struct("<f")
EXPONENTS = 7  # signed 8-bit map: 1 sign bit, up to 7 exponent bits (bitsandbytes' defaults)


def _to_f32(value: float) -> float:
    return _F32.unpack(_F32.pack(value))[0]


@cache
def dynamic_code() -> tuple[float, ...]:
    """The 256 code values, sorted ascending, each exactly representable in float32."""
    values = [0.0, 1.0]
    for i in range(EXPONENTS):
        steps = 2**i + 1
        bounds = [0.1 + 0.9 * k / (steps - 1) for k in range(steps)]
        scale = 10.0 ** (i - (EXPONENTS - 1))
        for low, high in pairwise(bounds):
            mean = scale * (low + high) / 2.0
            values += [mean, -mean]
    assert len(values) == 256
    return tuple(sorted(_to_f32(v) for v in values))


@cache
def dynamic_code_bytes() -> bytes:
    """The table as 256 little-endian float32 values (what code id 0 would ship)."""
    return struct.pack("<256f", *dynamic_code())
