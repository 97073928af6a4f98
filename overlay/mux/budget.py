"""What the connections of a host hold together, shared fairly (sans-IO): the bytes of
unfinished messages received (below), the bytes queued to send, and the streams peers opened
(HostConfig.max_unsent_bytes_total and max_streams_total: the same rule, other units).

A receiver keeps every fragment of a message until its END arrives, and returns flow-control
credit for those fragments as they come (a message may be larger than a window), so what a
peer makes us hold is bounded by the messages it leaves unfinished, not by the windows. Each
`MuxConnection` bounds its own share (`MuxConfig.max_partial_bytes`); one `PartialBudget`,
shared by the connections of a host, bounds their sum.

Why a fair share and not first come, first served: with a plain total, a few connections
that fill the budget with messages they never finish would have every other peer's large
request refused. Once the total is reached, a connection may still add to its unfinished
messages while it holds less than an equal share of the budget (`limit` divided by the
connections holding any), so the hogs are refused first and honest peers go on. The total
can pass `limit` by at most one frame per connection.

Spare buffers (a stream keeps the buffers of its last messages assembled in place, to reuse
one: overlay/streams.py) are counted apart, in `spares`: one is kept only while unfinished
messages and spares together fit, so spares never make a message refused, and what they pin
stays within the budget too (at most `limit` besides the unfinished messages).
"""

from __future__ import annotations


class PartialBudget:
    """Units (bytes, streams) held by the connections of one host (see module doc)."""

    __slots__ = ("held", "holders", "limit", "spares")

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"the budget must be positive, got {limit}")
        self.limit = limit
        self.held = 0  # bytes, over all connections
        self.holders = 0  # connections holding at least one byte
        self.spares = 0  # bytes of spare buffers kept (module doc)

    def admits(self, conn_held: int, size: int) -> bool:
        """Whether a connection that holds `conn_held` bytes may hold `size` more."""
        if self.held + size <= self.limit:
            return True
        holders = self.holders + (conn_held == 0)
        return conn_held + size <= self.limit // holders

    def try_take(self, conn_held: int, size: int) -> bool:
        """`admits` then `take` in one call (hot paths: a stream opened, a fragment held)."""
        if self.held + size > self.limit:
            holders = self.holders + (conn_held == 0)
            if conn_held + size > self.limit // holders:
                return False
        if conn_held == 0 and size:
            self.holders += 1
        self.held += size
        return True

    def take(self, conn_held: int, size: int) -> None:
        """The connection (holding `conn_held` before) now holds `size` more."""
        if conn_held == 0 and size:
            self.holders += 1
        self.held += size

    def give(self, conn_held: int, size: int) -> None:
        """The connection (holding `conn_held` before) now holds `size` less."""
        self.held -= size
        if conn_held and conn_held == size:
            self.holders -= 1
