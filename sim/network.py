"""The modelled network: per-pair latency, per-node bandwidth with a queued uplink, loss.

- Latency of a pair is fixed for the whole run and symmetric. It is drawn from a
  distribution (constant, uniform, log-normal) or from a small matrix of round-trip times
  between regions, times a per-pair jitter. A pair's draw is a hash of the two node indices
  and a salt from the run's seed, looked up in a table of quantiles: no per-pair state, so a
  100,000-node run costs nothing here, and the same seed gives the same latencies.
- Bandwidth: each node gets an (uplink, downlink) class. A message of n bytes occupies the
  sender's uplink for n / min(uplink, receiver's downlink) seconds, messages leaving one node
  queue behind each other (FIFO), then the message travels for the one-way latency.
- Loss (optional): with `loss_mode="drop"` a lost message never arrives (the requester's
  timeout fires, as for a stalled RPC); with "retransmit" (TCP, our transport) each loss costs
  a retransmission timeout instead, doubling from the minimum RTO.

Pure: no I/O, no clock; randomness from the run's `random.Random`.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate

from sim.checks import non_negative, positive
from sim.distributions import LogNormal

# Linux TCP_RTO_MIN (include/net/tcp.h: HZ / 5): the first retransmission of a lost segment
# on a path whose RTT is small happens after at least 200 ms.
TCP_RTO_MIN = 0.2
# Quantile-table resolution of the per-pair latency draw (2**12 = 4096 levels).
_TABLE_BITS = 12
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    share: float  # fraction of nodes placed here


# Ours, order of magnitude: round-trip times in milliseconds between hosting regions, of the
# kind public inter-city ping tables show (same continent 20-40 ms, across the Atlantic ~80,
# US-Asia ~160, Europe-Asia ~220).
DEFAULT_REGIONS = (
    Region("north-america", 0.40),
    Region("europe", 0.35),
    Region("asia", 0.20),
    Region("oceania", 0.05),
)
DEFAULT_REGION_RTT_MS = (
    (35.0, 85.0, 160.0, 170.0),
    (85.0, 25.0, 220.0, 260.0),
    (160.0, 220.0, 40.0, 120.0),
    (170.0, 260.0, 120.0, 20.0),
)


@dataclass(frozen=True, slots=True)
class BandwidthClass:
    share: float
    up_bps: float  # bits per second
    down_bps: float


# Ours: a residential/cloud mix. The DHT's messages are small, so these mostly matter for
# the activations of the swarm scenario, whose servers carry their own link speeds.
DEFAULT_BANDWIDTH = (
    BandwidthClass(0.5, 20e6, 100e6),
    BandwidthClass(0.35, 100e6, 100e6),
    BandwidthClass(0.15, 1e9, 1e9),
)


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """How latency, bandwidth and loss are modelled (see the module doc)."""

    latency: str = "lognormal"  # constant | uniform | lognormal | regions
    # Ours: median one-way delay 40 ms (80 ms RTT), sigma 0.6: most pairs between 15 and
    # 100 ms one way, a tail of slow pairs.
    one_way_median: float = 0.040
    one_way_sigma: float = 0.6
    one_way_min: float = 0.001  # floor, and the low end for "uniform"
    one_way_max: float = 0.150  # high end for "uniform"
    regions: tuple[Region, ...] = DEFAULT_REGIONS
    region_rtt_ms: tuple[tuple[float, ...], ...] = DEFAULT_REGION_RTT_MS
    region_jitter_sigma: float = 0.2  # log-normal spread of pairs within a region pair
    bandwidth: tuple[BandwidthClass, ...] = field(default=DEFAULT_BANDWIDTH)
    loss: float = 0.0
    loss_mode: str = "retransmit"  # retransmit | drop

    def __post_init__(self) -> None:
        if self.latency not in ("constant", "uniform", "lognormal", "regions"):
            raise ValueError(f"unknown latency model {self.latency!r}")
        if self.loss_mode not in ("retransmit", "drop"):
            raise ValueError(f"unknown loss mode {self.loss_mode!r}")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        n = len(self.regions)
        if self.latency == "regions" and (
            len(self.region_rtt_ms) != n or any(len(row) != n for row in self.region_rtt_ms)
        ):
            raise ValueError("region_rtt_ms must be a square matrix, one row per region")
        if not self.bandwidth:
            raise ValueError("at least one bandwidth class")
        positive(one_way_median=self.one_way_median)
        non_negative(one_way_sigma=self.one_way_sigma, one_way_min=self.one_way_min,
                     one_way_max=self.one_way_max,
                     region_jitter_sigma=self.region_jitter_sigma)
        if self.latency == "uniform" and self.one_way_min > self.one_way_max:
            raise ValueError("uniform latency needs one_way_min <= one_way_max")


def _pick(cumulative: list[float], rng: random.Random) -> int:
    return min(bisect_right(cumulative, rng.random() * cumulative[-1]), len(cumulative) - 1)


class NetworkModel:
    """Latency, bandwidth and loss between node indices 0..n-1."""

    __slots__ = (
        "_loss",
        "_one_way_min",
        "_region_one_way",
        "_regions",
        "_salt",
        "_table",
        "busy_until",
        "bytes_sent",
        "config",
        "down",
        "lost",
        "messages",
        "region",
        "rng",
        "up",
    )

    def __init__(self, config: NetworkConfig, rng: random.Random):
        self.config = config
        self.rng = rng
        self._salt = rng.getrandbits(64)
        self.region: list[int] = []
        self.up: list[float] = []  # bytes per second
        self.down: list[float] = []
        self.busy_until: list[float] = []
        self.messages = 0
        self.bytes_sent = 0
        self.lost = 0
        levels = [(i + 0.5) / (1 << _TABLE_BITS) for i in range(1 << _TABLE_BITS)]
        c = config
        if c.latency == "constant":
            self._table = [c.one_way_median] * len(levels)
        elif c.latency == "uniform":
            self._table = [c.one_way_min + p * (c.one_way_max - c.one_way_min) for p in levels]
        elif c.latency == "lognormal":
            dist = LogNormal(c.one_way_median, c.one_way_sigma)
            self._table = [max(c.one_way_min, dist.quantile(p)) for p in levels]
        else:  # regions: the table holds multiplicative jitter around 1
            jitter = LogNormal(1.0, c.region_jitter_sigma)
            self._table = [jitter.quantile(p) for p in levels]
        self._region_one_way = [[ms / 2000.0 for ms in row] for row in c.region_rtt_ms]
        self._loss = c.loss
        self._regions = c.latency == "regions"  # else the table holds the delay itself
        self._one_way_min = c.one_way_min

    def __len__(self) -> int:
        return len(self.region)

    def add_node(self, bandwidth: tuple[float, float] | None = None) -> int:
        """A new node; `bandwidth` = (up, down) in bits/s, else drawn from the classes."""
        c = self.config
        rng = self.rng
        region = _pick(list(accumulate(r.share for r in c.regions)), rng)
        if bandwidth is None:
            cls = c.bandwidth[_pick(list(accumulate(b.share for b in c.bandwidth)), rng)]
            bandwidth = (cls.up_bps, cls.down_bps)
        self.region.append(region)
        self.up.append(bandwidth[0] / 8.0)
        self.down.append(bandwidth[1] / 8.0)
        self.busy_until.append(-math.inf)
        return len(self.region) - 1

    def one_way(self, a: int, b: int) -> float:
        """Propagation delay between two nodes, seconds (0 for a node and itself)."""
        if a == b:
            return 0.0
        if a > b:
            a, b = b, a
        # splitmix64's finaliser over the pair and the run's salt: a uniform table index.
        x = (a * 0x9E3779B97F4A7C15 + b * 0xBF58476D1CE4E5B9 + self._salt) & _MASK64
        x ^= x >> 31
        x = (x * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 29
        level = self._table[x >> (64 - _TABLE_BITS)]
        if not self._regions:
            return level
        base = self._region_one_way[self.region[a]][self.region[b]]
        return max(self._one_way_min, base * level)

    def rtt(self, a: int, b: int) -> float:
        return 2.0 * self.one_way(a, b)

    def transfer(
        self, src: int, dst: int, size: int, now: float, delay: float | None = None
    ) -> float | None:
        """Send `size` bytes from `src` to `dst` now: the arrival time, or None if dropped.

        `delay`: the pair's `one_way(src, dst)` when the caller has it already (a request
        and its answer travel the same pair, and the delay is symmetric)."""
        self.messages += 1
        self.bytes_sent += size
        start = self.busy_until[src]
        if start < now:
            start = now
        rate = self.up[src]
        if self.down[dst] < rate:
            rate = self.down[dst]
        done = start + size / rate
        self.busy_until[src] = done
        if delay is None:
            delay = self.one_way(src, dst)
        arrival = done + delay
        loss = self._loss
        if not loss:
            return arrival
        if self.rng.random() < loss:
            self.lost += 1
            if self.config.loss_mode == "drop":
                return None
            rto = max(TCP_RTO_MIN, 2.0 * (2.0 * delay))  # twice the round trip
            while True:  # every retransmission may be lost again; the timeout doubles
                arrival += rto
                rto *= 2.0
                if self.rng.random() >= loss:
                    break
        return arrival
