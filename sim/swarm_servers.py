"""Block servers of the swarm scenario: what they announce and how they place themselves.

`Directory` stands in for the DHT records of the model's blocks: one `ServerInfo` per server
with an expiration (ANNOUNCE_EXPIRATION after its last announcement), as a DHT get would
return them; expired records vanish, so a crashed server stays visible for up to two minutes,
exactly as with the real records. (The DHT lookups behind those reads are not simulated
here: the dht-* scenarios measure them.)

`ServerFleet` runs each server's life with the real rules of blocks/placement.py:
up -> wait `block_selection_delay` -> `choose_best_blocks` over the announced infos ->
announce JOINING -> load its span -> announce ONLINE -> re-announce every ANNOUNCE_PERIOD,
and every `balance_check_delay` ask `should_choose_other_blocks`; when it says so, drop the
span (its sessions break) and choose again. Down: a graceful exit announces OFFLINE, a crash
announces nothing and its record lingers until it expires.

Pure: no I/O, no clock; the Simulator's clock and random source only.
"""

from __future__ import annotations

from blocks.announcement import (
    ANNOUNCE_EXPIRATION,
    ANNOUNCE_PERIOD,
    MAX_NEXT_PINGS,
    ServerInfo,
    ServerState,
    SwarmView,
)
from blocks.placement import (
    balance_check_delay,
    block_selection_delay,
    choose_best_blocks,
    should_choose_other_blocks,
)
from overlay.identity import PeerId
from sim.engine import Simulator
from sim.network import NetworkModel
from sim.swarm_config import ServerClass, SwarmScenarioConfig


class Directory:
    """The announced records: peer id -> (info, expiration).

    The live records and the SwarmView built from them are cached until a record changes
    or expires; a re-announcement of an unchanged, unexpired record only extends its life.
    """

    __slots__ = ("_covering", "_infos", "_records", "_version", "_view", "announce_bytes",
                 "num_blocks")

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._records: dict[str, tuple[ServerInfo, float]] = {}
        self._version = 0
        # (version, earliest expiry among them, live records) and (version, view)
        self._infos: tuple[int, float, dict[str, ServerInfo]] | None = None
        self._view: tuple[int, SwarmView] | None = None
        self._covering: tuple[object, dict[int, list[str]]] = (None, {})  # (live dict, ...)
        self.announce_bytes = 0  # value bytes stored: one record per block of the span

    def announce(self, peer: str, info: ServerInfo, now: float) -> None:
        held = self._records.get(peer)
        if held is None or held[1] <= now or held[0] != info:
            self._version += 1
        self._records[peer] = (info, now + ANNOUNCE_EXPIRATION)
        self.announce_bytes += len(info.to_bytes()) * info.length

    def infos(self, now: float) -> dict[str, ServerInfo]:
        """Unexpired records, OFFLINE ones included (placement ignores those itself)."""
        cached = self._infos
        if cached is not None and cached[0] == self._version and now < cached[1]:
            return cached[2]
        live: dict[str, ServerInfo] = {}
        next_expiry = float("inf")
        for peer, (info, expires) in self._records.items():
            if expires > now:
                live[peer] = info
                next_expiry = min(next_expiry, expires)
            # An expired record is dropped from the cache: its next announcement is a change.
        self._version += 1
        self._infos = (self._version, next_expiry, live)
        return live

    def view(self, now: float) -> SwarmView:
        live = self.infos(now)
        cached = self._view
        if cached is None or cached[0] != self._version:
            cached = self._view = (self._version, SwarmView.from_servers(self.num_blocks, live))
        return cached[1]

    def covering(self, block: int, now: float) -> list[str]:
        """Peers whose live record holds `block`, in announcement order (kept per block
        until the live records change: every re-announcement asks)."""
        live = self.infos(now)
        cached = self._covering
        if cached[0] is not live:
            cached = self._covering = (live, {})
        peers = cached[1].get(block)
        if peers is None:
            peers = cached[1][block] = [p for p, i in live.items() if i.start <= block < i.end]
        return peers


class SimServer:
    """One server machine; `epoch` changes whenever the span it serves stops existing."""

    __slots__ = (
        "busy_until", "cache_used", "cls", "end", "epoch", "index", "moves", "peer",
        "silent", "start", "state", "up",
    )

    def __init__(self, peer: str, index: int, cls: ServerClass):
        self.peer = peer
        self.index = index  # its node in the network model
        self.cls = cls
        self.up = False
        self.state: ServerState | None = None  # None: up but not serving anything yet
        self.start = 0
        self.end = 0
        self.epoch = 0
        self.silent = False
        self.busy_until = 0.0  # the GPU runs one request at a time, first come first served
        self.cache_used = 0
        self.moves = 0

    @property
    def online(self) -> bool:
        return self.up and self.state == ServerState.ONLINE

    def throughput(self, hidden_size: int) -> float:
        return self.cls.throughput(hidden_size)


class ServerFleet:
    """All servers and their lifecycle."""

    def __init__(self, sim: Simulator, network: NetworkModel, config: SwarmScenarioConfig,
                 directory: Directory):
        self.sim = sim
        self.network = network
        self.config = config
        self.directory = directory
        self.servers: list[SimServer] = []
        self.by_peer: dict[str, SimServer] = {}
        self.moves = 0
        self.joins = 0
        self.departures = 0
        # peer -> (the covering list its pings were measured against, the pings)
        self._pings: dict[str, tuple[list[str], dict[str, float]]] = {}

    def add_servers(self) -> None:
        c, rng = self.config, self.sim.rng
        # Classes by largest remainder, so small swarms get the configured mix exactly.
        total = sum(cls.share for cls in c.classes)
        wanted = [cls.share / total * c.servers for cls in c.classes]
        counts = [int(w) for w in wanted]
        order = sorted(range(len(wanted)), key=lambda i: (counts[i] - wanted[i], i))
        for i in order[: c.servers - sum(counts)]:
            counts[i] += 1
        classes = [cls for cls, n in zip(c.classes, counts) for _ in range(n)]
        rng.shuffle(classes)
        for cls in classes:
            peer = str(PeerId.from_public_key(rng.randbytes(32)))
            bandwidth = (cls.bandwidth_bps, cls.bandwidth_bps)
            server = SimServer(peer, self.network.add_node(bandwidth), cls)
            self.servers.append(server)
            self.by_peer[peer] = server

    # -- lifecycle --------------------------------------------------------------------------

    def bring_up(self, i: int) -> None:
        server = self.servers[i]
        if server.up:
            return
        self.joins += 1
        server.up = True
        server.state = None
        server.epoch += 1
        server.cache_used = 0
        server.busy_until = self.sim.now
        self.sim.after(block_selection_delay(self.sim.rng), self._choose, server, server.epoch)

    def take_down(self, i: int) -> None:
        server = self.servers[i]
        if not server.up:
            return
        self.departures += 1
        rng, c = self.sim.rng, self.config
        graceful = rng.random() < c.graceful_fraction
        server.silent = not graceful and rng.random() < c.silent_fraction
        if graceful and server.state is not None:
            self._announce(server, ServerState.OFFLINE)
        server.up = False
        server.state = None
        server.epoch += 1

    def _choose(self, server: SimServer, epoch: int) -> None:
        if server.epoch != epoch:
            self.sim.skip()
            return
        now = self.sim.now
        infos = dict(self.directory.infos(now))
        infos.pop(server.peer, None)
        length = server.cls.num_blocks
        server.start = choose_best_blocks(length, infos, self.config.model.num_blocks)
        server.end = server.start + length
        server.state = ServerState.JOINING
        self._announce(server, ServerState.JOINING)
        load = self.config.load_seconds_per_block * length
        self.sim.after(load, self._loaded, server, epoch)

    def _loaded(self, server: SimServer, epoch: int) -> None:
        if server.epoch != epoch:
            self.sim.skip()
            return
        server.state = ServerState.ONLINE
        self._announce(server, ServerState.ONLINE)
        self.sim.after(ANNOUNCE_PERIOD, self._reannounce, server, epoch)
        if self.config.rebalance:
            delay = balance_check_delay(self.sim.rng, self.config.balance_check_period)
            self.sim.after(delay, self._balance_check, server, epoch)

    def _reannounce(self, server: SimServer, epoch: int) -> None:
        if server.epoch != epoch:
            self.sim.skip()
            return
        self._announce(server, ServerState.ONLINE)
        self.sim.after(ANNOUNCE_PERIOD, self._reannounce, server, epoch)

    def _balance_check(self, server: SimServer, epoch: int) -> None:
        if server.epoch != epoch:
            self.sim.skip()
            return
        c, now = self.config, self.sim.now
        infos = self.directory.infos(now)
        if should_choose_other_blocks(
            server.peer, infos, c.model.num_blocks, rng=self.sim.rng,
            balance_quality=c.balance_quality,
        ):
            self.moves += 1
            server.moves += 1
            self._announce(server, ServerState.OFFLINE)
            server.epoch += 1
            server.state = None
            server.cache_used = 0
            self._choose(server, server.epoch)  # it has just read the DHT: no delay
            return
        delay = balance_check_delay(self.sim.rng, c.balance_check_period)
        self.sim.after(delay, self._balance_check, server, epoch)

    # -- announcements ----------------------------------------------------------------------

    def info(self, server: SimServer, state: ServerState) -> ServerInfo:
        cls, hidden = server.cls, self.config.model.hidden_size
        return ServerInfo(
            state=state,
            start=server.start,
            end=server.end,
            throughput=cls.throughput(hidden),
            inference_rps=cls.inference_rps,
            forward_rps=cls.forward_rps,
            network_rps=cls.network_rps(hidden),
            cache_tokens_left=max(0, cls.cache_tokens - server.cache_used),
            dtype="bfloat16",
            quant="nf4",
            next_pings=self._next_pings(server) if state == ServerState.ONLINE else {},
        )

    def _announce(self, server: SimServer, state: ServerState) -> None:
        self.directory.announce(server.peer, self.info(server, state), self.sim.now)

    def _next_pings(self, server: SimServer) -> dict[str, float]:
        """Round trips to the servers holding the block after our span (Petals pings those
        to let clients chain servers)."""
        if server.end >= self.config.model.num_blocks:
            return {}
        covering = self.directory.covering(server.end, self.sim.now)
        known = self._pings.get(server.peer)
        if known is not None and known[0] == covering:  # the same servers: the same pings
            return known[1]
        pings: dict[str, float] = {}
        for peer in sorted(covering):
            if peer != server.peer and peer in self.by_peer:
                pings[peer] = self.network.rtt(server.index, self.by_peer[peer].index)
                if len(pings) >= MAX_NEXT_PINGS:
                    break
        self._pings[server.peer] = (covering, pings)  # ServerInfo copies what it is given
        return pings

    # -- what the scenario measures ---------------------------------------------------------

    def online_infos(self) -> dict[str, ServerInfo]:
        """The truth (not the announcements): servers ONLINE right now."""
        hidden = self.config.model.hidden_size
        return {
            s.peer: ServerInfo(ServerState.ONLINE, s.start, s.end, s.throughput(hidden))
            for s in self.servers
            if s.online
        }
