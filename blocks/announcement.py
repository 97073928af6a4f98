"""What a block server announces in the DHT for each block it serves, and the swarm view built
from those announcements (docs/block_protocol.md, "Finding servers").

For every block b of its span [start, end) a server stores, under key `f"{model_id}.{b}"`, a
subkey equal to its peer id (text) whose value is `ServerInfo.to_wire()`: a small msgpack map
with short keys. Records arrive from untrusted peers, so `ServerInfo.from_wire` checks every
type, range and size and raises `AnnouncementError` on anything malformed; `SwarmView` drops
(and reports) bad records instead of failing, so one broken server never hides the others.

Units (the same for every server, so that sums and comparisons mean something):
- `throughput`: tokens per second that the server adds to EVERY block of its span; the swarm
  as a whole can push at most min over blocks of the per-block sums through the model. Petals
  announces the same quantity: forward tokens/s of one block divided by the mean number of
  blocks a request uses on the server, capped by the network rate.
- `inference_rps`, `forward_rps`: measured tokens per second through ONE block, for
  single-token inference steps and for long forward passes; 1 / inference_rps is the compute
  time per block of one inference step (routing uses it).
- `network_rps`: tokens per second of hidden states (16-bit) the server's link carries.
- `cache_tokens_left`: attention-cache positions (batch x sequence length) the server can
  still allocate for a new session over its whole span.
- `next_pings`: round-trip seconds from this server to other servers (text peer ids);
  `math.inf` means "tried, unreachable".
- `max_request_tokens`: batch x length of the largest forward or inference step the server
  takes; clients cut their requests to fit. A record without it (an older server) means
  `DEFAULT_MAX_REQUEST_TOKENS`, what every server took before it was announced.
- `max_backward_tokens`: batch x length of the largest `blocks.backward` the server takes;
  absent means `DEFAULT_MAX_BACKWARD_TOKENS`, likewise.

Pure: no torch, no asyncio, no I/O, no clock.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from blocks.protocol import DEFAULT_MAX_BACKWARD_TOKENS, DEFAULT_MAX_REQUEST_TOKENS
from overlay.identity import IdentityError, PeerId
from overlay.multiaddr import Multiaddr, MultiaddrError

# Petals `Server(update_period=60)`: how often a server re-announces its blocks.
ANNOUNCE_PERIOD = 60.0
# Expiration = 2 x the update period, so one lost refresh does not drop a server
# (docs/block_protocol.md, "Finding servers").
ANNOUNCE_EXPIRATION = 2 * ANNOUNCE_PERIOD
# Version of the block-server protocol a record advertises; clients route only to their own.
PROTOCOL_VERSION = 1
# A DHT cannot list its keys: servers also register their model under this key (subkey = their
# peer id, so the record is signed), which is how `overlay-node status` finds the models.
MODELS_KEY = "overlay-node.models"

# Bounds on untrusted records (all far above what an honest server sends).
MAX_BLOCK_INDEX = 65_536
MAX_RATE = 1e12  # tokens/s; above this a number is garbage, not a fast GPU
MAX_CACHE_TOKENS = 1 << 48
MAX_REQUEST_TOKENS = 1 << 40
MAX_VERSION = 1 << 16
MAX_ADDRS = 16
MAX_ADAPTERS = 16
MAX_NEXT_PINGS = 64
MAX_LONG_TEXT = 256  # adapters, multiaddrs
MAX_SHORT_TEXT = 64  # dtype, quantization, public name
MAX_WIRE_KEYS = 32  # unknown keys are ignored (newer servers), but not without limit
MAX_RECORD_BYTES = 64 * 1024  # the DHT's own value limit (overlay.dht.config.StoreLimits)


class AnnouncementError(ValueError):
    """A server announcement that is malformed; the message says what is wrong."""


class ServerState(enum.IntEnum):
    """Lifecycle of a server's span; same numbering as Petals' ServerState."""

    OFFLINE = 0  # leaving: announced on a clean exit so clients stop at once
    JOINING = 1  # loading the span: counts for placement, not yet for routing
    ONLINE = 2  # serving


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """One server's announcement (the same value for every block of its span)."""

    state: ServerState
    start: int
    end: int  # exclusive
    throughput: float
    inference_rps: float | None = None
    forward_rps: float | None = None
    network_rps: float | None = None
    cache_tokens_left: int | None = None
    dtype: str = "float32"
    quant: str | None = None
    adapters: tuple[str, ...] = ()
    addrs: tuple[str, ...] = ()
    version: int = PROTOCOL_VERSION
    # Not part of the hash (a dict); frozen attribute, do not mutate the dict in place.
    next_pings: dict[str, float] = field(default_factory=dict, hash=False)
    public_name: str | None = None
    max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS
    max_backward_tokens: int = DEFAULT_MAX_BACKWARD_TOKENS

    def __post_init__(self) -> None:
        # Cheap invariants, checked for every construction (the simulator's too).
        if not isinstance(self.state, ServerState):
            object.__setattr__(self, "state", _state(self.state))
        # Own copies, so that no caller can change a frozen record behind our back.
        object.__setattr__(self, "adapters", tuple(self.adapters))
        object.__setattr__(self, "addrs", tuple(self.addrs))
        object.__setattr__(self, "next_pings", dict(self.next_pings))
        if not 0 <= self.start < self.end <= MAX_BLOCK_INDEX:
            raise AnnouncementError(f"span [{self.start}, {self.end}) is empty or out of range")
        _rate("throughput", self.throughput)
        for name in ("inference_rps", "forward_rps", "network_rps"):
            value = getattr(self, name)
            if value is not None:
                _rate(name, value)
        if self.cache_tokens_left is not None and not (
            0 <= self.cache_tokens_left <= MAX_CACHE_TOKENS
        ):
            raise AnnouncementError(f"cache_tokens_left out of range: {self.cache_tokens_left}")
        if not 1 <= self.max_request_tokens <= MAX_REQUEST_TOKENS:
            raise AnnouncementError(f"max_request_tokens out of range: {self.max_request_tokens}")
        if not 1 <= self.max_backward_tokens <= MAX_REQUEST_TOKENS:
            raise AnnouncementError(f"max_backward_tokens out of range: "
                                    f"{self.max_backward_tokens}")
        if not 1 <= self.version <= MAX_VERSION:
            raise AnnouncementError(f"protocol version out of range: {self.version}")
        if len(self.addrs) > MAX_ADDRS or len(self.adapters) > MAX_ADAPTERS:
            raise AnnouncementError("too many addresses or adapters")
        if len(self.next_pings) > MAX_NEXT_PINGS:
            raise AnnouncementError(f"more than {MAX_NEXT_PINGS} next_pings")
        for rtt in self.next_pings.values():
            if not rtt >= 0:  # rejects NaN too; +inf means unreachable
                raise AnnouncementError(f"next_pings round-trip time must be >= 0, got {rtt}")

    @property
    def length(self) -> int:
        return self.end - self.start

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-friendly map stored in the DHT; optional fields left out when unset."""
        wire: dict[str, Any] = {
            "st": int(self.state),
            "sp": [self.start, self.end],
            "tp": float(self.throughput),
            "dt": self.dtype,
            "v": self.version,
            "mt": self.max_request_tokens,
            "mb": self.max_backward_tokens,
        }
        optional = {
            "ir": self.inference_rps,
            "fr": self.forward_rps,
            "nr": self.network_rps,
            "ct": self.cache_tokens_left,
            "q": self.quant,
            "pn": self.public_name,
        }
        for key, value in optional.items():
            if value is not None:
                wire[key] = float(value) if isinstance(value, float) else value
        if self.adapters:
            wire["ad"] = list(self.adapters)
        if self.addrs:
            wire["ma"] = list(self.addrs)
        if self.next_pings:
            wire["np"] = {peer: float(rtt) for peer, rtt in self.next_pings.items()}
        return wire

    def to_bytes(self) -> bytes:
        return msgpack.packb(self.to_wire(), use_bin_type=True)

    @classmethod
    def from_wire(cls, obj: object) -> ServerInfo:
        """Parse an untrusted, msgpack-decoded announcement; AnnouncementError if malformed."""
        if not isinstance(obj, dict):
            raise AnnouncementError(f"announcement must be a map, got {type(obj).__name__}")
        if len(obj) > MAX_WIRE_KEYS:
            raise AnnouncementError(f"announcement has more than {MAX_WIRE_KEYS} keys")
        if not all(isinstance(key, str) for key in obj):
            raise AnnouncementError("announcement keys must be strings")
        for key in ("st", "sp", "tp"):
            if key not in obj:
                raise AnnouncementError(f"announcement lacks required key {key!r}")
        span = obj["sp"]
        if not isinstance(span, list | tuple) or len(span) != 2:
            raise AnnouncementError("span must be a list [start, end]")
        return cls(
            state=_state(obj["st"]),
            start=_int("start", span[0], 0, MAX_BLOCK_INDEX),
            end=_int("end", span[1], 0, MAX_BLOCK_INDEX),
            throughput=_float("throughput", obj["tp"]),
            inference_rps=_optional(obj, "ir", _float),
            forward_rps=_optional(obj, "fr", _float),
            network_rps=_optional(obj, "nr", _float),
            cache_tokens_left=_optional(
                obj, "ct", lambda n, v: _int(n, v, 0, MAX_CACHE_TOKENS)
            ),
            dtype=_text("dtype", obj.get("dt", "float32"), MAX_SHORT_TEXT),
            quant=_optional(obj, "q", lambda n, v: _text(n, v, MAX_SHORT_TEXT)),
            adapters=_text_list("adapters", obj.get("ad", ()), MAX_ADAPTERS),
            addrs=_addrs(obj.get("ma", ())),
            version=_int("version", obj.get("v", PROTOCOL_VERSION), 1, MAX_VERSION),
            next_pings=_next_pings(obj.get("np", {})),
            public_name=_optional(obj, "pn", lambda n, v: _text(n, v, MAX_SHORT_TEXT)),
            max_request_tokens=_int("max_request_tokens",
                                    obj.get("mt", DEFAULT_MAX_REQUEST_TOKENS), 1,
                                    MAX_REQUEST_TOKENS),
            max_backward_tokens=_int("max_backward_tokens",
                                     obj.get("mb", DEFAULT_MAX_BACKWARD_TOKENS), 1,
                                     MAX_REQUEST_TOKENS),
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> ServerInfo:
        """Decode and validate a record value as stored in the DHT."""
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise AnnouncementError(f"record value must be bytes, got {type(raw).__name__}")
        if len(raw) > MAX_RECORD_BYTES:
            raise AnnouncementError(f"record value larger than {MAX_RECORD_BYTES} bytes")
        try:
            obj = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception as e:  # msgpack raises several unrelated types on garbage
            raise AnnouncementError(f"record value is not valid msgpack: {e}") from None
        return cls.from_wire(obj)


def block_keys(model_id: str, start: int, end: int) -> list[str]:
    """DHT keys of blocks [start, end) of `model_id`: `f"{model_id}.{block}"`."""
    if not model_id:
        raise ValueError("model_id must not be empty")
    if not 0 <= start <= end:
        raise ValueError(f"bad block range [{start}, {end})")
    return [f"{model_id}.{block}" for block in range(start, end)]


# -- the swarm as seen from the DHT ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServedSpan:
    """Blocks [start, end) found announced by `peer_id`, with the announcement found there."""

    peer_id: str
    start: int
    end: int
    info: ServerInfo

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class RejectedRecord:
    """A record the view left out, and why (for the caller's logs)."""

    block: int
    peer_id: str
    reason: str


class SwarmView:
    """An immutable snapshot of who serves which block: Petals' per-block `ModuleInfos`, plus
    the contiguous spans they form and one info per server.

    A peer is counted for block b only where a record for b was found, so a server whose
    record for one block is missing is treated as two spans around the gap, not as covering
    it. `servers` keeps one info per peer (its longest non-offline span) for placement.
    """

    __slots__ = ("_covering", "num_blocks", "servers", "spans")

    def __init__(self, num_blocks: int, spans: Iterable[ServedSpan]):
        if not 0 < num_blocks <= MAX_BLOCK_INDEX:
            raise ValueError(f"num_blocks out of range: {num_blocks}")
        self.num_blocks = num_blocks
        ordered = sorted(spans, key=lambda s: (s.start, s.peer_id, s.end))
        covering: list[list[ServedSpan]] = [[] for _ in range(num_blocks)]
        best: dict[str, ServedSpan] = {}
        for span in ordered:
            if not 0 <= span.start < span.end <= num_blocks:
                raise ValueError(f"span [{span.start}, {span.end}) outside the model")
            for block in range(span.start, span.end):
                covering[block].append(span)
            held = best.get(span.peer_id)
            if held is None or _primary_rank(span) > _primary_rank(held):
                best[span.peer_id] = span
        self.spans: tuple[ServedSpan, ...] = tuple(ordered)
        self._covering = tuple(tuple(c) for c in covering)
        self.servers: dict[str, ServerInfo] = {peer: s.info for peer, s in best.items()}

    def covering(self, block: int) -> tuple[ServedSpan, ...]:
        """The spans that contain `block`, ordered by (start, peer id)."""
        return self._covering[block]

    def block_servers(self, block: int) -> dict[str, ServerInfo]:
        """The `{peer_id: ServerInfo}` map of one block, as the DHT key holds it."""
        return {span.peer_id: span.info for span in self._covering[block]}

    def coverage(self, states: frozenset[ServerState] = frozenset({ServerState.ONLINE})
                 ) -> list[int]:
        """Number of distinct servers per block whose state is in `states`."""
        return [
            len({s.peer_id for s in spans if s.info.state in states}) for spans in self._covering
        ]

    @classmethod
    def from_servers(cls, num_blocks: int, servers: Mapping[str, ServerInfo]) -> SwarmView:
        """A view in which every server covers exactly its announced span (the simulator's)."""
        return cls(
            num_blocks,
            (ServedSpan(peer, info.start, info.end, info) for peer, info in servers.items()),
        )

    @classmethod
    def from_block_records(
        cls, num_blocks: int, records: Mapping[int, Mapping[str, object]]
    ) -> tuple[SwarmView, list[RejectedRecord]]:
        """Build the view from DHT get results: per block, `{peer id text: value}` where the
        value is record bytes, a decoded wire map, or a ServerInfo.

        Records that are malformed, whose span does not contain the block they were found
        under, or that lie outside the model are rejected and returned, never raised.
        """
        rejected: list[RejectedRecord] = []
        # (peer, announced span) -> {block: info}; runs of consecutive blocks become spans.
        found: dict[tuple[str, int, int], dict[int, ServerInfo]] = {}
        # A server stores the same bytes under each of its blocks: parse them once.
        parsed: dict[bytes, ServerInfo | AnnouncementError] = {}
        for block, entries in records.items():
            if not isinstance(block, int) or not 0 <= block < num_blocks:
                for peer in entries:
                    rejected.append(RejectedRecord(-1, str(peer), f"block {block!r} not in model"))
                continue
            for peer, value in entries.items():
                if isinstance(value, bytes) and value in parsed:
                    outcome = parsed[value]
                else:
                    try:
                        outcome = _as_info(value)
                    except AnnouncementError as e:
                        outcome = e
                    if isinstance(value, bytes):
                        parsed[value] = outcome
                if isinstance(outcome, AnnouncementError):
                    rejected.append(RejectedRecord(block, str(peer), str(outcome)))
                    continue
                info = outcome
                if not info.start <= block < info.end:
                    reason = f"span [{info.start}, {info.end}) does not contain block {block}"
                    rejected.append(RejectedRecord(block, peer, reason))
                    continue
                if info.end > num_blocks:
                    reason = f"span [{info.start}, {info.end}) exceeds {num_blocks} blocks"
                    rejected.append(RejectedRecord(block, peer, reason))
                    continue
                found.setdefault((peer, info.start, info.end), {})[block] = info
        spans: list[ServedSpan] = []
        for (peer, _, _), by_block in found.items():
            blocks = sorted(by_block)
            run_start = prev = blocks[0]
            for block in [*blocks[1:], None]:
                if block is not None and block == prev + 1:
                    prev = block
                    continue
                spans.append(ServedSpan(peer, run_start, prev + 1, by_block[run_start]))
                if block is not None:
                    run_start = prev = block
        return cls(num_blocks, spans), rejected


def _primary_rank(span: ServedSpan) -> tuple[bool, int, int]:
    """Which of a peer's spans stands for it: not offline, then highest state, then longest."""
    return (span.info.state != ServerState.OFFLINE, int(span.info.state), span.length)


def _as_info(value: object) -> ServerInfo:
    if isinstance(value, ServerInfo):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return ServerInfo.from_bytes(bytes(value))
    return ServerInfo.from_wire(value)


# -- validation of untrusted fields ------------------------------------------------------------


def _state(value: object) -> ServerState:
    if type(value) is not int and not isinstance(value, ServerState):
        raise AnnouncementError(f"state must be an integer, got {type(value).__name__}")
    try:
        return ServerState(value)
    except ValueError:
        raise AnnouncementError(f"unknown server state {value}") from None


def _int(name: str, value: object, low: int, high: int) -> int:
    if type(value) is not int:  # bool is an int subclass: refuse it too
        raise AnnouncementError(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise AnnouncementError(f"{name} out of range [{low}, {high}]: {value}")
    return value


def _float(name: str, value: object) -> float:
    if type(value) not in (float, int):
        raise AnnouncementError(f"{name} must be a number, got {type(value).__name__}")
    return _rate(name, float(value))


def _rate(name: str, value: float) -> float:
    if not 0.0 <= value <= MAX_RATE:  # also rejects NaN and infinities
        raise AnnouncementError(f"{name} must be finite and in [0, {MAX_RATE:g}], got {value}")
    return value


def _text(name: str, value: object, max_chars: int) -> str:
    if not isinstance(value, str):
        raise AnnouncementError(f"{name} must be a string, got {type(value).__name__}")
    if not 0 < len(value) <= max_chars or not value.isprintable():
        raise AnnouncementError(f"{name} must be 1..{max_chars} printable characters")
    return value


def _text_list(name: str, value: object, max_items: int) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise AnnouncementError(f"{name} must be a list, got {type(value).__name__}")
    if len(value) > max_items:
        raise AnnouncementError(f"more than {max_items} {name}")
    return tuple(_text(name, item, MAX_LONG_TEXT) for item in value)


def _addrs(value: object) -> tuple[str, ...]:
    addrs = _text_list("addrs", value, MAX_ADDRS)
    for addr in addrs:
        try:
            Multiaddr.parse(addr)
        except MultiaddrError as e:
            raise AnnouncementError(f"bad listen address: {e}") from None
    return addrs


def _next_pings(value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        raise AnnouncementError(f"next_pings must be a map, got {type(value).__name__}")
    if len(value) > MAX_NEXT_PINGS:
        raise AnnouncementError(f"more than {MAX_NEXT_PINGS} next_pings")
    pings: dict[str, float] = {}
    for peer, rtt in value.items():
        if not isinstance(peer, str) or len(peer) > MAX_SHORT_TEXT:
            raise AnnouncementError("next_pings keys must be peer ids")
        try:
            canonical = str(PeerId.from_string(peer))
        except IdentityError as e:
            raise AnnouncementError(f"next_pings: {e}") from None
        if canonical != peer:
            raise AnnouncementError(f"next_pings: non-canonical peer id {peer!r}")
        if type(rtt) not in (float, int) or not rtt >= 0:  # NaN fails `>= 0`
            raise AnnouncementError(f"next_pings round-trip time must be >= 0, got {rtt!r}")
        pings[peer] = float(rtt)
    return pings


def _optional(obj: dict[str, Any], key: str, parse: Any) -> Any:
    value = obj.get(key)
    return None if value is None else parse(key, value)
