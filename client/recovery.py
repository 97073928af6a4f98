"""Fault-recovery decisions of a client: whom to avoid, how long to wait, how to patch a route.

- `BanList`: a server that failed a request is avoided for a while; repeated failures double
  the ban (up to a cap), a success forgets the streak (Petals / hivemind `Blacklist`).
- `RetryPolicy`: when no route can be completed (blocks missing, everyone banned), the
  client waits and retries with jittered exponential delays until a deadline it was given,
  then gives up and reports the missing blocks.
- `PassDeadline`: one deadline for all the re-routing of a pass without a session (a forward
  or backward pass, all its chunks), so servers that keep failing cannot keep it going.
- `splice_route`: after re-routing exactly the failed range, put the replacement in place.

Pure: no asyncio, no clock (`now` is passed in), randomness injected.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from client.routing import RouteSpan

# Petals `ClientConfig(ban_timeout=15)`: seconds a peer that failed to respond is avoided.
BAN_BASE = 15.0
# Petals `Blacklist(base_time=ban_timeout, backoff_rate=2.0)`: each new failure doubles it.
BAN_BACKOFF_RATE = 2.0
# Ours: a server that keeps failing is retried at least every 5 minutes (hivemind has no cap).
BAN_MAX = 300.0
# Ours: a failure streak is forgotten after this long without a new failure, so the ban
# list stays bounded (a server that fails again after an hour starts over at BAN_BASE).
BAN_STREAK_MEMORY = 3600.0

# Petals `ClientConfig(min_backoff=1, max_backoff=60)`: retry delays, doubling from 1 s
# (the first retry is immediate, as in Petals: usually re-routing around a ban suffices).
RETRY_MIN_BACKOFF = 1.0
RETRY_MAX_BACKOFF = 60.0
# "Equal jitter" (M. Brooker, "Exponential Backoff And Jitter", AWS Architecture Blog,
# 2015): wait uniformly between half and all of the exponential delay, so clients that
# failed together do not retry together.
RETRY_JITTER = 0.5


@dataclass(frozen=True, slots=True)
class BanConfig:
    base: float = BAN_BASE
    backoff_rate: float = BAN_BACKOFF_RATE
    max_ban: float = BAN_MAX
    streak_memory: float = BAN_STREAK_MEMORY


@dataclass(slots=True)
class _Ban:
    until: float
    failures: int  # consecutive failures without a success


class BanList:
    """Peers to avoid, with exponential backoff per peer.

    A failure reported while the peer is still banned does not lengthen the ban: requests
    in flight to one dead server all fail at once, and that is one incident, not several.
    """

    __slots__ = ("_bans", "config")

    def __init__(self, config: BanConfig = BanConfig()):
        self.config = config
        self._bans: dict[str, _Ban] = {}

    def ban(self, peer: str, now: float) -> float:
        """Record a failure of `peer`; returns the time until which it is banned."""
        self._forget_old(now)
        entry = self._bans.get(peer)
        if entry is not None and entry.until > now:
            return entry.until
        failures = 0 if entry is None else entry.failures
        cfg = self.config
        duration = min(cfg.base * cfg.backoff_rate**failures, cfg.max_ban)
        self._bans[peer] = _Ban(now + duration, failures + 1)
        return now + duration

    def success(self, peer: str) -> None:
        """`peer` answered: its failure streak is over (and any ban lifted)."""
        self._bans.pop(peer, None)

    def is_banned(self, peer: str, now: float) -> bool:
        entry = self._bans.get(peer)
        return entry is not None and entry.until > now

    def banned(self, now: float) -> frozenset[str]:
        """Peers banned at `now` (pass to the route planner)."""
        return frozenset(peer for peer, entry in self._bans.items() if entry.until > now)

    def next_unban(self, now: float) -> float | None:
        """When the next current ban lifts (a moment worth retrying at), or None."""
        return min((e.until for e in self._bans.values() if e.until > now), default=None)

    def __len__(self) -> int:
        return len(self._bans)

    def _forget_old(self, now: float) -> None:
        horizon = now - self.config.streak_memory
        stale = [peer for peer, entry in self._bans.items() if entry.until < horizon]
        for peer in stale:
            del self._bans[peer]


@dataclass(frozen=True, slots=True)
class RetryConfig:
    min_backoff: float = RETRY_MIN_BACKOFF
    max_backoff: float = RETRY_MAX_BACKOFF
    jitter: float = RETRY_JITTER


class RetryPolicy:
    """Delays between attempts to complete a route, bounded by the caller's deadline."""

    __slots__ = ("config", "rng")

    def __init__(self, rng: random.Random, config: RetryConfig = RetryConfig()):
        self.rng = rng
        self.config = config

    def next_delay(
        self, attempt: int, now: float, deadline: float, *, wake_at: float | None = None
    ) -> float | None:
        """Seconds to wait before attempt number `attempt + 1` (attempt 0 failed first), or
        None to give up because the deadline has passed.

        The delay is 0 after the first failure, then min_backoff * 2**(attempt - 1) capped
        at max_backoff, jittered down by up to `jitter`; never past the deadline, and never
        past `wake_at` (e.g. `BanList.next_unban`), a moment when the swarm is known to
        change. A final attempt is allowed exactly at the deadline.
        """
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        if not now < deadline:
            return None
        cfg = self.config
        if attempt == 0:
            delay = 0.0
        else:
            exponent = min(attempt - 1, 64)  # 2**64 x anything is past any cap
            delay = min(cfg.min_backoff * 2.0**exponent, cfg.max_backoff)
            delay *= 1.0 - cfg.jitter * self.rng.random()
        if wake_at is not None and now <= wake_at:
            delay = min(delay, wake_at - now)
        return max(0.0, min(delay, deadline - now))


@dataclass(slots=True)
class PassDeadline:
    """The recovery deadline of one pass: `timeout` after its first failure, shared by every
    later failure and re-route of the pass (as an inference session's opening shares one), so
    a pass whose servers keep failing gives up instead of retrying on and on."""

    timeout: float
    began: float | None = None  # the first failure

    @property
    def deadline(self) -> float | None:
        """None until a failure started the recovery."""
        return None if self.began is None else self.began + self.timeout

    def failed(self, now: float) -> float | None:
        """A failure at `now`: the deadline to re-route by, or None if it has passed (give up).
        The first failure always gets one attempt."""
        if self.began is None:
            self.began = now
            return now + self.timeout
        deadline = self.began + self.timeout
        return deadline if now < deadline else None


def splice_route(
    route: Sequence[RouteSpan], failed: int, replacement: Sequence[RouteSpan]
) -> list[RouteSpan]:
    """`route` with span number `failed` replaced by `replacement`, which must cover exactly
    the same blocks, contiguously."""
    if not 0 <= failed < len(route):
        raise IndexError(f"route has no span {failed}")
    old = route[failed]
    _check_contiguous(replacement, old.start, old.end)
    return [*route[:failed], *replacement, *route[failed + 1:]]


def _check_contiguous(spans: Sequence[RouteSpan], start: int, end: int) -> None:
    at = start
    for span in spans:
        if span.start != at or span.end <= span.start:
            raise ValueError(f"replacement is not contiguous at block {at}: {span}")
        at = span.end
    if at != end:
        raise ValueError(f"replacement covers [{start}, {at}), expected [{start}, {end})")
