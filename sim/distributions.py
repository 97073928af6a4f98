"""Random durations for churn and latency: exponential, Weibull, log-normal, constant.

Each distribution samples from a `random.Random` handed in (the run's only source) and can
also sample the *residual* time of an interval already in progress when the run starts: for
a renewal process observed at a random moment, that residual follows the equilibrium
distribution, not the original one. With heavy-tailed Weibull sessions (shape < 1) the
difference is large: starting every node with a fresh session would make the first hour look
far more turbulent than the steady state the measurements describe.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Constant:
    value: float

    @property
    def mean(self) -> float:
        return self.value

    def sample(self, rng: random.Random) -> float:
        return self.value

    def sample_residual(self, rng: random.Random) -> float:
        return rng.random() * self.value


@dataclass(frozen=True, slots=True)
class Exponential:
    mean: float

    def __post_init__(self) -> None:
        if not self.mean > 0:
            raise ValueError(f"exponential mean must be > 0, got {self.mean}")

    def sample(self, rng: random.Random) -> float:
        return rng.expovariate(1.0 / self.mean)

    def sample_residual(self, rng: random.Random) -> float:
        return self.sample(rng)  # memoryless


@dataclass(frozen=True, slots=True)
class Weibull:
    """P(X > x) = exp(-(x / scale) ** shape); shape < 1 is the heavy tail of P2P sessions."""

    shape: float
    scale: float

    def __post_init__(self) -> None:
        if not (self.shape > 0 and self.scale > 0):
            raise ValueError(f"Weibull shape and scale must be > 0, got {self.shape}, {self.scale}")

    @property
    def mean(self) -> float:
        return self.scale * math.gamma(1.0 + 1.0 / self.shape)

    @property
    def median(self) -> float:
        return self.scale * math.log(2.0) ** (1.0 / self.shape)

    def sample(self, rng: random.Random) -> float:
        return rng.weibullvariate(self.scale, self.shape)

    def sample_residual(self, rng: random.Random) -> float:
        # Length-biased interval times a uniform point inside it. For a Weibull X,
        # (X / scale) ** shape is Exp(1) = Gamma(1); length bias makes it Gamma(1 + 1/shape).
        g = rng.gammavariate(1.0 + 1.0 / self.shape, 1.0)
        return rng.random() * self.scale * g ** (1.0 / self.shape)


@dataclass(frozen=True, slots=True)
class LogNormal:
    """exp(N(ln median, sigma**2)): the usual shape of Internet round-trip times."""

    median: float
    sigma: float

    def __post_init__(self) -> None:
        if not (self.median > 0 and self.sigma >= 0):
            raise ValueError("log-normal needs median > 0 and sigma >= 0")

    @property
    def mean(self) -> float:
        return self.median * math.exp(self.sigma**2 / 2)

    def sample(self, rng: random.Random) -> float:
        return rng.lognormvariate(math.log(self.median), self.sigma)

    def sample_residual(self, rng: random.Random) -> float:
        # Length-biased log-normal: the log-mean shifts by sigma**2.
        length = rng.lognormvariate(math.log(self.median) + self.sigma**2, self.sigma)
        return rng.random() * length

    def quantile(self, p: float) -> float:
        from statistics import NormalDist

        return self.median * math.exp(self.sigma * NormalDist().inv_cdf(p))


Duration = Constant | Exponential | Weibull | LogNormal
