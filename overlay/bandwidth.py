"""The bandwidth test every overlay node offers (overlay/PROTOCOL.md, "Bandwidth test"): its
messages, the node's admission rule and the tester's sizing. Pure: no asyncio, no clock, no
sockets; `now` is an argument. The asyncio side is overlay/bandwidth_service.py.

Rules of the node (the side that is tested):
1. One transfer at a time per node; a second one is refused with code `busy` at once, before
   its bulk data is read, so concurrent testers cannot stack up work.
2. A transfer moves at most `MAX_TRANSFER_BYTES`, and all transfers together at most
   `budget_bytes` per `budget_period` seconds (a token bucket); beyond it: `rate_limited`.
   A transfer that runs longer than `max_transfer_seconds` is reset (a stalled reader).
3. A request that is not a well-formed map of known fields and in-range sizes is refused
   with code `bad_request`; the node goes on serving.

The tester (the side that measures its link) does what a speed test does: a small probe, then
transfers sized from the rate seen so far to last `min_seconds`, up to `max_bytes`, inside a
time budget (`TransferSizer`); the link's figure is the lower of upload and download, as in
Petals (`measure_network_rps` takes min(download, upload) of its speed test).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

METHOD = "overlay.bandwidth"
VERSION = 1
UPLOAD = "upload"  # the tester sends `bytes` bytes; the node answers how many it got
DOWNLOAD = "download"  # the node sends `bytes` bytes
MAX_TRANSFER_BYTES = 16 << 20
CHUNK_BYTES = 256 << 10  # bulk data travels as messages of at most this size
MAX_TRANSFER_SECONDS = 10.0  # the node resets a transfer that runs longer (a stalled reader)

# Error codes (RemoteError.code) of the bandwidth test, beyond the transport's own.
BUSY = "busy"  # another transfer is running: ask again in a moment
RATE_LIMITED = "rate_limited"  # the node's budget is spent: ask another node
BAD_REQUEST = "bad_request"

MAX_MAP_FIELDS = 16  # unknown fields are ignored (forward compatibility), up to this many
# The request map's largest encoding: 16 fields of str keys and values of at most 64 chars.
MAX_REQUEST_BYTES = 1 + MAX_MAP_FIELDS * 2 * (2 + 64)


class BandwidthTestError(ValueError):
    """A request or answer that breaks the protocol; `code` is what the caller is told."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class TransferRequest:
    op: str  # UPLOAD or DOWNLOAD
    nbytes: int


def encode_request(op: str, nbytes: int) -> bytes:
    return msgpack.packb({"v": VERSION, "op": op, "bytes": nbytes})


def decode_request(data: bytes | None, max_bytes: int = MAX_TRANSFER_BYTES) -> TransferRequest:
    """The request map of an untrusted tester, checked field by field."""
    if data is None:
        raise BandwidthTestError(BAD_REQUEST, "the stream ended before the request")
    obj = _unpack_map(data, "request")
    if type(obj.get("v")) is not int or obj["v"] != VERSION:  # not 1.0, not true
        raise BandwidthTestError(BAD_REQUEST, f"unsupported version {obj.get('v')!r}")
    op, nbytes = obj.get("op"), obj.get("bytes")
    if op not in (UPLOAD, DOWNLOAD):
        raise BandwidthTestError(BAD_REQUEST, f"op must be {UPLOAD!r} or {DOWNLOAD!r}")
    if type(nbytes) is not int or not 0 < nbytes <= max_bytes:
        raise BandwidthTestError(BAD_REQUEST, f"bytes must be an integer in 1..{max_bytes}")
    return TransferRequest(op, nbytes)


def encode_received(nbytes: int) -> bytes:
    return msgpack.packb({"received": nbytes})


def decode_received(data: bytes | None) -> int:
    if data is None:
        raise BandwidthTestError(BAD_REQUEST, "the node closed the stream without an answer")
    received = _unpack_map(data, "answer").get("received")
    if type(received) is not int or received < 0:
        raise BandwidthTestError(BAD_REQUEST, "answer lacks a byte count")
    return received


def _unpack_map(data: bytes, what: str) -> dict:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=0,
                              max_array_len=0, max_map_len=MAX_MAP_FIELDS, max_str_len=64)
    except Exception as e:  # msgpack raises many types on hostile input
        raise BandwidthTestError(BAD_REQUEST, f"{what} is not a valid msgpack map: "
                                              f"{type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise BandwidthTestError(BAD_REQUEST, f"{what} must be a map")
    return obj


# -- the node: who may run a transfer now ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class GateConfig:
    max_transfer_bytes: int = MAX_TRANSFER_BYTES
    max_transfer_seconds: float = MAX_TRANSFER_SECONDS
    # 256 MiB a minute: about 36 Mbit/s on average at most spent on other peers' tests, yet
    # room for eight servers a minute each testing with 16 MiB per direction.
    budget_bytes: int = 256 << 20
    budget_period: float = 60.0


class TransferGate:
    """Admission of transfers on a node (rules 1 and 2 of this module)."""

    def __init__(self, config: GateConfig | None = None, now: float = 0.0):
        self.config = config or GateConfig()
        self._tokens = float(self.config.budget_bytes)
        self._updated = now
        self.active = False

    def admit(self, nbytes: int, now: float) -> tuple[str, str] | None:
        """None: the transfer may run (the slot is taken until `release`); else the error
        (code, message) to refuse it with."""
        if self.active:
            return BUSY, "another bandwidth test is running on this node; try again shortly"
        config = self.config
        rate = config.budget_bytes / config.budget_period
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(float(config.budget_bytes), self._tokens + elapsed * rate)
        self._updated = now
        if nbytes > self._tokens:
            wait = (nbytes - self._tokens) / rate
            return RATE_LIMITED, (f"this node's bandwidth-test budget is spent; try again in "
                                  f"{wait:.0f} s")
        self._tokens -= nbytes
        self.active = True
        return None

    def release(self) -> None:
        self.active = False


# -- the tester: how much to send, and what the link is -------------------------------------


@dataclass(frozen=True, slots=True)
class SpeedTestConfig:
    first_bytes: int = 64 << 10  # the probe: 0.5 s on a 1 Mbit/s link
    # A transfer that moves 8 MiB in under `min_seconds` shows a link of over 335 Mbit/s; the
    # figure matters only where it caps compute (network_rps = bps / (16 x hidden_size), so
    # 335 Mbit/s is 2,500 tokens/s of hidden size 8192), so larger transfers buy nothing.
    max_bytes: int = 8 << 20
    min_seconds: float = 0.2  # a shorter transfer only sizes the next one
    time_budget: float = 1.0  # both directions together, after the connection is up
    max_peers: int = 3  # peers tried, in order, until one answers the whole test


def transfer_bps(nbytes: int, elapsed: float, rtt: float) -> float:
    """Bits/s of a transfer of `nbytes` that took `elapsed` seconds, of which one round trip
    (`rtt`) was waiting for the first byte or the last acknowledgement. Half of `elapsed` is
    always counted as transfer: a round-trip estimate that is off cannot blow the rate up."""
    seconds = max(elapsed - rtt, elapsed / 2, 1e-9)
    return nbytes * 8 / seconds


class TransferSizer:
    """One direction of the test: which size to move next, and the rate it found.

    `next_size(now)` answers a size to transfer, or None when done: after a transfer that lasted
    `min_seconds`, after one of `max_bytes`, or when no larger transfer fits before `deadline`.
    Each next size is what the rate so far moves in `min_seconds` (x1.25 margin), at least
    twice the last and at most `max_bytes`. The result (`bps`) is the rate of the last, hence
    largest, transfer: small ones are the least accurate (slow start, per-message costs).
    """

    GROWTH_MARGIN = 1.25

    def __init__(self, config: SpeedTestConfig, deadline: float):
        self.config = config
        self.deadline = deadline
        self.bps: float | None = None
        self.last_bytes = 0
        self.last_seconds = 0.0
        self.total_bytes = 0
        self.transfers = 0
        self._done = False

    def next_size(self, now: float) -> int | None:
        config = self.config
        if self._done:
            return None
        if self.bps is None:  # the probe runs even late: without it there is no figure
            return config.first_bytes
        if now >= self.deadline:
            self._done = True
            return None
        if self.last_seconds >= config.min_seconds or self.last_bytes >= config.max_bytes:
            self._done = True
            return None
        bytes_per_second = self.bps / 8
        want = max(2 * self.last_bytes, int(bytes_per_second * config.min_seconds
                                            * self.GROWTH_MARGIN))
        fits = int(bytes_per_second * (self.deadline - now))
        size = min(want, config.max_bytes, fits)
        if size <= self.last_bytes:  # nothing larger fits in the time left
            self._done = True
            return None
        return size

    def record(self, nbytes: int, elapsed: float, rtt: float) -> None:
        """A transfer of `nbytes` done in `elapsed` seconds, `rtt` the round trip."""
        self.bps = transfer_bps(nbytes, elapsed, rtt)
        self.last_bytes = nbytes
        self.last_seconds = elapsed
        self.total_bytes += nbytes
        self.transfers += 1


@dataclass(frozen=True, slots=True)
class LinkMeasurement:
    """What a test against one peer found."""

    peer: str
    upload_bps: float
    download_bps: float
    rtt: float  # seconds
    total_bytes: int  # both directions
    seconds: float  # the whole test, round trip and connection included

    @property
    def bps(self) -> float:
        """The link's figure: the slower direction (a server both receives and sends every
        hidden state), as Petals takes min(download, upload)."""
        return min(self.upload_bps, self.download_bps)
