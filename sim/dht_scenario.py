"""Scenarios `dht-static` and `dht-churn`: N nodes running the overlay's Kademlia core.

Phases:
1. Join. "protocol": nodes come up one by one, `join_interval` apart, each bootstrapping
   through a random node already up (the core's own BootstrapOperation: self-lookup, then a
   refresh of every bucket). "prefilled": nodes come up at once with routing tables drawn
   from the live population, as a long-running network has them (see SimDHT); needed above a
   few thousand nodes, where joining one by one would take most of the run. "auto" picks
   protocol up to `protocol_join_max` nodes. Join traffic is not measured.
2. Measure for `duration` seconds: churn runs, and operations arrive as a Poisson process of
   `ops_per_s`, each from a random live node: FIND_NODE of a random id, STORE of a new key,
   or GET of a key stored earlier and not yet expired.

Judging (against sim.oracle, never against the DHT itself):
- a find succeeds when its result holds the live node closest to the target (other than the
  requester): the node a value for that id would be stored on; `exact` when the k returned
  are exactly the true k closest; recall is the share of the true k found.
- a get succeeds when it returns the value; a store when at least one node holds it.
Operations whose requester went down before they finished are counted as abandoned.

Pure: no I/O, no clock; the Simulator's clock and random source only.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import msgpack

from overlay.dht.config import DHTConfig
from overlay.dht.effects import FindResult, GetResult, OperationDone, StoreResult
from overlay.dht.node import DHTNode
from sim.checks import (
    MAX_DHT_NODES,
    MAX_OPERATIONS,
    MAX_SAMPLES,
    MAX_STORED_BYTES,
    at_most,
    fraction,
    non_negative,
    positive,
)
from sim.churn import ChurnConfig, ChurnModel
from sim.dht_net import DriverConfig, SimDHT, SimPeer
from sim.engine import ProgressFn, Simulator, quiet_gc
from sim.metrics import RunResult, TimeSeries, mean, percentile, ratio, summarize
from sim.network import NetworkConfig, NetworkModel


@dataclass(frozen=True, slots=True)
class DHTScenarioConfig:
    nodes: int = 1000
    duration: float = 600.0
    seed: int = 0
    churn: ChurnConfig = field(default_factory=ChurnConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    dht: DHTConfig = field(default_factory=DHTConfig)
    driver: DriverConfig = field(default_factory=DriverConfig)
    join: str = "auto"  # auto | protocol | prefilled
    protocol_join_max: int = 2000
    join_interval: float = 0.05  # seconds between protocol joins
    settle: float = 30.0  # seconds between the last join and the measurement
    ops_per_s: float = 5.0
    find_share: float = 0.5
    store_share: float = 0.25  # the rest are gets
    value_bytes: int = 64
    record_ttl: float = 3600.0
    sample_interval: float = 60.0

    def __post_init__(self) -> None:
        if self.nodes < 2:
            raise ValueError("a DHT scenario needs at least 2 nodes")
        if not self.duration > 0 or not self.sample_interval > 0:
            raise ValueError("duration and sample_interval must be positive seconds")
        positive(duration=self.duration, sample_interval=self.sample_interval,
                 record_ttl=self.record_ttl)
        non_negative(ops_per_s=self.ops_per_s, join_interval=self.join_interval,
                     settle=self.settle, value_bytes=self.value_bytes)
        fraction(find_share=self.find_share, store_share=self.store_share)
        at_most(MAX_DHT_NODES, "nodes", self.nodes)
        at_most(MAX_OPERATIONS, "operations (ops_per_s x duration)",
                self.ops_per_s * self.duration)
        at_most(MAX_STORED_BYTES, "bytes stored (ops_per_s x duration x store_share x "
                "value_bytes)", self.ops_per_s * self.duration * self.store_share
                * self.value_bytes)
        at_most(MAX_SAMPLES, "samples (duration / sample_interval)",
                self.duration / self.sample_interval)
        self.churn.check_within(self.duration)
        # The records a STORE makes must pass the core's own limits (else a RecordError
        # at the first STORE): the value is msgpack bin (2, 3 or 5 bytes of header).
        limits = self.dht.limits
        header = 2 if self.value_bytes < 256 else 3 if self.value_bytes < 65536 else 5
        if self.value_bytes + header > limits.max_value_bytes:
            raise ValueError(f"value_bytes={self.value_bytes} makes records over "
                             f"dht.limits.max_value_bytes={limits.max_value_bytes}")
        if self.record_ttl > limits.max_ttl:
            raise ValueError(f"record_ttl={self.record_ttl:g} is over "
                             f"dht.limits.max_ttl={limits.max_ttl:g}")
        if self.join not in ("auto", "protocol", "prefilled"):
            raise ValueError(f"unknown join mode {self.join!r}")
        if not 0 <= self.find_share + self.store_share <= 1:
            raise ValueError("find_share + store_share must be within [0, 1]")

    @property
    def join_mode(self) -> str:
        if self.join != "auto":
            return self.join
        return "protocol" if self.nodes <= self.protocol_join_max else "prefilled"


@dataclass(slots=True)
class _Op:
    kind: str
    started: float
    peer: SimPeer
    epoch: int
    target: int | bytes | None


class DHTScenario:
    """One run; `run()` returns the RunResult."""

    def __init__(self, name: str, config: DHTScenarioConfig):
        self.name = name
        self.config = config
        self.sim = Simulator(config.seed)
        self.network = NetworkModel(config.network, self.sim.rng)
        self.dht = SimDHT(self.sim, self.network, config.dht, config.driver, self._done)
        self.churn = ChurnModel(self.sim, config.churn)
        self.ops: dict[tuple[int, int], _Op] = {}  # (peer index, op id) -> op
        self.measuring = False
        # (key, expiration) of successful stores, in expiration order (constant TTL)
        self.stored: deque[tuple[bytes, float]] = deque()
        self._next_key = 0
        # outcomes
        self.finds: list[tuple[float, bool, bool, float, int, float, int]] = []
        self.gets: list[tuple[float, bool, float, int, int]] = []
        self.stores: list[tuple[float, int, int]] = []
        self.abandoned = 0
        self.joins = 0
        self.departures = 0
        self.bootstraps_failed = 0
        self._bootstraps: set[tuple[int, int]] = set()
        self.series = TimeSeries((
            "time_s", "alive", "finds", "find_success_rate", "hops_mean", "latency_p50_s",
            "gets", "get_success_rate", "requests", "bytes",
        ))
        self._window = (0, 0, 0, 0)  # finds, gets, requests, bytes at the last sample
        self.horizon = config.duration  # virtual time at which the run ends (for progress)
        self._t0 = 0.0
        self._alive_samples: list[int] = []

    # -- setup ------------------------------------------------------------------------------

    def _join_phase(self) -> float:
        c, sim = self.config, self.sim
        peers = [self.dht.add_peer() for _ in range(c.nodes)]
        up = self.churn.plan(c.nodes)
        initial = [p for p, is_up in zip(peers, up) if is_up]
        if c.join_mode == "prefilled":
            self.dht.start_prefilled(initial, c.dht.bucket_refresh_interval)
            return sim.now
        for n, peer in enumerate(initial):
            sim.at(n * c.join_interval, self._protocol_join, peer)
        return max(0, len(initial) - 1) * c.join_interval + c.settle

    def _protocol_join(self, peer: SimPeer) -> None:
        op = self.dht.start(peer)
        if op is not None:
            self._bootstraps.add((peer.index, op))

    # -- churn ------------------------------------------------------------------------------

    def _down(self, i: int) -> None:
        self.departures += 1
        self.dht.stop(self.dht.peers[i])

    def _up(self, i: int) -> None:
        self.joins += 1
        self._protocol_join(self.dht.peers[i])

    # -- workload ---------------------------------------------------------------------------

    def _arrival(self) -> None:
        c, sim, rng = self.config, self.sim, self.sim.rng
        sim.after(rng.expovariate(c.ops_per_s), self._arrival)
        peer = self.dht.random_live()
        if peer is None:
            return
        draw = rng.random()
        now = sim.now
        if draw < c.find_share:
            self._start(peer, "find", rng.getrandbits(256))
        elif draw < c.find_share + c.store_share:
            key = b"sim-key-%d" % self._next_key
            self._next_key += 1
            self._start(peer, "store", key)
        else:
            key = self._live_key(now)
            if key is None:
                self._start(peer, "find", rng.getrandbits(256))
            else:
                self._start(peer, "get", key)

    def _live_key(self, now: float) -> bytes | None:
        stored = self.stored
        while stored and stored[0][1] <= now + 1.0:
            stored.popleft()
        if not stored:
            return None
        return stored[self.sim.rng.randrange(len(stored))][0]

    def _start(self, peer: SimPeer, kind: str, target: int | bytes) -> None:
        c = self.config
        now = self.sim.now
        if kind == "find":
            def start(core: DHTNode, t: float) -> int:
                return core.find_closest([target], t)
        elif kind == "get":
            def start(core: DHTNode, t: float) -> int:
                return core.get([target], t)
        else:
            value = msgpack.packb(b"\x00" * c.value_bytes, use_bin_type=True)

            def start(core: DHTNode, t: float) -> int:
                return core.store([core.make_record(target, value, t + c.record_ttl)], t)
        op_id = self.dht.run_op(peer, start)
        self.ops[(peer.index, op_id)] = _Op(kind, now, peer, peer.epoch, target)

    def _done(self, peer: SimPeer, done: OperationDone) -> None:
        key = (peer.index, done.op_id)
        if key in self._bootstraps:
            self._bootstraps.discard(key)
            if not done.result.reached:  # type: ignore[union-attr]
                self.bootstraps_failed += 1
            return
        op = self.ops.pop(key, None)
        if op is None:
            return
        now = self.sim.now
        result = done.result
        latency = now - op.started
        if isinstance(result, FindResult):
            target = op.target
            assert isinstance(target, int)
            got = [c.node_id for c in result.closest.get(target, [])]
            me = peer.contact.node_id
            k = self.config.dht.k
            truth = [x for x in self.dht.alive.closest(target, k + 1) if x != me][:k]
            found = bool(got) and bool(truth) and truth[0] in got
            recall = len(set(got) & set(truth)) / len(truth) if truth else 1.0
            self.finds.append((now, found, got == truth, latency, result.stats.hops, recall,
                               result.stats.requests))
        elif isinstance(result, GetResult):
            records = result.records.get(op.target, [])  # type: ignore[arg-type]
            self.gets.append((now, bool(records), latency, result.stats.hops,
                              result.stats.requests))
        elif isinstance(result, StoreResult):
            replicas = result.replicas[0] if result.replicas else 0
            self.stores.append((now, replicas, result.stats.requests))
            if replicas > 0:
                self.stored.append((op.target, op.started + self.config.record_ttl))  # type: ignore[arg-type]

    # -- sampling ---------------------------------------------------------------------------

    def _sample(self, again: bool = True) -> None:
        if again:
            self.sim.after(self.config.sample_interval, self._sample)
        f0, g0, r0, b0 = self._window
        finds = self.finds[f0:]
        gets = self.gets[g0:]
        self.series.add(
            round(self.sim.now - self._t0, 6),
            len(self.dht.alive),
            len(finds),
            ratio(sum(1 for f in finds if f[1]), len(finds)),
            mean([f[4] for f in finds]),
            percentile([f[3] for f in finds], 50),
            len(gets),
            ratio(sum(1 for g in gets if g[1]), len(gets)),
            self.dht.requests - r0,
            self.network.bytes_sent - b0,
        )
        self._alive_samples.append(len(self.dht.alive))
        self._window = (len(self.finds), len(self.gets), self.dht.requests,
                        self.network.bytes_sent)

    # -- the run ------------------------------------------------------------------------------

    def run(self, progress: ProgressFn | None = None) -> RunResult:
        with quiet_gc():  # building the tables allocates millions of long-lived objects
            return self._run(progress)

    def _run(self, progress: ProgressFn | None) -> RunResult:
        c, sim = self.config, self.sim
        start_at = self._join_phase()
        self.horizon = start_at + c.duration
        self.sim.run(start_at, progress=progress)
        self._t0 = sim.now
        # Nothing from the join phase is measured.
        self.ops.clear()
        self._bootstraps.clear()
        self.bootstraps_failed = 0
        requests0, bytes0 = self.dht.requests, self.network.bytes_sent
        self._window = (0, 0, requests0, bytes0)
        self.churn.start(c.duration, self._down, self._up)
        sim.after(c.sample_interval, self._sample)
        if c.ops_per_s > 0:
            sim.after(sim.rng.expovariate(c.ops_per_s), self._arrival)
        self._alive_samples.append(len(self.dht.alive))
        sim.run(self._t0 + c.duration, progress=progress)
        if not self.series.rows or self.series.rows[-1][0] < round(c.duration, 6):
            self._sample(again=False)  # the last, shorter interval: the rows add up to the run
        self.abandoned = sum(1 for op in self.ops.values() if op.peer.epoch != op.epoch)
        return self._result(requests0, bytes0)

    def _result(self, requests0: int, bytes0: int) -> RunResult:
        c = self.config
        finds, gets, stores = self.finds, self.gets, self.stores
        requests = self.dht.requests - requests0
        m: dict[str, object] = {
            "scenario": self.name,
            "seed": c.seed,
            "nodes": c.nodes,
            "duration_s": c.duration,
            "churn": c.churn.kind,
            "join": c.join_mode,
            "latency_model": c.network.latency,
            "k": c.dht.k,
            "alpha": c.dht.alpha,
            "alive_mean": mean(self._alive_samples),
            "alive_min": min(self._alive_samples) if self._alive_samples else None,
            "joins": self.joins,
            "departures": self.departures,
            "bootstraps_failed": self.bootstraps_failed,
            "lookups": len(finds),
            "lookup_success_rate": ratio(sum(1 for f in finds if f[1]), len(finds)),
            "lookup_exact_rate": ratio(sum(1 for f in finds if f[2]), len(finds)),
            "lookup_recall_mean": mean([f[5] for f in finds]),
            "requests_per_lookup_mean": mean([f[6] for f in finds]),
            "gets": len(gets),
            "get_success_rate": ratio(sum(1 for g in gets if g[1]), len(gets)),
            "stores": len(stores),
            "store_success_rate": ratio(sum(1 for s in stores if s[1] > 0), len(stores)),
            "store_replicas_mean": mean([s[1] for s in stores]),
            "ops_abandoned": self.abandoned,
            "requests": requests,
            "requests_per_node_per_s": ratio(
                requests, (mean(self._alive_samples) or 0) * c.duration
            ),
            "bytes": self.network.bytes_sent - bytes0,
            "messages_lost": self.network.lost,
            "requests_refused": self.dht.failures_refused,
            "events": self.sim.events,
            "events_skipped": self.sim.skipped,
        }
        m.update(summarize("hops", [f[4] for f in finds]))
        m.update(summarize("lookup_latency", [f[3] for f in finds], suffix="_s"))
        m.update(summarize("get_hops", [g[3] for g in gets], qs=(50,)))
        m.update(summarize("get_latency", [g[2] for g in gets], qs=(50, 90), suffix="_s"))
        extra = {
            "lookup_latency_s": [f[3] for f in finds],
            "hops": [f[4] for f in finds],
        }
        return RunResult(self.name, m, self.series, extra)


def dht_static_config(**overrides: object) -> DHTScenarioConfig:
    return DHTScenarioConfig(churn=ChurnConfig("none"), **overrides)  # type: ignore[arg-type]


def dht_churn_config(**overrides: object) -> DHTScenarioConfig:
    return DHTScenarioConfig(churn=ChurnConfig("weibull"), **overrides)  # type: ignore[arg-type]
