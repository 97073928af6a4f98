"""An iterative closest-peers lookup as a steppable object (Kademlia paper, section 2.3).

Modelled on rust-libp2p's `ClosestPeersIter` (kad/src/query/peers/closest.rs): the caller
asks `next(now)` what to do, sends the requests itself and reports answers through
`on_success` / `on_failure`. Used for FIND_NODE and for FIND_VALUE (the caller calls
`finish()` once it has the value).

Rules, in the order `next` applies them while walking the candidates nearest first:
1. Only the k nearest candidates still in consideration are asked, at most `parallelism`
   at a time: alpha normally, k once the lookup stalls (alpha answers in a row brought
   nobody closer: "the initiator resends the FIND_NODE to all of the k closest nodes it
   has not already queried").
2. A request past its deadline (the peer's adaptive timeout, chosen by the caller) stops
   counting against the limit and its peer no longer holds up termination: a silent peer
   costs one timeout, not the whole lookup. A late answer is still taken.
3. The lookup is finished when the k nearest candidates that did not fail or time out have
   all answered, or when nothing is left to ask and nothing is in flight.
4. Optional hedging (value lookups): start with one request and widen to alpha when it
   fails, answers without the value, or has not answered after `hedge_delay` (a few round
   trips). A value usually sits at the first node asked, so this saves two of three RPCs
   per get, at the cost of `hedge_delay` when that first node is slow.
5. Answers are distrusted: at most `max_peers_per_response` closer peers are taken from one
   answer, the responder and ourselves are skipped, duplicates are ignored, and the number
   of candidates is capped (the farthest uncontacted ones are dropped).

Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from operator import attrgetter

from overlay.dht.contact import Contact

NOT_CONTACTED = 0
WAITING = 1
UNRESPONSIVE = 2  # past its soft deadline; may still answer
SUCCEEDED = 3
FAILED = 4


@dataclass(frozen=True, slots=True)
class Waiting:
    """Nothing to send now; call `next` again at `deadline` (None: only when an answer comes)."""

    deadline: float | None


class _Finished:
    __slots__ = ()

    def __repr__(self) -> str:
        return "FINISHED"


FINISHED = _Finished()


class _Candidate:
    __slots__ = ("contact", "deadline", "depth", "distance", "state")

    def __init__(self, contact: Contact, distance: int, depth: int):
        self.contact = contact
        self.distance = distance
        self.depth = depth  # answers between the seeds and the discovery of this peer
        self.state = NOT_CONTACTED
        self.deadline = 0.0


_distance = attrgetter("distance")


class ClosestPeersLookup:
    """Finds the `k` nodes closest to `target` that answer."""

    __slots__ = (
        "_best",
        "_by_id",
        "_candidates",
        "_distances",
        "_finished",
        "_hedge_at",
        "_hedge_delay",
        "_in_flight",
        "_min_deadline",
        "_no_progress",
        "_parallelism",
        "_settled",
        "_settled_answered",
        "_waiting",
        "alpha",
        "k",
        "max_candidates",
        "max_peers_per_response",
        "requests_sent",
        "self_id",
        "target",
        "timeout_for",
    )

    def __init__(
        self,
        target: int,
        seeds: Iterable[Contact],
        *,
        k: int,
        alpha: int,
        timeout_for: Callable[[Contact], float],
        self_id: int | None = None,
        max_peers_per_response: int | None = None,
        max_candidates: int | None = None,
        hedge_delay: float | None = None,
    ):
        self.target = target
        self.k = k
        self.alpha = alpha
        self.timeout_for = timeout_for
        self.self_id = self_id
        if max_peers_per_response is None:
            max_peers_per_response = k
        self.max_peers_per_response = max_peers_per_response
        self.max_candidates = 8 * k if max_candidates is None else max(k, max_candidates)
        self._candidates: list[_Candidate] = []  # nearest first
        self._distances: list[int] = []  # parallel to _candidates, for bisect
        self._by_id: dict[int, _Candidate] = {}
        self._in_flight = 0
        self._min_deadline = float("inf")  # <= every WAITING deadline (may be stale-early)
        self._parallelism = alpha if hedge_delay is None else 1
        self._hedge_delay = hedge_delay  # None once widened (rule 4)
        self._hedge_at: float | None = None
        self._no_progress = 0
        self._finished = False
        # The leading candidates that are all settled for good (SUCCEEDED or FAILED: states
        # no input changes again), and how many of them answered. A walk over the candidates
        # counts them the same every time, so `_scan` starts after them; an insertion among
        # them (a new, closer peer) shortens the run (`_unsettle`).
        self._settled = 0
        self._settled_answered = 0
        # The last Waiting handed out: nine walks in ten wait for the same deadline as the
        # one before, and the (immutable) answer is then the same object.
        self._waiting: Waiting | None = None
        self.requests_sent = 0
        by_id = self._by_id
        for contact in seeds:  # built in bulk: one sort instead of an insertion per seed
            if contact.node_id != self_id and contact.node_id not in by_id:
                by_id[contact.node_id] = _Candidate(contact, contact.node_id ^ target, 0)
        ordered = sorted(by_id.values(), key=_distance)
        for dropped in ordered[self.max_candidates:]:
            del by_id[dropped.contact.node_id]
        self._candidates = ordered[: self.max_candidates]
        self._distances = [c.distance for c in self._candidates]
        self._best = self._distances[0] if self._distances else None

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _insert(self, contact: Contact, depth: int) -> bool:
        node_id = contact.node_id
        if node_id == self.self_id:
            return False
        known = self._by_id.get(node_id)
        if known is not None:
            if depth < known.depth:
                known.depth = depth
            return False
        dist = node_id ^ self.target
        index = bisect_left(self._distances, dist)
        if index >= self.max_candidates:
            return False
        if index < self._settled:
            self._unsettle(index)
        candidate = _Candidate(contact, dist, depth)
        self._candidates.insert(index, candidate)
        self._distances.insert(index, dist)
        self._by_id[node_id] = candidate
        while len(self._candidates) > self.max_candidates:
            if self._candidates[-1].state != NOT_CONTACTED:
                break
            dropped = self._candidates.pop()
            self._distances.pop()
            del self._by_id[dropped.contact.node_id]
        return True

    def _unsettle(self, index: int) -> None:
        """A candidate is about to be inserted at `index`, inside the settled run."""
        self._settled = index
        self._settled_answered = sum(
            1 for c in islice(self._candidates, index) if c.state == SUCCEEDED)

    def _advance_settled(self) -> int:
        """Extend the settled run over candidates settled since; returns its answered count."""
        candidates = self._candidates
        settled = self._settled
        answered = self._settled_answered
        end = len(candidates)
        while settled < end:
            state = candidates[settled].state
            if state == SUCCEEDED:
                answered += 1
            elif state != FAILED:
                break
            settled += 1
        self._settled = settled
        self._settled_answered = answered
        return answered

    def next(self, now: float) -> Contact | Waiting | _Finished:
        """What to do now: ask this contact, wait, or stop (rules 1-3 of the module doc)."""
        contacts, after = self._scan(now, None, 1)
        return contacts[0] if contacts else after

    def next_batch(
        self, now: float, skip: Callable[[int], bool] | None = None
    ) -> tuple[list[Contact], Waiting | _Finished]:
        """Every contact to ask now, and what comes after them (Waiting or FINISHED).

        The same as calling `next` until it stops returning contacts, in one walk over the
        candidates. A candidate whose node id satisfies `skip` (e.g. backed off) is treated
        as failed on the spot, as `on_failure` would, and the walk goes on.
        """
        return self._scan(now, skip, None)

    def _scan(
        self, now: float, skip: Callable[[int], bool] | None, limit: int | None
    ) -> tuple[list[Contact], Waiting | _Finished]:
        if self._finished:
            return [], FINISHED
        candidates = self._candidates
        if self._in_flight and now >= self._min_deadline:
            # rule 2 first, over every waiting request; skipped while none can have expired
            minimum = float("inf")
            for c in islice(candidates, self._settled, None):  # none waits in the settled run
                if c.state == WAITING:
                    if now >= c.deadline:
                        c.state = UNRESPONSIVE
                        self._in_flight -= 1
                    elif c.deadline < minimum:
                        minimum = c.deadline
            self._min_deadline = minimum
        if self._hedge_at is not None and now >= self._hedge_at:
            self._widen()
        out: list[Contact] = []
        k = self.k
        # The settled run counts as the plain walk would count it: every SUCCEEDED one is
        # live and answered (nothing is pending before it), a FAILED one is skipped.
        answered = live = self._advance_settled()
        if answered >= k:
            self._finished = True
            return [], FINISHED
        closer_pending = False
        for c in islice(candidates, self._settled, None):
            state = c.state
            if state == SUCCEEDED:
                live += 1
                if not closer_pending:
                    answered += 1
                    if answered >= k:
                        self._finished = True
                        return [], FINISHED
            elif state == WAITING:
                live += 1
                closer_pending = True
            elif state == NOT_CONTACTED:
                live += 1
                if self._in_flight >= self._parallelism or live > k:
                    break
                if skip is not None and skip(c.contact.node_id):
                    c.state = FAILED  # as on_failure: out of consideration, widens a hedge
                    live -= 1
                    if self._hedge_delay is not None:
                        self._widen()
                    continue
                c.state = WAITING
                c.deadline = deadline = now + self.timeout_for(c.contact)
                if deadline < self._min_deadline:
                    self._min_deadline = deadline
                self._in_flight += 1
                self.requests_sent += 1
                if self._hedge_delay is not None and self._hedge_at is None:
                    self._hedge_at = now + self._hedge_delay
                out.append(c.contact)
                closer_pending = True
                if limit is not None and len(out) >= limit:
                    break
        if self._in_flight:
            earliest = self._min_deadline
            hedge_at = self._hedge_at
            if hedge_at is not None and hedge_at < earliest:
                earliest = hedge_at
            waiting = self._waiting
            if waiting is None or waiting.deadline != earliest:
                waiting = self._waiting = Waiting(earliest)
            return out, waiting
        self._finished = True
        return [], FINISHED

    def _widen(self) -> None:
        self._hedge_delay = None
        self._hedge_at = None
        if self._parallelism < self.alpha:
            self._parallelism = self.alpha

    def on_success(self, node_id: int, closer: Iterable[Contact], now: float) -> None:
        """`node_id` answered with `closer` peers (untrusted: rule 5)."""
        candidate = self._by_id.get(node_id)
        if candidate is None or candidate.state in (SUCCEEDED, FAILED, NOT_CONTACTED):
            return
        if self._hedge_delay is not None:
            self._widen()
        if candidate.state == WAITING:
            self._in_flight -= 1
        candidate.state = SUCCEEDED
        if self._finished:
            return
        depth = candidate.depth + 1
        # _insert, inlined (this loop runs for every peer of every answer). The responder
        # is a known candidate whose depth is below `depth`, so it needs no test of its own;
        # ourselves are never a candidate, so only a new id can be us.
        by_id = self._by_id
        target = self.target
        self_id = self.self_id
        candidates = self._candidates
        distances = self._distances
        limit = self.max_candidates
        for contact in islice(closer, self.max_peers_per_response):
            other = contact.node_id
            known = by_id.get(other)
            if known is not None:
                if depth < known.depth:
                    known.depth = depth
                continue
            if other == self_id:
                continue
            dist = other ^ target
            index = bisect_left(distances, dist)
            if index >= limit:
                continue
            if index < self._settled:
                self._unsettle(index)
            new = _Candidate(contact, dist, depth)
            candidates.insert(index, new)
            distances.insert(index, dist)
            by_id[other] = new
            while len(candidates) > limit:
                if candidates[-1].state != NOT_CONTACTED:
                    break
                dropped = candidates.pop()
                distances.pop()
                del by_id[dropped.contact.node_id]
        best = self._distances[0] if self._distances else None
        if self._best is None or (best is not None and best < self._best):
            self._best = best
            self._no_progress = 0
            self._parallelism = self.alpha
        else:
            self._no_progress += 1
            if self._no_progress >= self.alpha:
                self._parallelism = max(self.alpha, self.k)

    def on_failure(self, node_id: int, now: float) -> None:
        """The request to `node_id` failed (error, bad answer, hard timeout) or was skipped."""
        candidate = self._by_id.get(node_id)
        if candidate is None or candidate.state in (SUCCEEDED, FAILED):
            return
        if candidate.state == WAITING:
            self._in_flight -= 1
        candidate.state = FAILED
        if self._hedge_delay is not None:
            self._widen()

    def finish(self) -> None:
        """Stop early (FIND_VALUE found its value); answers still in flight are ignored."""
        self._finished = True

    def closest_answered(self, n: int | None = None) -> list[Contact]:
        """The nearest peers that answered, nearest first (the lookup's result)."""
        n = self.k if n is None else n
        out: list[Contact] = []
        for c in self._candidates:
            if c.state == SUCCEEDED:
                out.append(c.contact)
                if len(out) >= n:
                    break
        return out

    def answered_without(self, exclude: set[int]) -> list[Contact]:
        """Peers that answered but are not in `exclude`, nearest first."""
        return [
            c.contact
            for c in self._candidates
            if c.state == SUCCEEDED and c.contact.node_id not in exclude
        ]

    def depth(self, node_id: int) -> int | None:
        """Hops from the seeds to `node_id` (0 for a seed), None when unknown."""
        candidate = self._by_id.get(node_id)
        return None if candidate is None else candidate.depth

    def state_of(self, node_id: int) -> int | None:
        candidate = self._by_id.get(node_id)
        return None if candidate is None else candidate.state

    def __len__(self) -> int:
        return len(self._candidates)
