"""The rebalancing rule as it was written before it was made cheaper (blocks/placement.py at
main 1d84972): the plain loops, kept as the reference the faster code must agree with,
decision for decision and random draw for random draw (test_placement_equivalence.py).
Not used by the product."""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from collections.abc import Mapping, Sequence

from blocks.announcement import ServerInfo
from blocks.placement import (
    BALANCE_QUALITY,
    MAX_SETTLE_ROUNDS,
    MIN_THROUGHPUT,
    STAY_BIAS,
    PlacementError,
    counts_for_placement,
)

_Span = tuple[int, int, float]


def best_start(throughputs: Sequence[float], length: int) -> int:
    num_blocks = len(throughputs)
    if not 1 <= length <= num_blocks:
        raise PlacementError(f"cannot place {length} blocks in a model of {num_blocks}")
    window = sorted(throughputs[:length])
    best, best_at = window[:], 0
    for start in range(1, num_blocks - length + 1):
        del window[bisect_left(window, throughputs[start - 1])]
        insort(window, throughputs[start + length - 1])
        if window < best:
            best, best_at = window[:], start
    return best_at


def should_choose_other_blocks(
    local_peer: str,
    infos: Mapping[str, ServerInfo],
    num_blocks: int,
    *,
    rng: random.Random,
    balance_quality: float = BALANCE_QUALITY,
) -> bool:
    if balance_quality > 1.0:
        return True
    spans = _spans(infos, num_blocks)
    if local_peer not in spans:
        return False
    throughputs = _throughputs_of(spans, num_blocks)
    initial = min(throughputs)
    start, length, own = spans[local_peer]
    _add(throughputs, start, length, -own * (1 + STAY_BIAS))
    if initial > MIN_THROUGHPUT and min(throughputs) <= 0:
        return False
    new_start = best_start(throughputs, length)
    if new_start == start:
        return False
    _add(throughputs, start, length, own * STAY_BIAS)
    spans[local_peer] = (new_start, length, own)
    _add(throughputs, new_start, length, own)
    _settle(spans, throughputs, rng)
    final = min(_throughputs_of(spans, num_blocks))
    if final < initial or final < MIN_THROUGHPUT:
        return False
    return initial / final < balance_quality - STAY_BIAS


def _spans(infos: Mapping[str, ServerInfo], num_blocks: int) -> dict[str, _Span]:
    spans: dict[str, _Span] = {}
    for peer in sorted(infos):
        info = infos[peer]
        if not counts_for_placement(info):
            continue
        if info.end > num_blocks:
            raise PlacementError(f"{peer} serves [{info.start}, {info.end}) of {num_blocks}")
        spans[peer] = (info.start, info.length, info.throughput)
    return spans


def _throughputs_of(spans: Mapping[str, _Span], num_blocks: int) -> list[float]:
    throughputs = [0.0] * num_blocks
    for peer in sorted(spans):
        start, length, own = spans[peer]
        _add(throughputs, start, length, own)
    return throughputs


def _settle(spans: dict[str, _Span], throughputs: list[float], rng: random.Random) -> None:
    for _ in range(MAX_SETTLE_ROUNDS):
        order = sorted(spans)
        rng.shuffle(order)
        moved = False
        for peer in order:
            start, length, own = spans[peer]
            _add(throughputs, start, length, -own * (1 + STAY_BIAS))
            new_start = best_start(throughputs, length)
            _add(throughputs, start, length, own * STAY_BIAS)
            if new_start != start:
                spans[peer] = (new_start, length, own)
                moved = True
            _add(throughputs, new_start, length, own)
        if not moved:
            return


def _add(throughputs: list[float], start: int, length: int, amount: float) -> None:
    for block in range(start, start + length):
        throughputs[block] += amount
