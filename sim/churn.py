"""Churn: when each node is up and when it is down.

Models (`ChurnConfig.kind`):
- "none": every node stays up.
- "exp": sessions and downtimes exponential, with the same means as the Weibull defaults.
- "weibull": sessions and downtimes Weibull (shape k, scale). Stutzbach & Rejaie,
  "Understanding Churn in Peer-to-Peer Networks" (IMC 2006), found session lengths in
  Gnutella, BitTorrent and Kad heavy-tailed and well fitted by Weibull with shape about
  0.34-0.59 and scale of tens of minutes (e.g. k = 0.38, scale 42.4 min; k = 0.59, scale
  41.9 min), and downtimes heavy-tailed too. Our defaults sit in that range.
- "mass": no background churn; at `mass_at` a `mass_fraction` of the live nodes fails at
  once (a data-centre or region outage), each coming back after a downtime drawn from
  the downtime distribution.

With `stationary_start` the run begins in the steady state of the alternating renewal
process: a node is up with probability E[session] / (E[session] + E[downtime]) and its
first transition comes after a residual time (see sim.distributions). Otherwise all nodes
start up with fresh sessions.

Pure: schedules events on the Simulator; the caller's callbacks do the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sim.checks import fraction, non_negative, positive
from sim.distributions import Duration, Exponential, Weibull
from sim.engine import Simulator

# Stutzbach & Rejaie (IMC 2006): Weibull session shapes "about 0.4 to 0.6"; we take 0.5.
SR2006_SHAPE = 0.5
# ... and scales of 21-42 minutes in their fits; we take the upper one, 42 minutes.
SR2006_SCALE = 42.0 * 60.0

KINDS = ("none", "exp", "weibull", "mass")


@dataclass(frozen=True, slots=True)
class ChurnConfig:
    kind: str = "none"
    shape: float = SR2006_SHAPE  # Weibull shape of sessions
    scale: float = SR2006_SCALE  # Weibull scale of sessions, seconds
    down_shape: float = SR2006_SHAPE
    down_scale: float = SR2006_SCALE
    mass_fraction: float = 0.3
    mass_at: float | None = None  # seconds from the start; None: half the run
    stationary_start: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown churn model {self.kind!r}; one of {', '.join(KINDS)}")
        fraction(mass_fraction=self.mass_fraction)
        if self.mass_at is not None:
            non_negative(mass_at=self.mass_at)
        positive(shape=self.shape, scale=self.scale, down_shape=self.down_shape,
                 down_scale=self.down_scale)
        try:
            self.session().mean, self.downtime().mean  # a tiny shape overflows here
        except OverflowError:
            raise ValueError("a Weibull shape this small has no finite mean") from None

    def check_within(self, duration: float) -> None:
        """A mass failure set after the run's end would never happen: a run without churn
        that looks like one with it."""
        if self.kind == "mass" and self.mass_at is not None and self.mass_at >= duration:
            raise ValueError(f"a mass failure at {self.mass_at:g} s is not before the end of "
                             f"the run ({duration:g} s): it would never happen")

    def session(self) -> Duration:
        weibull = Weibull(self.shape, self.scale)
        return Exponential(weibull.mean) if self.kind == "exp" else weibull

    def downtime(self) -> Duration:
        weibull = Weibull(self.down_shape, self.down_scale)
        return Exponential(weibull.mean) if self.kind == "exp" else weibull


class ChurnModel:
    """Flips nodes 0..n-1 between up and down, calling `on_down(i)` / `on_up(i)`.

    Two steps, so that a scenario can build its initial network before churn begins:
    `plan(n)` decides (and returns) who starts up, `start(duration, on_down, on_up)`
    schedules every transition from the current virtual time on.
    """

    __slots__ = ("_down", "_first", "_on_down", "_on_up", "_session", "_up", "config", "sim")

    def __init__(self, sim: Simulator, config: ChurnConfig):
        self.sim = sim
        self.config = config
        self._session = config.session()
        self._down = config.downtime()
        self._up: list[bool] = []
        self._first: list[float] = []  # delay of each node's first transition
        self._on_down: Callable[[int], object] = lambda i: None
        self._on_up: Callable[[int], object] = lambda i: None

    def plan(self, n: int) -> list[bool]:
        """Decide which of n nodes start up (and when each first changes state)."""
        c, rng = self.config, self.sim.rng
        self._up = [True] * n
        self._first = [0.0] * n
        if c.kind in ("none", "mass"):
            return list(self._up)
        up_share = self._session.mean / (self._session.mean + self._down.mean)
        for i in range(n):
            if not c.stationary_start:
                self._first[i] = self._session.sample(rng)
            elif rng.random() < up_share:
                self._first[i] = self._session.sample_residual(rng)
            else:
                self._up[i] = False
                self._first[i] = self._down.sample_residual(rng)
        return list(self._up)

    def start(
        self, duration: float, on_down: Callable[[int], object], on_up: Callable[[int], object]
    ) -> None:
        """Schedule the transitions planned by `plan`, counted from now."""
        self._on_down, self._on_up = on_down, on_up
        c, sim = self.config, self.sim
        if c.kind == "none":
            return
        if c.kind == "mass":
            sim.after(duration / 2 if c.mass_at is None else c.mass_at, self._mass_failure)
            return
        for i, delay in enumerate(self._first):
            sim.after(delay, self._go_down if self._up[i] else self._go_up, i)

    def is_up(self, i: int) -> bool:
        return self._up[i]

    @property
    def up_count(self) -> int:
        return sum(self._up)

    def _go_down(self, i: int) -> None:
        self._up[i] = False
        self._on_down(i)
        self.sim.after(self._down.sample(self.sim.rng), self._go_up, i)

    def _go_up(self, i: int) -> None:
        self._up[i] = True
        self._on_up(i)
        if self.config.kind != "mass":
            self.sim.after(self._session.sample(self.sim.rng), self._go_down, i)

    def _mass_failure(self) -> None:
        alive = [i for i, up in enumerate(self._up) if up]
        count = round(self.config.mass_fraction * len(alive))
        for i in sorted(self.sim.rng.sample(alive, count)):
            self._go_down(i)
