"""Scenario `swarm`: a Petals-like swarm serving one model, under churn, with clients.

Servers come up within `start_spread` seconds and place themselves (sim.swarm_servers);
after `warmup` seconds the measurement starts: churn begins, clients arrive as a Poisson
process of `session_rate` and run inference sessions (sim.swarm_sessions).

Judged against the truth (servers actually ONLINE), not against the announcements:
- bottleneck throughput: min over blocks of the summed throughput of the online servers
  holding it (blocks.placement.swarm_bottleneck), sampled every `sample_interval`;
- at the end, the same servers placed optimally: `blocks.placement.optimal_bottleneck`
  (exact, attempted up to `optimal_max_servers` servers) and the capacity bound
  sum(throughput x span length) / blocks, which no placement can beat;
- coverage: online servers per block over time;
- sessions: completion rate, recoveries, restarts, tokens/s.

Pure: no I/O, no clock; the Simulator's clock and random source only.
"""

from __future__ import annotations

from blocks.placement import PlacementError, block_throughputs, optimal_bottleneck
from sim.churn import ChurnModel
from sim.engine import ProgressFn, Simulator
from sim.metrics import RunResult, TimeSeries, mean, ratio, summarize
from sim.network import NetworkModel
from sim.swarm_config import SwarmScenarioConfig
from sim.swarm_servers import Directory, ServerFleet
from sim.swarm_sessions import Session, SessionRunner


class SwarmScenario:
    def __init__(self, name: str, config: SwarmScenarioConfig):
        self.name = name
        self.config = config
        self.sim = Simulator(config.seed)
        self.network = NetworkModel(config.network, self.sim.rng)
        self.directory = Directory(config.model.num_blocks)
        self.fleet = ServerFleet(self.sim, self.network, config, self.directory)
        self.runner = SessionRunner(
            self.sim, self.network, self.fleet, self.directory, config, self._finished
        )
        self.churn = ChurnModel(self.sim, config.churn)
        self.finished: list[Session] = []
        self.started = 0
        self.measuring = False
        self.series = TimeSeries((
            "time_s", "online_servers", "joining_servers", "bottleneck", "coverage_min",
            "uncovered_blocks", "active_sessions", "tokens_per_s", "sessions_completed",
            "sessions_failed",
        ))
        self._bottlenecks: list[float] = []
        self._coverage_mins: list[int] = []
        self._last_tokens = 0
        self._t0 = 0.0
        self.horizon = config.warmup + config.duration  # for progress reports

    def _finished(self, s: Session) -> None:
        self.finished.append(s)

    def _schedule_arrivals(self) -> None:
        """Draw every client arrival (Poisson) and session length up front, so that runs
        differing only in how sessions fare (replay vs restart) see the same clients."""
        c, sim, rng = self.config, self.sim, self.sim.rng
        if c.session_rate <= 0:
            return
        t = rng.expovariate(c.session_rate)
        while t < c.duration:
            sim.after(t, self._arrival, rng.randint(c.min_tokens, c.max_tokens))
            t += rng.expovariate(c.session_rate)

    def _arrival(self, tokens: int) -> None:
        self.started += 1
        self.runner.arrive(tokens)

    def _coverage(self) -> tuple[float, list[int]]:
        blocks = self.config.model.num_blocks
        online = self.fleet.online_infos()
        counts = [0] * (blocks + 1)
        for info in online.values():
            counts[info.start] += 1
            counts[info.end] -= 1
        coverage, running = [], 0
        for b in range(blocks):
            running += counts[b]
            coverage.append(running)
        bottleneck = min(block_throughputs(online, blocks)) if online else 0.0
        return bottleneck, coverage

    def _sample(self, again: bool = True) -> None:
        c = self.config
        interval = c.sample_interval
        if again:
            self.sim.after(interval, self._sample)
        elif self.series.rows:  # the last, shorter interval
            interval = self.sim.now - self._t0 - self.series.rows[-1][0]
        bottleneck, coverage = self._coverage()
        self._bottlenecks.append(bottleneck)
        self._coverage_mins.append(min(coverage))
        tokens = self.runner.tokens_done
        servers = self.fleet.servers
        done = [s.state for s in self.finished]
        self.series.add(
            round(self.sim.now - self._t0, 6),
            sum(1 for s in servers if s.online),
            sum(1 for s in servers if s.up and s.state is not None and not s.online),
            bottleneck,
            min(coverage),
            sum(1 for n in coverage if n == 0),
            len(self.runner.active),
            (tokens - self._last_tokens) / interval if interval > 0 else 0.0,
            done.count("done"),
            done.count("failed"),
        )
        self._last_tokens = tokens

    def run(self, progress: ProgressFn | None = None) -> RunResult:
        c, sim, rng = self.config, self.sim, self.sim.rng
        self.fleet.add_servers()
        for i, up in enumerate(self.churn.plan(len(self.fleet.servers))):
            if up:
                sim.at(rng.random() * c.start_spread, self.fleet.bring_up, i)
        sim.run(c.warmup, progress=progress)
        self._t0 = sim.now
        tokens0 = self.runner.tokens_done
        kept0 = self.runner.tokens_kept
        self._last_tokens = tokens0
        joins0, departures0, moves0 = self.fleet.joins, self.fleet.departures, self.fleet.moves
        self.churn.start(c.duration, self.fleet.take_down, self.fleet.bring_up)
        self._sample()
        self._schedule_arrivals()
        sim.run(self._t0 + c.duration, progress=progress)
        if self.series.rows[-1][0] < round(c.duration, 6):
            self._sample(again=False)  # the rows add up to the run
        metrics = self._metrics(tokens0, kept0)
        metrics["server_joins"] = self.fleet.joins - joins0
        metrics["server_departures"] = self.fleet.departures - departures0
        metrics["server_moves"] = self.fleet.moves - moves0
        extra = {
            "step_latency_s": list(self.runner.step_latencies),
            "session_tokens_per_s": [self._speed(s) for s in self._sessions()],
        }
        return RunResult(self.name, metrics, self.series, extra)

    def _optimum(self) -> tuple[float | None, float]:
        """(exact optimal bottleneck of the online servers or None, capacity bound)."""
        c = self.config
        hidden, blocks = c.model.hidden_size, c.model.num_blocks
        online = [s for s in self.fleet.servers if s.online]
        throughputs = [s.throughput(hidden) for s in online]
        lengths = [s.cls.num_blocks for s in online]
        bound = sum(t * n for t, n in zip(throughputs, lengths)) / blocks
        if not online or len(online) > c.optimal_max_servers or blocks > c.optimal_max_blocks:
            return (0.0 if not online else None), bound
        try:
            return optimal_bottleneck(throughputs, lengths, blocks), bound
        except PlacementError:
            return None, bound

    def _sessions(self) -> list[Session]:
        return [*self.finished, *sorted(self.runner.active.values(), key=lambda s: s.id)]

    def _speed(self, s: Session) -> float:
        """Positions a session kept per second of its life so far (restarts count against
        it); sessions still running at the end count with what they have."""
        end = s.finished_at if s.state in ("done", "failed") else self.sim.now
        return s.position / max(end - s.started, 1e-9)

    def _metrics(self, tokens0: int, kept0: int) -> dict[str, object]:
        c = self.config
        finished = self.finished
        completed = [s for s in finished if s.state == "done"]
        failed = [s for s in finished if s.state == "failed"]
        bottleneck_final, coverage_final = self._coverage()
        optimum, bound = self._optimum()
        tokens = self.runner.tokens_done - tokens0
        causes = self.runner.failure_causes
        m: dict[str, object] = {
            "scenario": self.name,
            "seed": c.seed,
            "servers": c.servers,
            "blocks": c.model.num_blocks,
            "duration_s": c.duration,
            "churn": c.churn.kind,
            "recovery": c.recovery,
            "step_failure_prob": c.step_failure_prob,
            "session_rate": c.session_rate,
            "online_servers_final": sum(1 for s in self.fleet.servers if s.online),
            "bottleneck_throughput_mean": mean(self._bottlenecks),
            "bottleneck_throughput_final": bottleneck_final,
            "bottleneck_optimal_final": optimum,
            "bottleneck_ratio_to_optimal": (
                None if optimum is None else ratio(bottleneck_final, optimum)
            ),
            "bottleneck_upper_bound_final": bound,
            "bottleneck_ratio_to_upper_bound": ratio(bottleneck_final, bound),
            "coverage_min_mean": mean(self._coverage_mins),
            "coverage_min_final": min(coverage_final),
            "full_coverage_fraction": ratio(
                sum(1 for n in self._coverage_mins if n > 0), len(self._coverage_mins)
            ),
            "sessions_started": self.started,
            "sessions_completed": len(completed),
            "sessions_failed": len(failed),
            "sessions_running_end": len(self.runner.active),
            "session_completion_rate": ratio(len(completed), len(completed) + len(failed)),
            "step_failures": sum(causes.values()),
            "recoveries": sum(s.recoveries for s in finished)
            + sum(s.recoveries for s in self.runner.active.values()),
            "restarts": sum(s.restarts for s in finished)
            + sum(s.restarts for s in self.runner.active.values()),
            "replayed_tokens": sum(s.replayed for s in finished)
            + sum(s.replayed for s in self.runner.active.values()),
            "discarded_tokens": sum(s.discarded for s in finished)
            + sum(s.discarded for s in self.runner.active.values()),
            "tokens_computed": tokens,
            "tokens_computed_per_s": tokens / c.duration,
            "tokens_per_s": (self.runner.tokens_kept - kept0) / c.duration,
            "announce_bytes": self.directory.announce_bytes,
            "network_bytes": self.network.bytes_sent,
            "events": self.sim.events,
            "events_skipped": self.sim.skipped,
        }
        for cause, n in sorted(causes.items()):
            m[f"failures_{cause}"] = n
        m.update(summarize("session_tokens_per_s", [self._speed(s) for s in self._sessions()],
                           qs=(50,)))
        m.update(summarize("session_duration", [s.finished_at - s.started for s in completed],
                           qs=(50, 90), suffix="_s"))
        m.update(summarize("step_latency", self.runner.step_latencies, qs=(50, 90, 99),
                           suffix="_s"))
        return m

