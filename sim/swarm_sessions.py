"""Client inference sessions of the swarm scenario, with the real route choice and recovery.

A session generates `tokens` positions: a prompt pass, then one token per step. Each step
travels client -> server 1 -> server 2 -> ... -> client: every hop pays the modelled network
(message sizes from tensor_wire.sizes) and waits for the server's GPU, which runs one request
at a time; compute is blocks x tokens / rate (inference_rps for one token, forward_rps for
longer passes). Routes come from `client.routing.RoutePlanner.inference_route` over the
swarm view the client last read; bans and retry delays from `client.recovery`.

When a hop fails (server gone, moved, refused, or an injected failure with probability
`step_failure_prob` per hop, the setting of the Petals paper's Table 1), the client bans the
server and either
- "replay": re-routes exactly the failed span (`inference_route` over its blocks,
  `splice_route`), sends the new servers the inputs it kept for that span, and resumes the
  step there: the new servers recompute their attention caches from that history; or
- "restart": drops the whole chain and generates again from the first position.
A silent server is noticed after `step_timeout`, a refusal after one round trip.

Pure: no I/O, no clock; the Simulator's clock and random source only.
"""

from __future__ import annotations

from collections.abc import Callable

from blocks.announcement import SwarmView
from client.recovery import BanList, RetryPolicy, splice_route
from client.routing import MissingBlocksError, RouteNeeds, RoutePlanner, RouteSpan
from sim.engine import Simulator
from sim.network import NetworkModel
from sim.swarm_config import SwarmScenarioConfig
from sim.swarm_servers import Directory, ServerFleet, SimServer
from tensor_wire.sizes import TensorSpec, message_size

# Bytes of the msgpack meta map of one step ({"position": ..., "step": ...}).
_STEP_META_BYTES = 24


class Session:
    """One client's inference session (its own node in the network model)."""

    __slots__ = (
        "attempt", "bans", "client", "deadline", "discarded", "epochs", "failures",
        "finished_at", "history",
        "id", "position", "recoveries", "replayed", "restarts", "route", "rtts",
        "started", "state", "step_started", "step_tokens", "steps", "token", "tokens",
        "view", "view_at",
    )

    def __init__(self, sid: int, client: int, tokens: int, now: float, deadline: float):
        self.id = sid
        self.client = client
        self.tokens = tokens
        self.started = now
        self.finished_at = now
        self.deadline = deadline
        self.position = 0
        self.route: list[RouteSpan] = []
        self.epochs: list[int] = []  # server epoch at the time each span was opened
        self.history: list[bool] = []  # per span: must be sent the inputs so far first
        self.bans = BanList()
        self.attempt = 0
        self.token = 0  # bumped to void the events of an aborted step
        self.state = "opening"  # opening | running | done | failed
        self.view: SwarmView | None = None
        self.view_at = -1e18
        self.rtts: dict[str, float] = {}
        self.step_started = now
        self.step_tokens = 0
        self.steps = 0
        self.failures = 0
        self.recoveries = 0
        self.restarts = 0
        self.replayed = 0  # positions recomputed by replacement servers
        self.discarded = 0  # positions thrown away by restarts


class SessionRunner:
    """Starts sessions and carries their steps, failures and recoveries."""

    def __init__(self, sim: Simulator, network: NetworkModel, fleet: ServerFleet,
                 directory: Directory, config: SwarmScenarioConfig,
                 on_finish: Callable[[Session], None]):
        self.sim = sim
        self.network = network
        self.fleet = fleet
        self.directory = directory
        self.config = config
        self.on_finish = on_finish
        self.retry = RetryPolicy(sim.rng)
        self.active: dict[int, Session] = {}
        self._next_id = 0
        self._planner: tuple[SwarmView, RoutePlanner] | None = None
        self._sizes: dict[int, int] = {}
        self.tokens_done = 0  # positions computed by completed steps
        self.tokens_kept = 0  # ... minus those a restart threw away
        self.step_latencies: list[float] = []
        self.failure_causes = {"injected": 0, "down": 0, "moved": 0, "refused": 0, "lost": 0}

    # -- arrivals -----------------------------------------------------------------------------

    def arrive(self, tokens: int) -> None:
        """A client arrives now and wants a session of `tokens` positions."""
        c, now = self.config, self.sim.now
        client = self.network.add_node()
        s = Session(self._next_id, client, tokens, now, now + c.session_timeout)
        self._next_id += 1
        self.active[s.id] = s
        self._open(s, s.token)

    # -- helpers ------------------------------------------------------------------------------

    def _planner_for(self, s: Session, force: bool = False) -> RoutePlanner:
        now = self.sim.now
        if force or s.view is None or now - s.view_at >= self.config.view_refresh:
            view = self.directory.view(now)
            if view is not s.view:
                # The client's round trips to the servers it can see (a pair's latency is
                # fixed for the run: each is measured once; peers out of view are never asked).
                rtts = s.rtts
                for peer in view.servers:
                    if peer not in rtts:
                        rtts[peer] = self.network.rtt(s.client, self.fleet.by_peer[peer].index)
            s.view, s.view_at = view, now
        cached = self._planner
        if cached is None or cached[0] is not s.view:
            cached = self._planner = (s.view, RoutePlanner(s.view))  # type: ignore[arg-type]
        return cached[1]

    def _size(self, tokens: int) -> int:
        size = self._sizes.get(tokens)
        if size is None:
            m = self.config.model
            spec = TensorSpec((1, tokens, m.hidden_size), m.dtype, m.compression)
            size = self._sizes[tokens] = message_size([spec], _STEP_META_BYTES)
        return size

    def _server(self, span: RouteSpan) -> SimServer:
        return self.fleet.by_peer[span.peer_id]

    def _connect(self, s: Session, spans: list[RouteSpan]) -> tuple[int | None, float]:
        """Open the session on every server of `spans` at once. Returns (None, seconds the
        opening takes) and reserves their caches, or (index of the first span refused,
        seconds until the client knows)."""
        worst = 0.0
        for i, span in enumerate(spans):
            server = self._server(span)
            rtt = self.network.rtt(s.client, server.index)
            if not server.up:
                return i, self.config.step_timeout if server.silent else rtt
            free = server.cls.cache_tokens - server.cache_used
            if not server.online or not server.start <= span.start < span.end <= server.end \
                    or free < s.tokens:
                return i, rtt
            worst = max(worst, rtt)
        for span in spans:
            self._server(span).cache_used += s.tokens
        return None, worst

    def _release(self, s: Session, indices: range | list[int]) -> None:
        for j in indices:
            server = self._server(s.route[j])
            if server.epoch == s.epochs[j] and server.up:
                server.cache_used = max(0, server.cache_used - s.tokens)

    def _retry(self, s: Session, then: Callable[..., None], *args: object) -> None:
        delay = self.retry.next_delay(
            s.attempt, self.sim.now, s.deadline, wake_at=s.bans.next_unban(self.sim.now)
        )
        s.attempt += 1
        if delay is None:
            self._finish(s, "failed")
            return
        self.sim.after(delay, then, s, s.token, *args)

    def _needs(self, s: Session) -> RouteNeeds:
        return RouteNeeds(cache_tokens=s.tokens)

    # -- opening (and restarting) --------------------------------------------------------------

    def _open(self, s: Session, token: int) -> None:
        if token != s.token or s.state in ("done", "failed"):
            self.sim.skip()
            return
        now = self.sim.now
        planner = self._planner_for(s, force=s.attempt > 0)
        try:
            route = planner.inference_route(
                0, self.config.model.num_blocks, client_rtts=s.rtts,
                banned=s.bans.banned(now), needs=self._needs(s),
            )
        except MissingBlocksError:
            self._retry(s, self._open)
            return
        bad, delay = self._connect(s, route)
        if bad is not None:
            s.bans.ban(route[bad].peer_id, now)
            self.failure_causes["refused"] += 1
            self.sim.after(delay, self._retry_later, s, s.token, self._open)
            return
        s.route = route
        s.epochs = [self._server(span).epoch for span in route]
        s.history = [False] * len(route)
        s.attempt = 0
        s.state = "running"
        self.sim.after(delay, self._begin_step, s, s.token)

    def _retry_later(self, s: Session, token: int, then: Callable[..., None],
                     *args: object) -> None:
        """The client learnt of a refusal: schedule the next attempt per the retry policy."""
        if token != s.token or s.state in ("done", "failed"):
            self.sim.skip()
            return
        self._retry(s, then, *args)

    # -- steps ----------------------------------------------------------------------------------

    def _begin_step(self, s: Session, token: int) -> None:
        if token != s.token or s.state != "running":
            self.sim.skip()
            return
        s.token += 1
        prompt = self.config.prompt_tokens
        s.step_tokens = prompt if s.position == 0 and prompt > 0 else 1
        s.step_started = self.sim.now
        self._send(s, 0, s.client, self.sim.now)

    def _hop_tokens(self, s: Session, j: int) -> int:
        return s.step_tokens + (s.position if s.history[j] else 0)

    def _send(self, s: Session, j: int, src: int, at: float) -> None:
        """Ship the input of span j from node `src`, leaving at time `at`."""
        server = self.fleet.by_peer[s.route[j].peer_id]  # _server and _hop_tokens, inlined
        tokens = s.step_tokens + (s.position if s.history[j] else 0)
        arrival = self.network.transfer(src, server.index, self._size(tokens), at)
        if arrival is None:  # dropped: the client notices when the step times out
            self._fail(s, j, at + self.config.step_timeout, "lost")
            return
        self.sim.at(arrival, self._hop, s, s.token, j)

    def _hop(self, s: Session, token: int, j: int) -> None:
        if token != s.token:
            self.sim.skip()
            return
        now = self.sim.now
        span = s.route[j]
        server = self.fleet.by_peer[span.peer_id]
        if server.epoch != s.epochs[j]:
            if not server.up and server.silent:
                self._fail(s, j, now + self.config.step_timeout, "down")
            else:
                back = self.network.one_way(server.index, s.client)
                self._fail(s, j, now + back, "down" if not server.up else "moved")
            return
        p = self.config.step_failure_prob
        if p and self.sim.rng.random() < p:
            self._fail(s, j, now + self.network.one_way(server.index, s.client), "injected")
            return
        tokens = s.step_tokens + (s.position if s.history[j] else 0)
        rate = server.cls.inference_rps if tokens == 1 else server.cls.forward_rps
        start = server.busy_until if server.busy_until > now else now
        done = start + (span.end - span.start) * tokens / rate
        server.busy_until = done
        if s.history[j]:
            s.history[j] = False
            s.replayed += s.position
        if j + 1 < len(s.route):
            self._send(s, j + 1, server.index, done)
            return
        arrival = self.network.transfer(server.index, s.client, self._size(s.step_tokens), done)
        if arrival is None:
            self._fail(s, j, done + self.config.step_timeout, "lost")
            return
        self.sim.at(arrival, self._step_done, s, s.token)

    def _step_done(self, s: Session, token: int) -> None:
        if token != s.token:
            self.sim.skip()
            return
        s.position += s.step_tokens
        s.steps += 1
        self.tokens_done += s.step_tokens
        self.tokens_kept += s.step_tokens
        self.step_latencies.append(self.sim.now - s.step_started)
        if s.position >= s.tokens:
            self._finish(s, "done")
        else:
            self._begin_step(s, s.token)

    # -- failures and recovery -----------------------------------------------------------------

    def _fail(self, s: Session, j: int, noticed_at: float, cause: str) -> None:
        s.token += 1  # whatever of this step is still in flight is void
        s.failures += 1
        self.failure_causes[cause] += 1
        self.sim.at(noticed_at, self._recover, s, s.token, j)

    def _recover(self, s: Session, token: int, j: int) -> None:
        if token != s.token or s.state != "running":
            self.sim.skip()
            return
        now = self.sim.now
        s.bans.ban(s.route[j].peer_id, now)
        if self.config.recovery == "restart":
            s.restarts += 1
            self._release(s, range(len(s.route)))
            s.route, s.epochs, s.history = [], [], []
            s.discarded += s.position
            self.tokens_kept -= s.position
            s.position = 0
            s.state = "opening"
            self._open(s, s.token)
            return
        s.recoveries += 1
        self._replace(s, s.token, j)

    def _replace(self, s: Session, token: int, j: int) -> None:
        """Replay recovery: re-route span j alone and resume the step there."""
        if token != s.token or s.state != "running":
            self.sim.skip()
            return
        now = self.sim.now
        old = s.route[j]
        planner = self._planner_for(s, force=s.attempt > 0)
        try:
            replacement = planner.inference_route(
                old.start, old.end, client_rtts=s.rtts, banned=s.bans.banned(now),
                needs=self._needs(s),
            )
        except MissingBlocksError:
            self._retry(s, self._replace, j)
            return
        bad, delay = self._connect(s, replacement)
        if bad is not None:
            s.bans.ban(replacement[bad].peer_id, now)
            self.failure_causes["refused"] += 1
            self.sim.after(delay, self._retry_later, s, s.token, self._replace, j)
            return
        self._release(s, [j])
        n = len(replacement)
        s.route = splice_route(s.route, j, replacement)
        s.epochs[j:j + 1] = [self._server(span).epoch for span in replacement]
        s.history[j:j + 1] = [s.position > 0] * n
        s.attempt = 0
        self._send(s, j, s.client, now + delay)

    def _finish(self, s: Session, outcome: str) -> None:
        if s.state in ("done", "failed"):
            return
        if s.route:
            self._release(s, range(len(s.route)))
        s.state = outcome
        s.finished_at = self.sim.now
        s.token += 1
        self.active.pop(s.id, None)
        self.on_finish(s)
