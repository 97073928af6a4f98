"""The uploaded-LoRA cache and the fine-tuning parts of the block protocol: pure, no sockets."""

from __future__ import annotations

import pytest

from blocks import protocol
from blocks.adapter_cache import AdapterCache, AdapterCacheFullError
from blocks.protocol import RequestError
from model_parts.lora_format import lora_digest

D1, D2, D3 = "1" * 64, "2" * 64, "3" * 64


def test_cache_evicts_least_recently_used_and_never_pinned():
    cache = AdapterCache(max_bytes=100, idle_timeout=60)
    assert cache.put("a", "A", 40, now=0) == []
    assert cache.put("b", "B", 40, now=1) == []
    assert cache.get("a", now=2) == "A"  # a is now the most recently used
    assert cache.put("c", "C", 40, now=3) == ["b"]
    assert "b" not in cache and cache.used_bytes == 80
    assert cache.pin("a", now=4) == "A"
    assert cache.put("d", "D", 50, now=5) == ["c"]  # a is pinned: c goes instead
    with pytest.raises(AdapterCacheFullError, match="in use"):
        cache.put("e", "E", 61, now=6)  # only d could go, and that is not enough
    assert "d" in cache and cache.used_bytes == 90  # a refused upload evicts nothing
    with pytest.raises(AdapterCacheFullError, match="exceed"):
        cache.put("huge", "H", 101, now=7)
    assert not cache.discard("a")  # pinned
    cache.unpin("a", now=8)
    assert cache.discard("a") and cache.used_bytes == 50


def test_cache_expires_idle_entries_but_not_pinned_ones():
    cache = AdapterCache(max_bytes=100, idle_timeout=10)
    cache.put("a", "A", 10, now=0)
    cache.put("b", "B", 10, now=0)
    cache.pin("b", now=0)
    assert cache.expire(now=5) == []
    assert cache.get("a", now=8) == "A"  # use refreshes
    assert cache.expire(now=15) == []
    assert cache.expire(now=18.5) == ["a"]
    assert cache.expire(now=1000) == []  # b is pinned by a session
    cache.unpin("b", now=1000)
    assert cache.expire(now=1011) == ["b"] and len(cache) == 0 and cache.used_bytes == 0


def test_same_content_is_stored_once():
    cache = AdapterCache(max_bytes=100, idle_timeout=10)
    cache.put("a", "A", 60, now=0)
    assert cache.put("a", "A", 60, now=1) == [] and cache.used_bytes == 60


def test_only_an_uploader_replaces_an_entry_and_only_once_all_have():
    """Digests are no secret (every server of a chain sees them): another client naming one
    in `replaces` must not evict it."""
    cache = AdapterCache(max_bytes=100, idle_timeout=60)
    cache.put("a", "A", 10, now=0, owner="alice")
    assert not cache.discard("a", "mallory") and "a" in cache
    cache.put("a", "A", 10, now=1, owner="bob")  # same content, a second uploader
    assert not cache.discard("a", "alice") and "a" in cache  # bob still needs it
    assert not cache.discard("a", "alice")  # alice's claim is gone; still bob's
    assert cache.discard("a", "bob") and "a" not in cache and cache.used_bytes == 0



def test_one_uploader_evicts_only_its_own_adapters_once_over_its_fair_share():
    """Uploads by one peer pushed every other peer's unpinned adapters out (least recently
    used first, whoever uploaded them); now each uploader has a fair share of the cache."""
    cache = AdapterCache(max_bytes=100, idle_timeout=600)
    cache.put("alice", "A", 30, now=0, owner="alice")
    cache.put("bob", "B", 30, now=1, owner="bob")
    evicted = []
    for i in range(4):  # shares of 33 bytes: mallory holds one, then replaces her own
        evicted += cache.put(f"m{i}", "M", 30, now=2 + i, owner="mallory")
    assert evicted == ["m0", "m1", "m2"]
    assert "alice" in cache and "bob" in cache and cache.used_bytes == 90
    with pytest.raises(AdapterCacheFullError, match="fair shares"):
        cache.put("big", "M", 60, now=9, owner="mallory")  # more than her own can make room
    assert "m3" in cache and cache.used_bytes == 90  # refused: nothing evicted
    # a peer within its share may evict one that holds more than its own
    cache = AdapterCache(max_bytes=100, idle_timeout=600)
    cache.put("m0", "M", 40, now=0, owner="mallory")
    cache.put("m1", "M", 40, now=1, owner="mallory")
    assert cache.put("alice", "A", 40, now=2, owner="alice") == ["m0"]
    assert cache.put("bob", "B", 20, now=3, owner="bob") == []  # fits as it is
    # the total bound holds whoever uploads
    assert cache.used_bytes == 100

@pytest.mark.parametrize("meta, count, leading, expected", [
    ({}, 1, 1, protocol.TuningRequest()),
    ({}, 2, 1, protocol.TuningRequest(mask=True)),  # the layout from before fine-tuning
    ({"mask": True, "prompts": True}, 3, 1, protocol.TuningRequest(prompts=True, mask=True)),
    ({"prompts": True}, 3, 2, protocol.TuningRequest(prompts=True)),
    ({"adapter": "tuned"}, 2, 2, protocol.TuningRequest(adapter="tuned")),
    ({"lora": D1, "mask": False}, 2, 2, protocol.TuningRequest(lora=D1)),
])
def test_tuning_layouts(meta, count, leading, expected):
    assert protocol.parse_tuning(meta, count, leading) == expected


@pytest.mark.parametrize("meta, count, match", [
    ({"prompts": True}, 1, "expected 2 tensors"),
    ({"mask": False}, 2, "expected 1 tensors"),
    ({"prompts": "yes"}, 2, "true or false"),
    ({"lora": "abc"}, 1, "hex digest"),
    ({"adapter": ""}, 1, "name"),
    ({"adapter": "x" * 200}, 1, "name"),
    ({"adapter": "a", "lora": D1}, 1, "not both"),
])
def test_bad_tuning_meta(meta, count, match):
    with pytest.raises(RequestError, match=match) as info:
        protocol.parse_tuning(meta, count, leading=1)
    assert info.value.code == protocol.BAD_INPUT


def _put_meta(**changes):
    meta = {"model": "m", "start": 0, "end": 2, "rank": 4, "alpha": 8, "modules": ["a.q", "a.v"],
            "digest": D1}
    meta.update(changes)
    return meta


def test_lora_put_parsing():
    request = protocol.parse_lora_put(_put_meta(replaces=D2), "m", (0, 4), tensor_count=8)
    assert request.modules == ("a.q", "a.v") and request.scaling == 2.0
    assert request.replaces == D2 and request.tensor_count == 8
    rs = protocol.parse_lora_put(_put_meta(rslora=True), "m", (0, 4), tensor_count=8)
    assert rs.scaling == pytest.approx(4.0)


@pytest.mark.parametrize("changes, count, code", [
    ({}, 7, protocol.BAD_INPUT),
    ({"rank": 0}, 8, protocol.BAD_INPUT),
    ({"rank": 5000}, 8, protocol.BAD_INPUT),
    ({"alpha": -1}, 8, protocol.BAD_INPUT),
    ({"modules": []}, 0, protocol.BAD_INPUT),
    ({"modules": ["a.q", "a.q"]}, 8, protocol.BAD_INPUT),
    ({"modules": ["../etc"]}, 4, protocol.BAD_INPUT),
    ({"digest": "z" * 64}, 8, protocol.BAD_INPUT),
    ({"start": 3, "end": 6}, 8, protocol.BAD_RANGE),
    ({"model": "other"}, 8, protocol.UNKNOWN_MODEL),
])
def test_bad_lora_put(changes, count, code):
    with pytest.raises(RequestError) as info:
        protocol.parse_lora_put(_put_meta(**changes), "m", (0, 4), tensor_count=count)
    assert info.value.code == code


def test_digest_covers_layout_and_bytes():
    base = lora_digest(0, 2, 4, 8.0, False, ["q"], [("float32", (4, 8), b"\0" * 128)])
    assert base == lora_digest(0, 2, 4, 8.0, False, ["q"],
                                        [("float32", (4, 8), b"\0" * 128)])
    others = [
        lora_digest(0, 2, 4, 8.0, False, ["q"],
                             [("float32", (4, 8), b"\1" + b"\0" * 127)]),
        lora_digest(0, 2, 4, 8.0, False, ["q"], [("float32", (8, 4), b"\0" * 128)]),
        lora_digest(0, 2, 4, 8.0, False, ["q"], [("bfloat16", (4, 16), b"\0" * 128)]),
        lora_digest(0, 2, 4, 16.0, False, ["q"], [("float32", (4, 8), b"\0" * 128)]),
        lora_digest(1, 3, 4, 8.0, False, ["q"], [("float32", (4, 8), b"\0" * 128)]),
        lora_digest(0, 2, 4, 8.0, True, ["q"], [("float32", (4, 8), b"\0" * 128)]),
    ]
    assert len({base, *others}) == 1 + len(others)
