"""Routing table: bucket placement, closest() against brute force, eviction protocol, refresh."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.dht.config import DHTConfig
from overlay.dht.contact import Contact
from overlay.dht.ids import ID_BITS, bucket_index, node_id_of
from overlay.dht.routing_table import AddOutcome, PingLeastRecent, RoutingTable
from overlay.identity import PeerId

ids = st.integers(min_value=0, max_value=(1 << ID_BITS) - 1)


def contact(seed: int) -> Contact:
    return Contact(PeerId.from_public_key(random.Random(seed).randbytes(32)))


def fake(node_id: int) -> Contact:
    """A contact placed at an arbitrary id (the table only looks at node_id)."""
    return Contact(PeerId.from_public_key(node_id.to_bytes(32, "big")), (), node_id)


@settings(max_examples=60, deadline=None)
@given(self_id=ids, others=st.lists(ids, min_size=0, max_size=120, unique=True),
       target=ids, n=st.integers(1, 30), k=st.integers(1, 8))
def test_closest_matches_brute_force_and_buckets_hold_their_range(self_id, others, target, n, k):
    table = RoutingTable(self_id, DHTConfig(k=k))
    for i, node_id in enumerate(others):
        table.add_or_update(fake(node_id), float(i))
    members = list(table)
    assert len(members) == len(table)
    assert self_id not in {c.node_id for c in members}
    for index in range(ID_BITS):
        bucket = table.bucket(index)
        assert len(bucket) <= k
        for c in bucket:
            assert 2**index <= c.node_id ^ self_id < 2 ** (index + 1)
    # the table holds exactly the first k arrivals of every bucket (no ping was answered)
    first_k: dict[int, list[int]] = {}
    for node_id in others:
        if node_id != self_id:
            slot = first_k.setdefault(bucket_index(self_id, node_id), [])
            if len(slot) < k:
                slot.append(node_id)
    assert {c.node_id for c in members} == {i for slot in first_k.values() for i in slot}
    expected = sorted(members, key=lambda c: c.node_id ^ target)[:n]
    assert [c.node_id for c in table.closest(target, n)] == [c.node_id for c in expected]


@settings(max_examples=30, deadline=None)
@given(self_id=ids, others=st.lists(ids, min_size=1, max_size=60, unique=True), target=ids)
def test_closest_with_exclusion(self_id, others, target):
    table = RoutingTable(self_id, DHTConfig(k=20))
    for node_id in others:
        table.add_or_update(fake(node_id), 0.0)
    banned = {c.node_id for c in list(table)[::2]}
    got = table.closest(target, 10, exclude=lambda c: c.node_id in banned)
    want = sorted((c for c in table if c.node_id not in banned), key=lambda c: c.node_id ^ target)
    assert [c.node_id for c in got] == [c.node_id for c in want[:10]]


def fill_bucket(table: RoutingTable, index: int, count: int) -> list[Contact]:
    out = []
    for j in range(count):
        node_id = table.self_id ^ ((1 << index) | j)
        c = fake(node_id)
        assert table.add_or_update(c, float(j)) is AddOutcome.ADDED
        out.append(c)
    return out


Q = DHTConfig().questionable_after  # BEP 5: a contact unheard of this long is questionable
LATER = Q + 100.0  # a time at which every contact of fill_bucket is questionable


def test_full_bucket_asks_to_ping_least_recent_and_alive_keeps_it():
    table = RoutingTable(0, DHTConfig(k=3))
    first, second, third = fill_bucket(table, 10, 3)
    assert table.add_or_update(second, LATER - 5) is AddOutcome.UPDATED  # now most recent
    newcomer = fake((1 << 10) | 99)
    outcome = table.add_or_update(newcomer, LATER)
    assert outcome == PingLeastRecent(first, newcomer)
    # a second newcomer while the ping is pending is only cached
    other = fake((1 << 10) | 98)
    assert table.add_or_update(other, LATER + 0.5) is AddOutcome.CACHED
    assert table.on_ping_result(first.node_id, True, LATER + 1) is None
    assert [c.node_id for c in table.bucket(10)] == [third.node_id, second.node_id, first.node_id]
    assert {c.node_id for c in table.replacements(10)} == {newcomer.node_id, other.node_id}
    assert newcomer.node_id not in table
    assert table.last_seen(first.node_id) == LATER + 1


def test_recently_seen_least_recent_contact_is_not_pinged():
    """BEP 5 / Kademlia 4.1: a newcomer to a full bucket whose least recently seen contact
    was heard from within `questionable_after` is only cached; no PING at all."""
    table = RoutingTable(0, DHTConfig(k=3))
    first, second, third = fill_bucket(table, 10, 3)  # seen at 0, 1, 2
    for j in range(50):  # a stream of newcomers, all before `first` turns questionable
        newcomer = fake((1 << 10) | (100 + j))
        assert table.add_or_update(newcomer, Q - 1.0) is AddOutcome.CACHED
    assert [c.node_id for c in table.bucket(10)] == [first.node_id, second.node_id,
                                                     third.node_id]
    assert len(table.replacements(10)) == DHTConfig().replacement_cache_size
    # once `first` is questionable, the next newcomer asks for exactly one ping
    late = fake((1 << 10) | 999)
    assert table.add_or_update(late, Q + 0.5) == PingLeastRecent(first, late)
    assert table.add_or_update(fake((1 << 10) | 998), Q + 0.6) is AddOutcome.CACHED
    # it answered: it is fresh again, and the next least recent (second, seen at 1.0) is
    # questionable only from Q + 1
    table.on_ping_result(first.node_id, True, Q + 0.7)
    assert table.add_or_update(fake((1 << 10) | 997), Q + 0.8) is AddOutcome.CACHED
    assert isinstance(table.add_or_update(fake((1 << 10) | 996), Q + 1.5), PingLeastRecent)


def test_dead_least_recent_is_replaced_by_most_recent_replacement():
    table = RoutingTable(0, DHTConfig(k=2))
    first, second = fill_bucket(table, 7, 2)
    a, b = fake((1 << 7) | 50), fake((1 << 7) | 51)
    assert isinstance(table.add_or_update(a, LATER), PingLeastRecent)
    assert table.add_or_update(b, LATER + 1) is AddOutcome.CACHED
    promoted = table.on_ping_result(first.node_id, False, LATER + 2)
    assert promoted == b
    assert first.node_id not in table and b.node_id in table and second.node_id in table
    assert len(table) == 2
    assert table.last_seen(b.node_id) == LATER + 1  # when it was seen, not when promoted
    # the next full-bucket sighting may ping again (no ping pending; second is questionable)
    assert table.add_or_update(fake((1 << 7) | 52), LATER + 3) == PingLeastRecent(
        second, fake((1 << 7) | 52))


def test_stale_after_five_failures_replaced_only_when_a_replacement_waits():
    table = RoutingTable(0, DHTConfig(k=2))
    first, _second = fill_bucket(table, 3, 2)
    for _ in range(10):
        assert table.on_failure(first.node_id, 1.0) is None
    assert first.node_id in table  # flagged only: the replacement cache is empty
    assert table.failures(first.node_id) == 10
    newcomer = fake((1 << 3) | 7)
    # a stale contact makes room at once for a newcomer (no ping needed)
    assert table.add_or_update(newcomer, 2.0) is AddOutcome.ADDED
    assert first.node_id not in table and newcomer.node_id in table


def test_stale_contact_replaced_from_cache_on_fifth_failure():
    table = RoutingTable(0, DHTConfig(k=1))
    (only,) = fill_bucket(table, 5, 1)
    spare = fake((1 << 5) | 3)
    assert table.add_or_update(spare, 1.0) is AddOutcome.CACHED  # `only` is fresh
    for i in range(4):
        assert table.on_failure(only.node_id, 2.0 + i) is None
    assert table.on_failure(only.node_id, 7.0) == spare
    assert table.bucket(5) == [spare]


def test_success_resets_failures_and_self_is_ignored():
    table = RoutingTable(42, DHTConfig())
    assert table.add_or_update(fake(42), 0.0) is AddOutcome.IGNORED
    c = fake(43)
    table.add_or_update(c, 0.0)
    for _ in range(4):
        table.on_failure(c.node_id, 1.0)
    table.add_or_update(c, 2.0)
    assert table.failures(c.node_id) == 0


def test_bucket_refresh_deadlines_follow_lookups():
    config = DHTConfig()
    table = RoutingTable(0, config, now=100.0)
    assert table.next_refresh_at() is None  # nothing known: nothing to refresh
    table.add_or_update(fake(1 << 200), 100.0)
    assert list(table.refresh_indices()) == list(range(200, 256))
    assert table.next_refresh_at() == 100.0 + config.bucket_refresh_interval
    assert table.refresh_due(100.0 + 3599) == []
    due = table.refresh_due(100.0 + 3600)
    assert due == list(range(200, 256))
    rng = random.Random(1)
    for i in due:
        target = table.random_id_in_bucket(i, rng.getrandbits)
        assert bucket_index(0, target) == i
        table.mark_lookup(target, 3700.0)
    assert table.refresh_due(3701.0) == []
    assert table.next_refresh_at() == 3700.0 + 3600


def test_node_id_is_sha256_of_peer_id():
    import hashlib

    c = contact(1)
    assert c.node_id == int.from_bytes(hashlib.sha256(c.peer.raw).digest(), "big")
    assert node_id_of(c.peer.raw) == c.node_id


@settings(max_examples=40, deadline=None)
@given(self_id=ids, others=st.lists(ids, min_size=0, max_size=80, unique=True),
       target=ids, n=st.integers(0, 25), pick=st.integers(0, 200))
def test_closest_except_drops_exactly_that_node(self_id, others, target, n, pick):
    table = RoutingTable(self_id, DHTConfig(k=4))
    for node_id in others:
        table.add_or_update(fake(node_id), 0.0)
    members = list(table)
    skip = members[pick % len(members)].node_id if members and pick < 150 else pick
    want = [c.node_id for c in table.closest(target, n, exclude=lambda c: c.node_id == skip)]
    assert [c.node_id for c in table.closest_except(target, n, skip)] == want


def test_traffic_keeps_a_bucket_fresh_and_the_paper_rule_does_not():
    """BEP 5's "last changed": an answer from a node in a bucket's range, or a contact added
    to it, postpones its refresh; the paper-strict switch counts only lookups into it."""
    traffic = RoutingTable(0, DHTConfig(), now=0.0)
    strict = RoutingTable(0, DHTConfig(traffic_refreshes_buckets=False), now=0.0)
    for table in (traffic, strict):
        table.add_or_update(fake(1 << 200), 0.0)  # buckets 200..255 to refresh from t=3600
        table.mark_answered((1 << 255) | 7, 3000.0)  # not a contact: only its range counts
        table.add_or_update(fake(1 << 230), 3100.0)  # a contact added to bucket 230
    assert strict.refresh_due(3600.0) == list(range(200, 256))
    due = traffic.refresh_due(3600.0)
    assert due == [i for i in range(200, 256) if i not in (230, 255)]
    for i in due:
        traffic.mark_bucket(i, 3600.0)
    # answers only move clocks later: the cached time may be early, refresh_due corrects it
    assert traffic.next_refresh_at() == 3000.0 + 3600
    assert traffic.refresh_due(6599.0) == []
    assert traffic.refresh_due(6600.0) == [255]
    assert traffic.next_refresh_at() == 6600.0
    traffic.mark_answered((1 << 255) | 9, 6600.0)
    assert traffic.refresh_due(6650.0) == [] and traffic.next_refresh_at() == 3100.0 + 7200 - 3600


def test_replacing_a_dead_contact_counts_as_a_change():
    table = RoutingTable(0, DHTConfig(k=1), now=0.0)
    old, new = fake(1 << 100), fake((1 << 100) | 1)
    table.add_or_update(old, 0.0)
    ping = table.add_or_update(new, 1000.0)
    assert isinstance(ping, PingLeastRecent)  # questionable after 15 min
    assert table.refresh_due(3600.0) == list(range(100, 256))
    assert table.on_ping_result(old.node_id, False, 3000.0) == new  # replaced at t=3000
    assert table.refresh_due(3600.0) == list(range(101, 256))
    for i in range(101, 256):
        table.mark_bucket(i, 3600.0)
    assert table.next_refresh_at() == 6600.0


@settings(max_examples=60, deadline=None)
@given(self_id=ids, others=st.lists(ids, min_size=0, max_size=80, unique=True),
       k=st.integers(1, 8))
def test_neighbourhood_floor_is_the_bucket_of_the_kth_closest(self_id, others, k):
    table = RoutingTable(self_id, DHTConfig(k=k))
    for node_id in others:
        table.add_or_update(fake(node_id), 0.0)
    floor = table.neighbourhood_floor()
    members = sorted((c.node_id for c in table), key=lambda x: x ^ self_id)
    if len(members) < k:
        assert floor == ID_BITS
        return
    assert floor == bucket_index(self_id, members[k - 1])
    below = sum(len(table.bucket(i)) for i in range(floor))
    assert below < k  # so a lookup of our own id asks every one of them
