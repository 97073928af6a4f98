"""The uploaded-LoRA cache of a block server: content-addressed, bounded in bytes, idle-expiring.

Clients upload the LoRA weights of their span once (blocks.lora_put) and then name them by
digest in every forward, backward and inference request, so weights cross the network once per
training step (or per generation session), not once per request. An entry is evicted when it
has not been used for `idle_timeout` seconds, when its uploader replaces it with a newer
version (only an uploader can: every server of a chain learns the digests of the requests it
serves, so a digest is no secret; content uploaded by several clients stays until all of them
have replaced it), or, least recently used first, when a new upload needs room; entries pinned
by an open inference session are never evicted (the session ends, the pin goes, then the
entry may). Room is shared fairly: each uploader holding entries has a share of `max_bytes`
divided by their number; an upload evicts only its uploader's own entries once that uploader
holds more than its share, and otherwise also entries of uploaders over their share (so that
one peer's uploads cannot push everybody else's adapters out).

Pure: no torch, no asyncio, no clock (`now` is passed in). Values are opaque.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


class AdapterCacheFullError(ValueError):
    """An upload that does not fit even after evicting everything evictable."""


@dataclass(slots=True)
class _Entry:
    value: Any
    size: int
    last_used: float
    pins: int = 0
    owners: set = field(default_factory=set)  # who uploaded it (opaque ids)


class AdapterCache:
    __slots__ = ("_entries", "idle_timeout", "max_bytes", "used_bytes")

    def __init__(self, max_bytes: int, idle_timeout: float):
        self.max_bytes = max_bytes
        self.idle_timeout = idle_timeout
        self.used_bytes = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str, now: float) -> Any | None:
        """The value under `key` (marking it used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry.last_used = now
        self._entries.move_to_end(key)
        return entry.value

    def put(self, key: str, value: Any, size: int, now: float, owner: Any = None) -> list[str]:
        """Store `value`, uploaded by `owner`; returns the keys evicted to make room. An
        existing key is only touched (same content, same digest) and gains the owner."""
        entry = self._entries.get(key)
        if entry is not None:
            self.get(key, now)
            entry.owners.add(owner)
            return []
        if size > self.max_bytes:
            raise AdapterCacheFullError(f"{size} bytes exceed this server's adapter cache of "
                                        f"{self.max_bytes} bytes")
        evicted = self.expire(now)
        pinned = sum(entry.size for entry in self._entries.values() if entry.pins)
        if pinned + size > self.max_bytes:  # refused before anything is evicted for it
            raise AdapterCacheFullError(f"the adapter cache is full of adapters in use "
                                        f"({pinned} of {self.max_bytes} bytes)")
        victims = self._room_for(size, owner)
        if victims is None:
            raise AdapterCacheFullError(
                f"the adapter cache has no room for {size} bytes beside adapters in use and "
                f"other peers' fair shares ({self.max_bytes} bytes in all)")
        for old in victims:
            self._remove(old)
        evicted.extend(victims)
        self._entries[key] = _Entry(value, size, now, owners={owner})
        self.used_bytes += size
        return evicted

    def _room_for(self, size: int, owner: Any) -> list[str] | None:
        """The entries to evict, least recently used first, so that `owner` can add `size`
        bytes; None when its fair share does not allow it (nothing is evicted then)."""
        held: dict[Any, int] = {owner: 0}  # bytes per uploader (a shared entry counts to each)
        for entry in self._entries.values():
            for who in entry.owners:
                held[who] = held.get(who, 0) + entry.size
        share = self.max_bytes // len(held)
        own_only = held[owner] > share
        free = self.max_bytes - self.used_bytes
        victims = []
        for key, entry in self._entries.items():
            if free >= size:
                break
            if entry.pins:
                continue
            if entry.owners != {owner} and (
                    own_only or not all(held[who] > share for who in entry.owners)):
                continue  # another peer's, within its share
            victims.append(key)
            free += entry.size
            for who in entry.owners:
                held[who] -= entry.size
        return victims if free >= size else None

    def discard(self, key: str, owner: Any = None) -> bool:
        """`owner` no longer needs `key`: dropped unless another uploader still needs it
        (nothing happens while an open session pins it, or for someone who never uploaded
        it); True if dropped."""
        entry = self._entries.get(key)
        if entry is None or entry.pins or owner not in entry.owners:
            return False
        entry.owners.discard(owner)
        if entry.owners:
            return False
        self._remove(key)
        return True

    def pin(self, key: str, now: float) -> Any | None:
        """Keep `key` while a session uses it; returns its value (None: not held)."""
        value = self.get(key, now)
        if value is not None:
            self._entries[key].pins += 1
        return value

    def unpin(self, key: str, now: float) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.pins:
            entry.pins -= 1
            entry.last_used = now

    def expire(self, now: float) -> list[str]:
        """Evict unpinned entries idle for longer than `idle_timeout`; returns their keys."""
        stale = [key for key, entry in self._entries.items()
                 if entry.pins == 0 and now - entry.last_used > self.idle_timeout]
        for key in stale:
            self._remove(key)
        return stale

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.used_bytes -= entry.size
