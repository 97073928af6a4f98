"""ClosestPeersLookup driven by hand against a brute-force oracle (no sockets, no clock)."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.dht.config import DHTConfig
from overlay.dht.contact import Contact
from overlay.dht.ids import ID_BITS
from overlay.dht.lookup import (
    FAILED,
    FINISHED,
    SUCCEEDED,
    UNRESPONSIVE,
    ClosestPeersLookup,
    Waiting,
)
from overlay.dht.routing_table import RoutingTable
from overlay.identity import PeerId

TIMEOUT = 0.05


def fake(node_id: int) -> Contact:
    return Contact(PeerId.from_public_key(node_id.to_bytes(32, "big")), (), node_id)


class OracleNetwork:
    """A static network in which every node's routing table was offered every other node."""

    def __init__(self, node_ids: list[int], k: int, rng: random.Random):
        self.k = k
        self.contacts = {i: fake(i) for i in node_ids}
        self.tables = {}
        for node_id in node_ids:
            table = RoutingTable(node_id, DHTConfig(k=k))
            others = [c for c in self.contacts.values() if c.node_id != node_id]
            rng.shuffle(others)
            for c in others:
                table.add_or_update(c, 0.0)
            self.tables[node_id] = table

    def answer(self, node_id: int, target: int, requester: int) -> list[Contact]:
        """What a node answers: its k closest to target, the requester left out (as DHTNode)."""
        return self.tables[node_id].closest(
            target, self.k, exclude=lambda c: c.node_id == requester
        )


def drive(lookup: ClosestPeersLookup, answer, rng: random.Random, silent=frozenset(),
          max_in_flight: int | None = None) -> float:
    """Run `lookup` to the end; answers arrive in random order, silent peers never answer.

    Returns the virtual time at which it finished.
    """
    now = 0.0
    in_flight: list[Contact] = []
    for _ in range(100_000):
        action = lookup.next(now)
        if action is FINISHED:
            return now
        if isinstance(action, Contact):
            in_flight.append(action)
            if max_in_flight is not None:
                assert lookup.in_flight <= max_in_flight
            continue
        assert isinstance(action, Waiting)
        answerable = [c for c in in_flight if c.node_id not in silent]
        if answerable:
            peer = rng.choice(answerable)
            in_flight.remove(peer)
            now += 0.001
            lookup.on_success(
                peer.node_id, answer(peer.node_id, lookup.target, lookup.self_id), now
            )
        elif action.deadline is not None:
            now = max(now, action.deadline)
        else:  # only requests that timed out softly remain: let the hard timeout fail one
            peer = in_flight.pop(0)
            now += 1.0
            lookup.on_failure(peer.node_id, now)
    raise AssertionError("lookup did not finish")


def start(net: OracleNetwork, origin: int, target: int, k: int, alpha: int) -> ClosestPeersLookup:
    return ClosestPeersLookup(
        target,
        net.tables[origin].closest(target, 2 * k),  # as DHTNode seeds (config.lookup_seeds)
        k=k,
        alpha=alpha,
        timeout_for=lambda c: TIMEOUT,
        self_id=origin,
    )


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    n=st.integers(2, 150),
    k=st.integers(1, 20),
    alpha=st.integers(1, 5),
)
def test_lookup_finds_the_true_k_closest(seed, n, k, alpha):
    rng = random.Random(seed)
    node_ids = list({rng.getrandbits(ID_BITS) for _ in range(n)})
    net = OracleNetwork(node_ids, k, rng)
    origin = rng.choice(node_ids)
    target = rng.getrandbits(ID_BITS) if rng.random() < 0.7 else rng.choice(node_ids)
    lookup = start(net, origin, target, k, alpha)
    drive(lookup, net.answer, rng, max_in_flight=max(alpha, k))
    truth = sorted((i for i in node_ids if i != origin), key=lambda i: i ^ target)[:k]
    assert [c.node_id for c in lookup.closest_answered()] == truth


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(10, 120), silent_share=st.floats(0.0, 0.5))
def test_lookup_with_silent_peers_finds_the_answering_k_closest(seed, n, silent_share):
    rng = random.Random(seed)
    k, alpha = 8, 3
    node_ids = list({rng.getrandbits(ID_BITS) for _ in range(n)})
    net = OracleNetwork(node_ids, k, rng)
    origin = rng.choice(node_ids)
    others = [i for i in node_ids if i != origin]
    silent = frozenset(rng.sample(others, int(len(others) * silent_share)))
    target = rng.getrandbits(ID_BITS)
    lookup = start(net, origin, target, k, alpha)
    drive(lookup, net.answer, rng, silent)
    # Every node returns the k closest it knows, silent ones included, so the answering
    # nodes among the true k closest are all found, nearest first; beyond them, a node
    # may only be missing if no one ever listed it.
    k_closest = sorted(others, key=lambda i: i ^ target)[:k]
    core = [i for i in k_closest if i not in silent]
    found = [c.node_id for c in lookup.closest_answered()]
    assert found[: len(core)] == core
    assert not set(found) & silent


def test_at_most_alpha_in_flight_and_timeout_frees_a_slot():
    seeds = [fake(i) for i in range(1, 7)]
    lookup = ClosestPeersLookup(0, seeds, k=20, alpha=3, timeout_for=lambda c: 0.1, self_id=None)
    sent = [lookup.next(0.0) for _ in range(3)]
    assert [c.node_id for c in sent] == [1, 2, 3]
    assert lookup.next(0.0) == Waiting(0.1)
    assert lookup.next(0.05) == Waiting(0.1)
    # peer 1 answers at once; peers 2 and 3 stay silent
    lookup.on_success(1, [], 0.01)
    assert lookup.next(0.01).node_id == 4
    # past their adaptive timeout, 2 and 3 stop holding slots: 5 and 6 go out without waiting
    assert lookup.next(0.1).node_id == 5
    assert lookup.next(0.1).node_id == 6
    assert lookup.state_of(2) == UNRESPONSIVE
    # a late answer still counts; a hard failure is final
    lookup.on_success(2, [], 0.5)
    assert lookup.state_of(2) == SUCCEEDED
    lookup.on_failure(3, 1.0)
    assert lookup.state_of(3) == FAILED
    for peer in (4, 5, 6):
        lookup.on_success(peer, [], 1.0)
    assert lookup.next(1.0) is FINISHED
    assert [c.node_id for c in lookup.closest_answered()] == [1, 2, 4, 5, 6]


def test_stall_widens_to_k_requests():
    """Kademlia 2.3: alpha answers without progress send to all k closest not yet asked."""
    seeds = [fake(i) for i in range(1, 30)]
    lookup = ClosestPeersLookup(0, seeds, k=10, alpha=2, timeout_for=lambda c: 1.0)
    first = [lookup.next(0.0), lookup.next(0.0)]
    assert isinstance(lookup.next(0.0), Waiting)
    for c in first:
        lookup.on_success(c.node_id, [], 0.1)  # nothing closer: no progress twice
    fanned = []
    while isinstance(action := lookup.next(0.1), Contact):
        fanned.append(action)
    assert len(fanned) == 8  # up to k = 10 in flight minus the two answered


def test_hostile_answers_are_capped_and_ignored():
    """Answers listing the responder itself, ourselves, duplicates or thousands of peers."""
    rng = random.Random(5)
    me = 12345
    honest = [fake(rng.getrandbits(ID_BITS)) for _ in range(40)]
    liar = fake(rng.getrandbits(ID_BITS))
    lookup = ClosestPeersLookup(
        0, [liar, *honest[:3]], k=5, alpha=3, timeout_for=lambda c: 1.0, self_id=me,
        max_peers_per_response=20, max_candidates=50,
    )
    for _ in range(50):
        action = lookup.next(0.0)
        if action is FINISHED:
            break
        if isinstance(action, Waiting):
            continue
        if action.node_id == liar.node_id:
            flood = [liar] * 500 + [fake(me)] * 500 + [fake(rng.getrandbits(ID_BITS))
                                                       for _ in range(5000)]
            lookup.on_success(liar.node_id, flood, 0.0)
        else:
            lookup.on_success(action.node_id, honest, 0.0)
        assert len(lookup) <= 50
        assert lookup.depth(me) is None
    assert lookup.finished
    result = lookup.closest_answered()
    assert len(result) == 5 and me not in {c.node_id for c in result}


def test_finish_stops_a_find_value_lookup_and_late_answers_are_harmless():
    seeds = [fake(i) for i in range(1, 5)]
    lookup = ClosestPeersLookup(0, seeds, k=20, alpha=3, timeout_for=lambda c: 1.0)
    a, b = lookup.next(0.0), lookup.next(0.0)
    lookup.on_success(a.node_id, [fake(100)], 0.1)
    lookup.finish()
    assert lookup.next(0.2) is FINISHED
    lookup.on_success(b.node_id, [fake(200)], 0.3)
    assert lookup.depth(200) is None
    assert lookup.depth(100) == 1


def test_hedged_lookup_starts_with_one_request_and_widens():
    seeds = [fake(i) for i in range(1, 8)]

    def hedged():
        return ClosestPeersLookup(0, seeds, k=20, alpha=3, timeout_for=lambda c: 1.0,
                                  hedge_delay=0.002)

    # the first peer answers in time with the value: one request in all
    lookup = hedged()
    assert lookup.next(0.0).node_id == 1
    assert lookup.next(0.0) == Waiting(0.002)
    lookup.on_success(1, [], 0.001)
    lookup.finish()
    assert lookup.requests_sent == 1
    # the first peer is slow: at the hedge deadline alpha requests are out
    lookup = hedged()
    lookup.next(0.0)
    assert isinstance(lookup.next(0.001), Waiting)
    assert [lookup.next(0.002).node_id, lookup.next(0.002).node_id] == [2, 3]
    assert isinstance(lookup.next(0.002), Waiting)
    # the first peer fails at once (closed socket): widen immediately
    lookup = hedged()
    lookup.next(0.0)
    lookup.on_failure(1, 0.0001)
    assert [c.node_id for c in (lookup.next(0.0001), lookup.next(0.0001), lookup.next(0.0001))] \
        == [2, 3, 4]


def _trace(lookup: ClosestPeersLookup, answer, rng: random.Random, silent, skip,
           batched: bool) -> list:
    """Drive `lookup` like `drive`, skipped peers failing on the spot; returns what it sent
    and saw, step by step."""
    now = 0.0
    in_flight: list[Contact] = []
    trace: list = []
    for _ in range(100_000):
        if batched:
            contacts, after = lookup.next_batch(now, lambda node_id: node_id in skip)
        else:
            contacts = []
            while isinstance(action := lookup.next(now), Contact):
                if action.node_id in skip:
                    lookup.on_failure(action.node_id, now)
                else:
                    contacts.append(action)
            after = action
        trace.append(([c.node_id for c in contacts], after))
        in_flight.extend(contacts)
        if after is FINISHED:
            return trace
        answerable = [c for c in in_flight if c.node_id not in silent]
        if answerable:
            peer = rng.choice(answerable)
            in_flight.remove(peer)
            now += 0.001
            lookup.on_success(
                peer.node_id, answer(peer.node_id, lookup.target, lookup.self_id), now)
        elif after.deadline is not None:
            now = max(now, after.deadline)
        else:
            peer = in_flight.pop(0)
            now += 1.0
            lookup.on_failure(peer.node_id, now)
    raise AssertionError("lookup did not finish")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(2, 120), k=st.integers(1, 12),
       alpha=st.integers(1, 4), hedged=st.booleans())
def test_next_batch_is_repeated_next(seed, n, k, alpha, hedged):
    """`next_batch` hands out exactly what repeated `next` calls would, skipped peers
    included, with slow (soft-timed-out) and silent peers in play."""
    rng = random.Random(seed)
    node_ids = list({rng.getrandbits(ID_BITS) for _ in range(n)})
    net = OracleNetwork(node_ids, k, rng)
    origin = rng.choice(node_ids)
    others = [i for i in node_ids if i != origin]
    silent = frozenset(rng.sample(others, len(others) // 5))
    skip = frozenset(rng.sample(others, len(others) // 5))
    target = rng.getrandbits(ID_BITS)
    traces = []
    for batched in (False, True):
        lookup = ClosestPeersLookup(
            target, net.tables[origin].closest(target, 2 * k), k=k, alpha=alpha,
            timeout_for=lambda c: TIMEOUT, self_id=origin,
            hedge_delay=0.002 if hedged else None)
        traces.append((_trace(lookup, net.answer, random.Random(seed), silent, skip, batched),
                       [c.node_id for c in lookup.closest_answered()]))
    assert traces[0] == traces[1]


class PlainWalk(ClosestPeersLookup):
    """The lookup without its settled-run shortcut: every walk starts at the nearest."""

    __slots__ = ()

    def _advance_settled(self) -> int:
        self._settled = self._settled_answered = 0
        return 0

    def _unsettle(self, index: int) -> None:
        raise AssertionError("never called: the settled run stays empty")


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), k=st.integers(1, 8), alpha=st.integers(1, 4),
       hedged=st.booleans(), steps=st.integers(1, 120))
def test_the_settled_run_shortcut_walks_as_the_plain_lookup(seed, k, alpha, hedged, steps):
    """Random answers, failures, skips and clock steps fed to a lookup and to its plain twin
    give the same requests, waits, results, candidate states and depths at every step."""
    rng = random.Random(seed)
    pool = [rng.getrandbits(16) for _ in range(60)]  # small ids: many duplicates, near ties
    target, self_id = rng.getrandbits(16), pool[0]
    seeds = [fake(i) for i in rng.sample(pool, rng.randint(0, 12))]
    cap = rng.choice([None, k, 2 * k])

    def make(cls):
        return cls(target, seeds, k=k, alpha=alpha, self_id=self_id,
                   timeout_for=lambda c: 0.01 + (c.node_id % 7) / 100,
                   max_candidates=cap,
                   hedge_delay=0.02 if hedged else None)

    fast, plain = make(ClosestPeersLookup), make(PlainWalk)
    asked: list[int] = []
    now = 0.0
    for _ in range(steps):
        action = rng.random()
        if action < 0.4:
            banned = set(rng.sample(pool, rng.randint(0, 3)))
            skip = banned.__contains__ if rng.random() < 0.5 else None
            got = [fast.next_batch(now, skip), plain.next_batch(now, skip)]
            (a, after_a), (b, after_b) = got
            assert [c.node_id for c in a] == [c.node_id for c in b]
            assert after_a == after_b
            asked += [c.node_id for c in a]
        elif action < 0.75 and asked:
            peer = asked.pop(rng.randrange(len(asked)))
            closer = [fake(i) for i in rng.sample(pool, rng.randint(0, 2 * k))]
            fast.on_success(peer, closer, now)
            plain.on_success(peer, closer, now)
        elif action < 0.85 and asked:
            peer = asked.pop(rng.randrange(len(asked)))
            fast.on_failure(peer, now)
            plain.on_failure(peer, now)
        else:
            now += rng.choice([0.0, 0.005, 0.02, 0.1])
        assert fast.finished == plain.finished
        assert fast.in_flight == plain.in_flight
        assert [(c.node_id, fast.state_of(c.node_id), fast.depth(c.node_id))
                for c in fast.closest_answered(len(fast))] == [
            (c.node_id, plain.state_of(c.node_id), plain.depth(c.node_id))
            for c in plain.closest_answered(len(plain))]
        assert [(c.contact.node_id, c.state, c.depth) for c in fast._candidates] == [
            (c.contact.node_id, c.state, c.depth) for c in plain._candidates]
