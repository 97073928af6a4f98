"""One server's placement decisions over its lifetime: which span to take when it joins, when
to look at the swarm again, whether to move, and when the span it left may be freed.

The rules themselves are blocks/placement.py's (Petals' block_selection); this module adds
what a live server needs around them, as a sans-IO planner:
1. A server started with `--num-blocks N` waits `block_selection_delay` (so servers started
   together do not all read the same swarm and pick the same blocks), then takes
   `choose_best_blocks` over the other servers' announcements.
2. Every `balance_check_delay(mean_period)` it reads the swarm again and asks
   `should_choose_other_blocks`, with its own record as it announces it (not as a possibly
   stale DHT copy shows it). If yes, it waits the selection delay, asks again with a fresh
   view, and only then moves, to the best window for the swarm without it.
3. A server that is moving counts at its destination: `placement_infos` takes a peer's
   JOINING span over its ONLINE one, so a second server checking meanwhile does not chase
   the same hole.
4. Two servers that decide at the same moment cannot see each other and may chase the same
   hole. So a mover announces JOINING, looks again a moment later, and yields (withdraws and
   stays) if a peer with a smaller id is JOINING blocks that overlap its destination: of
   contending movers exactly the smallest id goes on (`SpanPlanner.yields`).
5. Moving hands over: the new span is announced JOINING, loaded, then served; sessions that
   were open on the old span go on until they end or `handover_grace` seconds have passed,
   then the old span is freed (`Handover.old_span_free`).

Pure: no torch, no asyncio, no clock (every method takes `now`), randomness injected; the
simulator can drive the same planner. The I/O driver is blocks/balancer.py.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

from blocks.announcement import ServerInfo, ServerState, SwarmView
from blocks.placement import (
    BALANCE_QUALITY,
    MEAN_BALANCE_CHECK_PERIOD,
    MEAN_BLOCK_SELECTION_DELAY,
    PlacementError,
    balance_check_delay,
    block_selection_delay,
    choose_best_blocks,
    should_choose_other_blocks,
)

# Seconds a mover waits after announcing JOINING before looking for contenders (rule 4): well
# above the time an announcement takes to reach the DHT (milliseconds to a second).
CONTENTION_WAIT = 1.0
# Seconds the sessions open on a span a server is leaving may still run on it. Ours, not
# Petals' (Petals drops them when it moves): one mean balance period, long enough for an
# interactive generation to finish; a client whose session is cut recovers on another server.
HANDOVER_GRACE = MEAN_BALANCE_CHECK_PERIOD


@dataclass(frozen=True, slots=True)
class BalanceConfig:
    """How a server places itself; defaults are Petals' (blocks/placement.py cites them)."""

    mean_balance_period: float = MEAN_BALANCE_CHECK_PERIOD
    balance_quality: float = BALANCE_QUALITY  # 0 disables rebalancing; > 1 moves every check
    mean_selection_delay: float = MEAN_BLOCK_SELECTION_DELAY
    handover_grace: float = HANDOVER_GRACE

    def __post_init__(self) -> None:
        for name in ("mean_balance_period", "mean_selection_delay", "handover_grace"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.mean_balance_period == 0:
            raise ValueError("mean_balance_period must be > 0")
        if not (math.isfinite(self.balance_quality) and self.balance_quality >= 0):
            raise ValueError(f"balance_quality must be >= 0, got {self.balance_quality}")

    @property
    def rebalances(self) -> bool:
        return self.balance_quality > 0


@dataclass(frozen=True, slots=True)
class Move:
    """Leave blocks [old_start, old_end) for [start, end)."""

    old_start: int
    old_end: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Handover:
    """A move in progress once the new span serves: the old span's sessions may finish
    until `deadline`."""

    move: Move
    switched_at: float
    deadline: float

    def old_span_free(self, now: float, old_sessions: int) -> bool:
        """May the old span be freed now (closing any session still on it)?"""
        return old_sessions == 0 or now >= self.deadline


def placement_infos(view: SwarmView) -> dict[str, ServerInfo]:
    """One info per peer for placement (rule 3): a JOINING span wins over an ONLINE one (the
    peer is moving there), OFFLINE ones are dropped; ties go to the longer span."""
    best: dict[str, ServerInfo] = {}
    for span in view.spans:
        info = span.info
        if info.state == ServerState.OFFLINE:
            continue
        held = best.get(span.peer_id)
        if held is None or _rank(info) > _rank(held):
            best[span.peer_id] = info
    return best


def _rank(info: ServerInfo) -> tuple[bool, int, int]:
    return (info.state == ServerState.JOINING, info.length, -info.start)


class SpanPlanner:
    """The placement decisions of one server serving `span_length` blocks of `num_blocks`."""

    def __init__(self, peer_id: str, num_blocks: int, span_length: int,
                 config: BalanceConfig, rng: random.Random):
        if not 1 <= span_length <= num_blocks:
            raise PlacementError(f"cannot serve {span_length} blocks of a {num_blocks}-block "
                                 f"model")
        self.peer_id = peer_id
        self.num_blocks = num_blocks
        self.span_length = span_length
        self.config = config
        self.rng = rng
        self.checks = 0
        self.moves = 0

    # -- joining -------------------------------------------------------------------------
    def selection_time(self, now: float) -> float:
        """When to read the swarm and choose the first span (rule 1)."""
        return now + block_selection_delay(self.rng, self.config.mean_selection_delay)

    def choose(self, infos: Mapping[str, ServerInfo]) -> tuple[int, int]:
        """The span to serve first, given the swarm's placement infos (rule 1)."""
        others = {peer: info for peer, info in infos.items() if peer != self.peer_id}
        start = choose_best_blocks(self.span_length, others, self.num_blocks)
        return start, start + self.span_length

    # -- rebalancing ---------------------------------------------------------------------
    def next_check(self, now: float) -> float | None:
        """When to check the balance next; None when rebalancing is disabled."""
        if not self.config.rebalances:
            return None
        return now + balance_check_delay(self.rng, self.config.mean_balance_period)

    def check(self, now: float, infos: Mapping[str, ServerInfo], own: ServerInfo
              ) -> Move | None:
        """Rule 2: should this server, announcing `own`, move? The move, or None."""
        self.checks += 1
        if own.length != self.span_length:
            raise PlacementError(f"own span has {own.length} blocks, planned {self.span_length}")
        swarm = dict(infos)
        swarm[self.peer_id] = own  # our own record as we announce it, never a stale copy
        if not should_choose_other_blocks(self.peer_id, swarm, self.num_blocks, rng=self.rng,
                                          balance_quality=self.config.balance_quality):
            return None
        del swarm[self.peer_id]
        start = choose_best_blocks(self.span_length, swarm, self.num_blocks)
        if start == own.start:
            return None
        self.moves += 1
        return Move(own.start, own.end, start, start + self.span_length)

    def yields(self, move: Move, infos: Mapping[str, ServerInfo]) -> bool:
        """Rule 4: after announcing JOINING for `move`, should this server give way to a peer
        with a smaller id that is JOINING overlapping blocks (`infos`: placement_infos)?"""
        for peer, info in infos.items():
            if (peer < self.peer_id and info.state == ServerState.JOINING
                    and info.start < move.end and move.start < info.end):
                return True
        return False

    def handover(self, move: Move, now: float) -> Handover:
        """The new span serves from `now`; the old one may be freed by the deadline."""
        return Handover(move, now, now + self.config.handover_grace)
