"""Record store: expiry, precedence, owned (signed) subkeys, limits."""

import dataclasses

import msgpack
import pytest

from overlay.dht.config import StoreLimits
from overlay.dht.records import (
    Record,
    RecordError,
    RecordStore,
    SignatureVerifier,
    StoreOutcome,
    check_record,
    sign_record,
    signing_bytes,
)
from overlay.identity import Identity

NOW = 1000.0
V = msgpack.packb


def plain(key=b"k", value="v", exp=NOW + 60):
    return Record(key, None, V(value), exp)


def sub(subkey, value="v", exp=NOW + 60, key=b"k"):
    return Record(key, subkey, V(value), exp)


@pytest.fixture
def store():
    return RecordStore(StoreLimits())


def test_later_expiration_wins_and_expired_vanish(store):
    assert store.store(plain(value="a", exp=NOW + 10), NOW) is StoreOutcome.STORED
    assert store.store(plain(value="b", exp=NOW + 5), NOW) is StoreOutcome.OUTDATED
    assert store.store(plain(value="b", exp=NOW + 10), NOW) is StoreOutcome.OUTDATED
    assert store.get(b"k", NOW)[0].value == V("a")
    assert store.store(plain(value="c", exp=NOW + 20), NOW) is StoreOutcome.STORED
    assert store.get(b"k", NOW + 19.9)[0].value == V("c")
    assert store.get(b"k", NOW + 20) == []
    assert len(store) == 0 and store.total_bytes == 0


def test_subkeys_expire_independently(store):
    store.store(sub("a", exp=NOW + 10), NOW)
    store.store(sub("b", exp=NOW + 30), NOW)
    assert {r.subkey for r in store.get(b"k", NOW)} == {"a", "b"}
    assert {r.subkey for r in store.get(b"k", NOW + 15)} == {"b"}
    # purge on write removes expired entries of other keys too
    store.store(plain(key=b"other", exp=NOW + 100), NOW + 40)
    assert store.keys() == [b"other"] and len(store) == 1


def test_plain_and_dictionary_replace_each_other_by_expiration(store):
    store.store(plain(exp=NOW + 10), NOW)
    assert store.store(sub("a", exp=NOW + 5), NOW) is StoreOutcome.OUTDATED
    assert store.store(sub("a", exp=NOW + 20), NOW) is StoreOutcome.STORED
    assert [r.subkey for r in store.get(b"k", NOW)] == ["a"]
    assert store.store(plain(exp=NOW + 15), NOW) is StoreOutcome.OUTDATED
    assert store.store(plain(exp=NOW + 25), NOW) is StoreOutcome.STORED
    assert [r.subkey for r in store.get(b"k", NOW)] == [None]
    assert len(store) == 1


def owned(identity, value="v", exp=NOW + 60, key=b"k"):
    return sign_record(key, str(identity.peer_id), V(value), exp, identity.sign)


def test_owned_subkey_needs_its_owners_signature():
    limits, verifier = StoreLimits(), SignatureVerifier()
    alice, mallory = Identity.generate(), Identity.generate()
    good = owned(alice)
    assert check_record(good, NOW, limits, verifier) == good
    # signed by someone else
    forged = sign_record(b"k", str(alice.peer_id), V("v"), NOW + 60, mallory.sign)
    with pytest.raises(RecordError, match="signature"):
        check_record(forged, NOW, limits, verifier)
    # signature valid, but for other contents
    for change in ({"value": V("x")}, {"expiration": NOW + 61}, {"key": b"j"}):
        with pytest.raises(RecordError, match="signature"):
            check_record(dataclasses.replace(good, **change), NOW, limits, verifier)
    with pytest.raises(RecordError, match="signature"):
        check_record(dataclasses.replace(good, signature=None), NOW, limits, verifier)
    # a peer id-looking subkey that is not a valid peer id
    with pytest.raises(RecordError, match="peer id"):
        check_record(sub("12D3KooWnotreally"), NOW, limits, verifier)
    # expired, even if perfectly signed
    with pytest.raises(RecordError, match="expired"):
        check_record(owned(alice, exp=NOW - 1), NOW, limits, verifier)


def test_signature_is_over_a_domain_separated_canonical_encoding():
    data = signing_bytes(b"k", "s", b"\x01", 5)
    assert data == signing_bytes(b"k", "s", b"\x01", 5.0)
    assert msgpack.unpackb(data)[0] == "overlay-node/dht-record/1"


def test_unsigned_writes_cannot_wipe_owned_entries(store):
    alice = Identity.generate()
    store.store(plain(exp=NOW + 500), NOW)
    # an owned entry replaces a plain value whatever its expiration
    assert store.store(owned(alice, exp=NOW + 10), NOW) is StoreOutcome.STORED
    assert store.store(plain(exp=NOW + 1000), NOW) is StoreOutcome.PROTECTED
    assert [r.subkey for r in store.get(b"k", NOW)] == [str(alice.peer_id)]


def test_signature_on_unowned_record_is_dropped():
    record = dataclasses.replace(sub("free"), signature=b"\x00" * 64)
    assert check_record(record, NOW, StoreLimits(), SignatureVerifier()).signature is None


def test_size_and_ttl_limits():
    limits = StoreLimits(max_key_bytes=8, max_subkey_chars=4, max_value_bytes=16, max_ttl=100)
    verifier = SignatureVerifier()
    check_record(plain(key=b"12345678"), NOW, limits, verifier)
    cases = [
        (plain(key=b"123456789"), "key"),
        (plain(key=b""), "key"),
        (sub("abcde"), "subkey"),
        (plain(value="x" * 20), "value"),
        (plain(exp=NOW + 101), "ahead"),
        (plain(exp=float("nan")), "expired"),
        (Record(b"k", None, b"\xc1", NOW + 5), "msgpack"),  # 0xc1 is never valid msgpack
    ]
    for record, reason in cases:
        with pytest.raises(RecordError, match=reason):
            check_record(record, NOW, limits, verifier)
    # records received from a get may lie further ahead (other clocks)
    check_record(plain(exp=NOW + 500), NOW, limits, verifier, check_ttl=False)


def test_subkeys_per_key_limit_makes_room_only_for_owned_entries():
    store = RecordStore(StoreLimits(max_subkeys_per_key=3))
    for i, exp in enumerate([30, 10, 20]):
        assert store.store(sub(f"s{i}", exp=NOW + exp), NOW) is StoreOutcome.STORED
    assert store.store(sub("s9", exp=NOW + 99), NOW) is StoreOutcome.FULL
    alice = Identity.generate()
    assert store.store(owned(alice, exp=NOW + 5), NOW) is StoreOutcome.STORED
    assert {r.subkey for r in store.get(b"k", NOW)} == {"s0", "s2", str(alice.peer_id)}


def test_total_bytes_limit_evicts_soonest_expiring_first():
    one = plain(key=b"a").size()
    store = RecordStore(StoreLimits(max_total_bytes=3 * one))
    for key, exp in ((b"a", 30), (b"b", 10), (b"c", 20)):
        assert store.store(plain(key=key, exp=NOW + exp), NOW) is StoreOutcome.STORED
    assert store.total_bytes == 3 * one
    # a record expiring sooner than everything held is refused
    assert store.store(plain(key=b"d", exp=NOW + 5), NOW) is StoreOutcome.FULL
    assert store.store(plain(key=b"e", exp=NOW + 40), NOW) is StoreOutcome.STORED
    assert sorted(store.keys()) == [b"a", b"c", b"e"]
    assert store.total_bytes <= 3 * one


def test_one_peer_cannot_take_more_than_its_share_of_the_store():
    """One peer could fill the whole max_total_bytes with its records, so that everyone
    else's were evicted or refused; now each storing peer has max_bytes_per_peer."""
    one = plain(key=b"h0").size()  # (every key here has two bytes)
    store = RecordStore(StoreLimits(max_total_bytes=10 * one, max_bytes_per_peer=3 * one))
    hog, other = "hog", "other"
    for i in range(3):
        assert store.store(plain(key=b"h%d" % i, exp=NOW + 99), NOW, hog) is StoreOutcome.STORED
    assert store.store(plain(key=b"h3", exp=NOW + 99), NOW, hog) is StoreOutcome.OVER_QUOTA
    assert store.stored_by(hog) == 3 * one
    # refreshing its own record frees its old one first; another peer's still counts
    assert store.store(plain(key=b"h0", exp=NOW + 120), NOW, hog) is StoreOutcome.STORED
    for i in range(2):
        assert store.store(plain(key=b"o%d" % i), NOW, other) is StoreOutcome.STORED
    assert store.store(plain(key=b"o0", exp=NOW + 99), NOW, hog) is StoreOutcome.OVER_QUOTA
    assert store.store(sub("s", key=b"o1", exp=NOW + 99), NOW, hog) is StoreOutcome.OVER_QUOTA
    # the node's own records and whatever expires or is replaced give the quota back
    assert store.store(plain(key=b"mine", exp=NOW + 99), NOW) is StoreOutcome.STORED
    assert store.store(plain(key=b"h1", exp=NOW + 130), NOW, other) is StoreOutcome.STORED
    assert (store.stored_by(hog), store.stored_by(other)) == (2 * one, 3 * one)
    store.purge(NOW + 100)
    assert (store.stored_by(hog), store.stored_by(other)) == (one, one)
    store.purge(NOW + 200)
    assert store.stored_by(hog) == store.stored_by(other) == 0 and len(store) == 0


def test_heap_garbage_stays_bounded():
    store = RecordStore(StoreLimits())
    for i in range(2000):
        store.store(plain(value=i, exp=NOW + 1 + i), NOW)
    assert len(store) == 1
    assert len(store._heap) <= 2 * len(store) + 64


def test_verifier_caches_success_only():
    alice = Identity.generate()
    verifier = SignatureVerifier(capacity=2)
    record = owned(alice)
    assert verifier.verify(alice.peer_id, record)
    assert verifier.verify(alice.peer_id, record)
    bad = dataclasses.replace(record, value=V("other"))
    assert not verifier.verify(alice.peer_id, bad)
    assert not verifier.verify(alice.peer_id, bad)
    for i in range(5):
        assert verifier.verify(alice.peer_id, owned(alice, value=i))
    assert len(verifier._verified) == 2
