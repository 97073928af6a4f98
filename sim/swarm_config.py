"""Configuration of the `swarm` scenario: the model, the server hardware classes, the load.

Hardware figures are ours and illustrative (orders of magnitude for a 70B model in 4-bit
weights, 16-bit activations), not measurements; change them with `--set`. What they must get
right is the shape of the problem: a few big servers holding many blocks, many small ones,
compute-bound consumer cards and a slow network at home.

Pure data.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from blocks.placement import BALANCE_QUALITY, MEAN_BALANCE_CHECK_PERIOD
from sim.checks import (
    MAX_MODEL_BLOCKS,
    MAX_SAMPLES,
    MAX_SESSIONS,
    MAX_SWARM_SERVERS,
    at_most,
    fraction,
    non_negative,
    positive,
)
from sim.churn import ChurnConfig
from sim.network import NetworkConfig
from tensor_wire.layout import effective_compression

# Llama-2-70B: 80 decoder blocks, hidden size 8192 (its config.json).
LLAMA2_70B_BLOCKS = 80
LLAMA2_70B_HIDDEN = 8192
# Petals' client refreshes its view of the swarm every minute
# (RemoteSequenceManager / ClientConfig update_period = 60 s).
VIEW_REFRESH_PERIOD = 60.0
# Ours: a server's sessions last hours; Weibull sessions of scale 4 h (shape from S&R 2006).
SERVER_SESSION_SCALE = 4 * 3600.0


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str = "llama-2-70b"
    num_blocks: int = LLAMA2_70B_BLOCKS
    hidden_size: int = LLAMA2_70B_HIDDEN
    dtype: str = "float16"  # of the activations on the wire
    compression: str = "none"

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.hidden_size < 1:
            raise ValueError("num_blocks and hidden_size must be at least 1")
        at_most(MAX_MODEL_BLOCKS, "model blocks", self.num_blocks)
        effective_compression(self.dtype, self.compression)  # WireError (a ValueError)


@dataclass(frozen=True, slots=True)
class ServerClass:
    """One kind of server: how many blocks it holds and how fast it runs them."""

    name: str
    share: float  # fraction of servers of this class
    num_blocks: int
    inference_rps: float  # tokens/s through one block, one-token steps
    forward_rps: float  # tokens/s through one block, long passes (prefill, replay)
    bandwidth_bps: float  # up and down
    cache_tokens: int  # attention-cache positions, all sessions together

    def network_rps(self, hidden_size: int) -> float:
        """Tokens/s of 16-bit hidden states the link carries."""
        return self.bandwidth_bps / 8.0 / (2.0 * hidden_size)

    def throughput(self, hidden_size: int, num_blocks: int | None = None) -> float:
        """What it announces (blocks/announcement.py): forward tokens/s through its span,
        capped by the network (as blocks/throughput.py computes it)."""
        span = num_blocks or self.num_blocks
        return min(self.forward_rps / span, self.network_rps(hidden_size))


DEFAULT_SERVER_CLASSES = (
    ServerClass("a100-80gb", 0.2, 40, 600.0, 24_000.0, 1e9, 65_536),
    ServerClass("rtx3090-24gb", 0.5, 12, 250.0, 6_000.0, 100e6, 16_384),
    ServerClass("t4-16gb", 0.3, 8, 100.0, 1_500.0, 200e6, 8_192),
)


@dataclass(frozen=True, slots=True)
class SwarmScenarioConfig:
    servers: int = 30
    duration: float = 1800.0
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    classes: tuple[ServerClass, ...] = DEFAULT_SERVER_CLASSES
    churn: ChurnConfig = field(
        default_factory=lambda: ChurnConfig(
            "none", scale=SERVER_SESSION_SCALE, down_scale=SERVER_SESSION_SCALE / 4
        )
    )
    network: NetworkConfig = field(default_factory=lambda: NetworkConfig(latency="regions"))
    # Departures: graceful ones announce OFFLINE; of the others (crashes), silent ones never
    # answer (clients notice after step_timeout), the rest refuse connections at once.
    graceful_fraction: float = 0.5
    silent_fraction: float = 0.5
    start_spread: float = 60.0  # servers first come up uniformly within this many seconds
    load_seconds_per_block: float = 2.0  # ours: reading 4-bit weights of one 70B block
    balance_quality: float = BALANCE_QUALITY
    balance_check_period: float = MEAN_BALANCE_CHECK_PERIOD
    rebalance: bool = True
    # Clients: sessions arrive as a Poisson process.
    session_rate: float = 0.02  # per second
    min_tokens: int = 128
    max_tokens: int = 2048
    prompt_tokens: int = 32
    recovery: str = "replay"  # replay | restart
    step_failure_prob: float = 0.0  # per hop: the activations fail to reach the next server
    step_timeout: float = 60.0  # client/inference.py SessionConfig.step_timeout
    session_timeout: float = 3600.0  # a session gives up after this long
    view_refresh: float = VIEW_REFRESH_PERIOD
    warmup: float = 300.0  # servers place themselves before clients arrive and we measure
    sample_interval: float = 30.0
    # The exact optimum (a branch-and-bound search) is attempted only on instances this
    # small; beyond, the capacity bound stands in (the search budget would run out).
    optimal_max_servers: int = 10
    optimal_max_blocks: int = 24

    def __post_init__(self) -> None:
        if self.servers < 1:
            raise ValueError("a swarm needs at least one server")
        if not self.duration > 0 or not self.sample_interval > 0:
            raise ValueError("duration and sample_interval must be positive seconds")
        if not self.session_rate >= 0 or not self.warmup >= 0:
            raise ValueError("session_rate and warmup must not be negative")
        positive(duration=self.duration, sample_interval=self.sample_interval,
                 balance_check_period=self.balance_check_period,
                 step_timeout=self.step_timeout, session_timeout=self.session_timeout)
        non_negative(session_rate=self.session_rate, warmup=self.warmup,
                     start_spread=self.start_spread,
                     load_seconds_per_block=self.load_seconds_per_block,
                     balance_quality=self.balance_quality, view_refresh=self.view_refresh)
        fraction(graceful_fraction=self.graceful_fraction,
                 silent_fraction=self.silent_fraction)
        at_most(MAX_SWARM_SERVERS, "servers", self.servers)
        at_most(MAX_SESSIONS, "sessions (session_rate x duration)",
                self.session_rate * self.duration)
        at_most(MAX_SAMPLES, "samples (duration / sample_interval)",
                self.duration / self.sample_interval)
        self.churn.check_within(self.duration)
        if self.recovery not in ("replay", "restart"):
            raise ValueError(f"recovery must be replay or restart, got {self.recovery!r}")
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError("need 1 <= min_tokens <= max_tokens")
        if not 0 <= self.prompt_tokens < self.min_tokens:
            raise ValueError("prompt_tokens must be below min_tokens")
        if not 0.0 <= self.step_failure_prob < 1.0:
            raise ValueError("step_failure_prob must be in [0, 1)")
        # A server with room for more blocks than the model has serves the whole model
        # (Petals' Server caps num_blocks at the model's num_hidden_layers), so that a small
        # model (`--set model.num_blocks=24`) runs with the default classes.
        if any(c.num_blocks > self.model.num_blocks for c in self.classes):
            capped = tuple(replace(c, num_blocks=min(c.num_blocks, self.model.num_blocks))
                           for c in self.classes)
            object.__setattr__(self, "classes", capped)
