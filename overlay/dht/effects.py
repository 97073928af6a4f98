"""What the DHT core asks its driver to do, and what its operations return.

The core never performs I/O: after every input the driver drains `DHTNode.take_effects()`
and carries out each `SendRequest` (reporting back through `on_response` / `on_failure`),
and delivers each `OperationDone` to whoever started the operation.

Pure data: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from overlay.dht.contact import Contact
from overlay.dht.messages import Request
from overlay.dht.records import Record


@dataclass(frozen=True, slots=True)
class SendRequest:
    """Send `request` to `contact`; give up after `timeout` seconds and report a failure."""

    req_id: int
    contact: Contact
    request: Request
    timeout: float


@dataclass(frozen=True, slots=True)
class OperationDone:
    op_id: int
    result: GetResult | StoreResult | FindResult | BootstrapResult


@dataclass(frozen=True, slots=True)
class LookupStats:
    """Cost of an operation: requests sent, and hops (rounds of answers leading to the
    answer that ended it: 1 when a seed answered)."""

    requests: int
    hops: int


@dataclass(frozen=True, slots=True)
class GetResult:
    """Per requested key: the live verified records found (empty: not found)."""

    records: dict[bytes, list[Record]]
    stats: LookupStats


@dataclass(frozen=True, slots=True)
class StoreResult:
    """Per record, in the order given: how many nodes (ourselves included) now hold it."""

    replicas: list[int]
    stats: LookupStats


@dataclass(frozen=True, slots=True)
class FindResult:
    """Per target id: the closest nodes that answered, nearest first."""

    closest: dict[int, list[Contact]]
    stats: LookupStats


@dataclass(frozen=True, slots=True)
class BootstrapResult:
    """Routing-table size after joining; `reached` is False when no bootstrap peer answered."""

    table_size: int
    reached: bool
    stats: LookupStats = field(default_factory=lambda: LookupStats(0, 0))
