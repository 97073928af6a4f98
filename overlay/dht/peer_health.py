"""Per-peer round-trip estimates, adaptive timeouts and failure backoff.

Round trips are smoothed as TCP does (RFC 6298 section 2: SRTT, RTTVAR,
RTO = SRTT + max(G, 4 RTTVAR)). The timeout derived from them is "soft": past it a lookup
stops waiting for the peer and asks someone else, so a machine that keeps its connection
open but never answers costs a few round trips instead of a fixed multi-second timeout.

A peer never measured cannot be judged by its own path, and one estimator over all paths
(an EWMA of the last few samples) says nothing about how slow the slow paths are: with it,
live peers a little slower than the recent average timed out, and lookups ended without
them (a quarter of lookups on a log-normal network missed one of the k closest). Such a
peer gets instead a timeout far in the tail of the paths measured so far: with m and s the
mean and standard deviation of log(SRTT) over the tracked peers, exp(m + TAIL_Z * s), and
at least the all-paths RTO; until TAIL_MIN_PEERS peers are measured, the initial timeout
(RFC 6298 2.1). On a uniform LAN (s ~ 0) that is a few round trips, on a network of mixed
paths it covers the slow ones.

A peer that failed (or went silent past its soft timeout) is avoided for an exponentially
growing interval (Kademlia paper, section 4.1) and an answer clears that at once (section
2.3: removed from consideration "until and unless they do respond").

Pure: no I/O, no clock; `now` comes in. Memory is bounded by `max_tracked_peers`.
"""

from __future__ import annotations

import math

from overlay.dht.config import DHTConfig

# RFC 6298 section 2: gains of the smoothed round trip and of its variation, and the
# variation multiplier K of the timeout.
RTT_ALPHA = 1 / 8
RTT_BETA = 1 / 4
RTO_K = 4
# RFC 6298 2.2-2.3: RTO = SRTT + max(G, K * RTTVAR), G the clock granularity. Ours: 10 ms,
# the scheduling jitter of an event loop on a loaded machine; without it a path measured
# many times with a steady RTT gets RTTVAR -> 0 and an RTO that a slightly larger answer
# (or a busy sender) overruns.
RTO_GRANULARITY = 0.010
# Ours: the timeout of an unmeasured peer is exp(m + TAIL_Z s), the 1 - 1.3e-3 quantile of a
# log-normal fitted to the tracked SRTTs, trusted once TAIL_MIN_PEERS peers have been
# measured (with 8, the spread of a few early samples was sometimes too small). A trade-off
# measured in the simulator (dht-static 600 nodes; dht-churn 2,000 nodes, Weibull, 20 min):
# z = 3.0 misses one of the k closest in ~0.5% of static lookups (the old all-paths EWMA:
# 25%) and costs +0.14 s of median lookup latency under churn, where a silent dead peer
# holds a lookup for that timeout; z = 3.5: ~0.1% and +0.26 s; z = 4.26: none and +0.40 s.
TAIL_Z = 3.0
TAIL_MIN_PEERS = 16
# The running sums of log(SRTT) are recomputed exactly after this many samples (no drift).
TAIL_REFRESH_SAMPLES = 256


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
        variation = RTO_K * self.rttvar
        return self.srtt + (variation if variation > RTO_GRANULARITY else RTO_GRANULARITY)


class _PeerRecord(RttEstimator):
    """One object per peer (the simulator keeps hundreds per node): RTT and failures."""

    __slots__ = ("backoff_until", "failures")

    def __init__(self) -> None:
        # RttEstimator's fields set here rather than through super().__init__(): one record
        # per new peer, and the super() call was most of its cost
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.failures = 0  # in a row
        self.backoff_until = 0.0


class PeerHealth:
    """What this node has measured about the peers it talks to."""

    __slots__ = ("_config", "_global", "_log_sum", "_log_sum_sq", "_measured", "_peers",
                 "_samples_to_refresh", "_unmeasured")

    def __init__(self, config: DHTConfig):
        self._config = config
        self._global = RttEstimator()
        self._peers: dict[int, _PeerRecord] = {}  # node_id -> record, least recently used first
        # Over the tracked records with an SRTT: how many, sum of log(SRTT), of its square.
        self._measured = 0
        self._log_sum = 0.0
        self._log_sum_sq = 0.0
        self._unmeasured: float | None = None  # cached unmeasured_timeout()
        self._samples_to_refresh = TAIL_REFRESH_SAMPLES

    def __len__(self) -> int:
        return len(self._peers)

    def _record(self, node_id: int) -> _PeerRecord:
        peers = self._peers
        record = peers.pop(node_id, None)
        if record is None:
            record = _PeerRecord()
            if len(peers) >= self._config.max_tracked_peers:
                forgotten = peers.pop(next(iter(peers)))
                if forgotten.srtt is not None:
                    self._account(forgotten.srtt, None)
        peers[node_id] = record
        return record

    def on_success(self, node_id: int, rtt: float | None, now: float) -> None:
        """The peer answered; `rtt` is None when the sample is unusable (a late answer)."""
        record = self._record(node_id)
        record.failures = 0
        record.backoff_until = 0.0
        # A clock that stepped backwards gives a negative sample: ignore it.
        if rtt is not None and 0.0 <= rtt <= self._config.request_timeout:
            old = record.srtt
            record.sample(rtt)
            self._global.sample(rtt)
            self._account(old, record.srtt)
            self._samples_to_refresh -= 1
            if self._samples_to_refresh <= 0:
                self._recount()

    def _account(self, old: float | None, new: float | None) -> None:
        """One tracked SRTT changed from `old` to `new` (None: absent)."""
        if old is not None and old > 0.0:
            x = math.log(old)
            self._measured -= 1
            self._log_sum -= x
            self._log_sum_sq -= x * x
        if new is not None and new > 0.0:
            x = math.log(new)
            self._measured += 1
            self._log_sum += x
            self._log_sum_sq += x * x
        self._unmeasured = None

    def _recount(self) -> None:
        self._samples_to_refresh = TAIL_REFRESH_SAMPLES
        logs = [math.log(r.srtt) for r in self._peers.values() if r.srtt]
        self._measured = len(logs)
        self._log_sum = math.fsum(logs)
        self._log_sum_sq = math.fsum(x * x for x in logs)
        self._unmeasured = None

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

    def unmeasured_timeout(self) -> float:
        """The timeout of a peer never measured (before clamping): see the module doc."""
        if self._unmeasured is not None:
            return self._unmeasured
        n = self._measured
        if n < TAIL_MIN_PEERS:
            timeout = self._config.initial_soft_timeout
        else:
            mean = self._log_sum / n
            variance = max(0.0, self._log_sum_sq / n - mean * mean)
            timeout = math.exp(mean + TAIL_Z * math.sqrt(variance))
            overall = self._global.rto()
            if overall is not None and overall > timeout:
                timeout = overall
        self._unmeasured = timeout
        return timeout

    def soft_timeout(self, node_id: int) -> float:
        """Adaptive timeout for one request to this peer, clamped to the configured range."""
        config = self._config
        record = self._peers.get(node_id)
        rto = record.rto() if record is not None else None
        if rto is None:
            rto = self.unmeasured_timeout()
        if rto < config.min_soft_timeout:
            return config.min_soft_timeout
        return rto if rto < config.max_soft_timeout else config.max_soft_timeout
