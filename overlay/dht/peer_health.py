"""Per-peer round-trip estimates, adaptive timeouts and failure backoff.

Round trips are smoothed as TCP does (RFC 6298 section 2: SRTT, RTTVAR, RTO = SRTT + 4
RTTVAR). The timeout derived from them is "soft": past it a lookup stops waiting for the
peer and asks someone else, so a machine that keeps its connection open but never answers
costs a few round trips instead of a fixed multi-second timeout. A peer with no measurement
gets the timeout of all peers together, which on a fast network is milliseconds.

A peer that failed (or went silent past its soft timeout) is avoided for an exponentially
growing interval (Kademlia paper, section 4.1) and an answer clears that at once (section
2.3: removed from consideration "until and unless they do respond").

Pure: no I/O, no clock; `now` comes in. Memory is bounded by `max_tracked_peers`.
"""

from __future__ import annotations

from overlay.dht.config import DHTConfig

# RFC 6298 section 2: gains of the smoothed round trip and of its variation, and the
# variation multiplier K of the timeout.
RTT_ALPHA = 1 / 8
RTT_BETA = 1 / 4
RTO_K = 4


class RttEstimator:
    """SRTT / RTTVAR of one path (RFC 6298 sections 2.2 and 2.3)."""

    __slots__ = ("rttvar", "srtt")

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0

    def sample(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = (1 - RTT_BETA) * self.rttvar + RTT_BETA * abs(self.srtt - rtt)
            self.srtt = (1 - RTT_ALPHA) * self.srtt + RTT_ALPHA * rtt

    def rto(self) -> float | None:
        if self.srtt is None:
            return None
        return self.srtt + RTO_K * self.rttvar


class _PeerRecord(RttEstimator):
    """One object per peer (the simulator keeps hundreds per node): RTT and failures."""

    __slots__ = ("backoff_until", "failures")

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0  # in a row
        self.backoff_until = 0.0


class PeerHealth:
    """What this node has measured about the peers it talks to."""

    __slots__ = ("_config", "_global", "_peers")

    def __init__(self, config: DHTConfig):
        self._config = config
        self._global = RttEstimator()
        self._peers: dict[int, _PeerRecord] = {}  # node_id -> record, least recently used first

    def __len__(self) -> int:
        return len(self._peers)

    def _record(self, node_id: int) -> _PeerRecord:
        peers = self._peers
        record = peers.pop(node_id, None)
        if record is None:
            record = _PeerRecord()
            if len(peers) >= self._config.max_tracked_peers:
                del peers[next(iter(peers))]
        peers[node_id] = record
        return record

    def on_success(self, node_id: int, rtt: float | None, now: float) -> None:
        """The peer answered; `rtt` is None when the sample is unusable (a late answer)."""
        record = self._record(node_id)
        record.failures = 0
        record.backoff_until = 0.0
        # A clock that stepped backwards gives a negative sample: ignore it.
        if rtt is not None and 0.0 <= rtt <= self._config.request_timeout:
            record.sample(rtt)
            self._global.sample(rtt)

    def on_failure(self, node_id: int, now: float) -> None:
        """The peer failed or went silent: back off 2**(failures-1) * base, capped."""
        config = self._config
        record = self._record(node_id)
        record.failures += 1
        delay = min(config.backoff_max, config.backoff_base * 2 ** min(record.failures - 1, 30))
        record.backoff_until = max(record.backoff_until, now + delay)

    def is_backed_off(self, node_id: int, now: float) -> bool:
        record = self._peers.get(node_id)
        return record is not None and now < record.backoff_until

    def failures(self, node_id: int) -> int:
        record = self._peers.get(node_id)
        return 0 if record is None else record.failures

    def srtt(self, node_id: int) -> float | None:
        record = self._peers.get(node_id)
        return None if record is None else record.srtt

    def typical_rtt(self) -> float | None:
        """The smoothed round trip over all peers (None before the first answer)."""
        return self._global.srtt

    def soft_timeout(self, node_id: int) -> float:
        """Adaptive timeout for one request to this peer, clamped to the configured range."""
        config = self._config
        record = self._peers.get(node_id)
        rto = record.rto() if record is not None else None
        if rto is None:
            rto = self._global.rto()
        if rto is None:
            rto = config.initial_soft_timeout
        return min(config.max_soft_timeout, max(config.min_soft_timeout, rto))
