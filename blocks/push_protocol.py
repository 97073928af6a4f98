"""Server-to-server push in inference sessions: the wire rules (docs/block_protocol.md, "Push").

In a push step the client sends its hidden states to the first server of its chain only, with
the list of the servers after it (`next`, one `PushHop` each: peer id, the session token that
server issued, the step id the client gave that server's part of the step). Each server runs
its blocks, answers its client as usual (so the client keeps every span's input for replay)
and sends its output straight to the next hop with `blocks.push`, passing the rest of the
list on. Everything here arrives from untrusted peers: the functions below check types,
sizes and ranges and raise `RequestError(BAD_INPUT)` on anything malformed.

Pure: no torch, no asyncio, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blocks.protocol import BAD_INPUT, MAX_LENGTH, Reorder, RequestError, parse_mask, parse_reorder
from overlay.identity import IdentityError, PeerId
from overlay.multiaddr import Multiaddr, MultiaddrError

# Version of the push extension of `blocks.inference` (1: this document).
PUSH_VERSION = 1
METHOD_PUSH = "blocks.push"

TOKEN_BYTES = 16  # a session's push token: random, known only to the client and its chain
MAX_CHAIN = 64  # hops in one `next` list; far above any real chain (one hop per span)
MAX_HOP_ADDRS = 4  # addresses of one hop, as older clients sent them (never dialed)
MAX_STEP_ID = 1 << 62
MAX_REASON = 200  # characters of a push-failure reason sent back to the client


@dataclass(frozen=True, slots=True)
class PushHop:
    """The next server of a push chain: where to send, into which session, as which step."""

    peer: str  # canonical text peer id
    token: bytes  # the session token that server issued to the client
    step_id: int  # the client's step id for that server's part of this step
    # Where the client says it listens: older clients send it; servers never dial it (only
    # the addresses the next server announced, blocks/push.py), so new clients leave it out.
    addrs: tuple[str, ...] = ()
    reorder: Reorder | None = None  # beam search: that session's reorder for this step

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"peer": self.peer, "token": self.token, "step": self.step_id}
        if self.addrs:
            wire["addrs"] = list(self.addrs)
        if self.reorder is not None:
            wire["reorder"] = reorder_to_wire(self.reorder)
        return wire


def reorder_to_wire(reorder: Reorder) -> list[Any]:
    return [reorder.version, list(reorder.ids)]


@dataclass(frozen=True, slots=True)
class PushRequest:
    """One `blocks.push` call: a step of session `token`, as if its client had sent it."""

    token: bytes
    step_id: int
    position: int
    chain: tuple[PushHop, ...]  # the hops after the receiver
    mask: bytes | None = None  # the step's padding mask, as the client sent it
    reorder: Reorder | None = None  # the receiver's reorder for this step (beam search)

    def step_meta(self) -> dict[str, Any]:
        """The metadata a client step carrying this request would have."""
        meta: dict[str, Any] = {"position": self.position, "step": self.step_id}
        if self.chain:
            meta["next"] = chain_to_wire(self.chain)
        if self.mask is not None:
            meta["mask"] = self.mask
        if self.reorder is not None:
            meta["reorder"] = reorder_to_wire(self.reorder)
        return meta


# Every step of a session names the same next hops: peer ids and addresses already found
# valid are not parsed again (base58 and multiaddr parsing cost more than the rest of a step's
# metadata). Bounded: cleared when full.
_VALID_CACHE_SIZE = 4096
_valid_peers: set[str] = set()
_valid_addrs: set[str] = set()


def _remember(cache: set[str], value: str) -> None:
    if len(cache) >= _VALID_CACHE_SIZE:
        cache.clear()
    cache.add(value)


def chain_to_wire(chain: tuple[PushHop, ...] | list[PushHop]) -> list[dict[str, Any]]:
    return [hop.to_wire() for hop in chain]


def wants_push(meta: Any) -> bool:
    """Whether a session request asks for push (`"push": 1`, the client's push version)."""
    if not isinstance(meta, dict):
        return False
    value = meta.get("push")
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def parse_token(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) != TOKEN_BYTES:
        raise RequestError(BAD_INPUT, f"a push token is {TOKEN_BYTES} bytes")
    return value


def _step_id(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_STEP_ID:
        raise RequestError(BAD_INPUT, f"a step id is an integer in [0, {MAX_STEP_ID}]")
    return value


def _peer(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 64:
        raise RequestError(BAD_INPUT, "a push hop's peer must be a peer id")
    if value in _valid_peers:
        return value
    try:
        canonical = str(PeerId.from_string(value))
    except IdentityError as e:
        raise RequestError(BAD_INPUT, f"bad push hop peer id: {e}") from None
    if canonical != value:
        raise RequestError(BAD_INPUT, "a push hop's peer id must be canonical")
    _remember(_valid_peers, value)
    return value


def _addrs(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_HOP_ADDRS:
        raise RequestError(BAD_INPUT, f"a push hop has a list of at most {MAX_HOP_ADDRS} "
                                      "addresses")
    if all(type(addr) is str and addr in _valid_addrs for addr in value):
        return tuple(value)
    for addr in value:
        if not isinstance(addr, str) or len(addr) > 256:
            raise RequestError(BAD_INPUT, "a push hop address must be a multiaddr")
        try:
            Multiaddr.parse(addr)
        except MultiaddrError as e:
            raise RequestError(BAD_INPUT, f"bad push hop address: {e}") from None
        _remember(_valid_addrs, addr)
    return tuple(value)


def parse_chain(value: Any) -> tuple[PushHop, ...]:
    """The `next` list of a step or a push; absent (None) means: do not push."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_CHAIN:
        raise RequestError(BAD_INPUT, f"'next' must be a list of at most {MAX_CHAIN} hops")
    hops = []
    for entry in value:
        if not isinstance(entry, dict):
            raise RequestError(BAD_INPUT, "a push hop must be a map")
        hops.append(PushHop(_peer(entry.get("peer")), parse_token(entry.get("token")),
                            _step_id(entry.get("step")), _addrs(entry.get("addrs", [])),
                            parse_reorder(entry.get("reorder"))))
    # A chain visits each session once (one per span); a token named again would make one
    # message cost up to MAX_CHAIN span computations on a peer's own few sessions.
    if len({hop.token for hop in hops}) != len(hops):
        raise RequestError(BAD_INPUT, "a push chain names a session twice")
    return tuple(hops)


def parse_push_request(meta: Any) -> PushRequest:
    if not isinstance(meta, dict):
        raise RequestError(BAD_INPUT, "push metadata must be a map")
    position = meta.get("position")
    if not isinstance(position, int) or isinstance(position, bool) or \
            not 0 <= position <= MAX_LENGTH:
        raise RequestError(BAD_INPUT, f"'position' must be an integer in [0, {MAX_LENGTH}]")
    return PushRequest(parse_token(meta.get("token")), _step_id(meta.get("step")), position,
                       parse_chain(meta.get("next")), parse_mask(meta.get("mask")),
                       parse_reorder(meta.get("reorder")))


def push_meta(hop: PushHop, position: int, rest: tuple[PushHop, ...],
              mask: bytes | None = None) -> dict[str, Any]:
    """The metadata of the `blocks.push` call that sends a step on to `hop` (with the step's
    padding mask, which every span of the chain applies)."""
    meta: dict[str, Any] = {"token": hop.token, "step": hop.step_id, "position": position}
    if rest:
        meta["next"] = chain_to_wire(rest)
    if mask is not None:
        meta["mask"] = mask
    if hop.reorder is not None:  # each session has its own reorders
        meta["reorder"] = reorder_to_wire(hop.reorder)
    return meta


def failure_notice(step_id: int, reason: str) -> dict[str, Any]:
    """What a server tells its client when it could not push step `step_id` on: the client
    then sends that output to the next server itself."""
    return {"step": step_id, "push_failed": reason[:MAX_REASON]}
