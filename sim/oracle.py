"""Ground truth for the DHT scenarios: which nodes are up, and the true k closest to an id.

Lookups are judged against this brute-force index, never against the DHT's own answers.
The XOR-closest ids are found in a sorted list by walking the implicit binary trie: the ids
sharing a prefix with the target form one contiguous slice, and every id of the slice that
agrees with the target on the next bit is closer than every id that does not. A query costs
O(k + 256 log n) instead of a sort of all n ids.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort

from overlay.dht.ids import ID_BITS


def xor_closest(ids: list[int], target: int, k: int) -> list[int]:
    """The k ids of the sorted list `ids` closest to `target` by XOR, nearest first."""
    out: list[int] = []

    def visit(lo: int, hi: int, bit: int, prefix: int) -> None:
        # ids[lo:hi] are exactly the ids whose bits above `bit` equal those of `prefix`.
        while hi - lo > k - len(out) and bit >= 0:
            mid = bisect_left(ids, prefix | (1 << bit), lo, hi)
            if (target >> bit) & 1:
                near, far = (mid, hi, prefix | (1 << bit)), (lo, mid, prefix)
            else:
                near, far = (lo, mid, prefix), (mid, hi, prefix | (1 << bit))
            visit(near[0], near[1], bit - 1, near[2])
            if len(out) >= k:
                return
            lo, hi, prefix = far
            bit -= 1
        out.extend(sorted(ids[lo:hi], key=lambda x: x ^ target)[: k - len(out)])

    if k > 0 and ids:
        visit(0, len(ids), ID_BITS - 1, 0)
    return out[:k]


class AliveIndex:
    """The node ids that are up: sorted (for xor_closest) and in an array (random choice)."""

    __slots__ = ("_array", "_position", "sorted_ids")

    def __init__(self) -> None:
        self.sorted_ids: list[int] = []
        self._array: list[int] = []  # node indices, any order
        self._position: dict[int, int] = {}  # node index -> position in _array

    def __len__(self) -> int:
        return len(self._array)

    def __contains__(self, index: int) -> bool:
        return index in self._position

    def add(self, index: int, node_id: int) -> None:
        if index in self._position:
            return
        self._position[index] = len(self._array)
        self._array.append(index)
        insort(self.sorted_ids, node_id)

    def remove(self, index: int, node_id: int) -> None:
        pos = self._position.pop(index, None)
        if pos is None:
            return
        last = self._array.pop()
        if last != index:
            self._array[pos] = last
            self._position[last] = pos
        at = bisect_left(self.sorted_ids, node_id)
        if at < len(self.sorted_ids) and self.sorted_ids[at] == node_id:
            del self.sorted_ids[at]

    def random(self, rng: random.Random, exclude: int | None = None) -> int | None:
        """A uniformly chosen live node index (other than `exclude`), or None."""
        n = len(self._array)
        if n == 0 or (n == 1 and self._array[0] == exclude):
            return None
        while True:
            index = self._array[rng.randrange(n)]
            if index != exclude:
                return index

    def closest(self, target: int, k: int) -> list[int]:
        return xor_closest(self.sorted_ids, target, k)
