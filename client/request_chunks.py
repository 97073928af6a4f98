"""How the client cuts its work to fit a server's request limit (docs/block_protocol.md,
"Request limit").

A server takes at most `limit` tokens, batch x length, in one `blocks.forward` or inference
step, and refuses more with `too_large`; it announces the limit (`ServerInfo.
max_request_tokens`) and repeats it when it opens a session. A forward can be cut only by
rows (every position of a row attends to the others), so a row longer than the limit goes
through that server as an inference session, in steps. A step can be cut by positions too,
down to one position of every row: a server that takes fewer tokens than a session has rows
cannot run it at all (routing leaves such servers out).

Pure: integers only.
"""

from __future__ import annotations

# Ours: the most tokens a client puts in one inference step, whatever the server takes; half of
# what servers take by default (blocks.protocol.DEFAULT_MAX_REQUEST_TOKENS, 16384). A longer
# prompt, the replay into a replacement server, or a large forward batch is sent in pieces.
REQUEST_CHUNK_TOKENS = 8192


class RequestLimitError(ValueError):
    """Not even the smallest request of this work fits the limit; the message names it."""


def rows_per_forward(limit: int, length: int) -> int:
    """Rows of `length` positions that one forward request of at most `limit` tokens carries;
    0 when a single row is over the limit (it must go as a session, in steps)."""
    _check(limit, length)
    return limit // length


def positions_per_step(limit: int, batch: int) -> int:
    """Positions of each of `batch` rows that one step of at most `limit` tokens carries;
    RequestLimitError when even one position of every row is over the limit."""
    _check(limit, batch)
    if batch > limit:
        raise RequestLimitError(f"a step of {batch} rows needs at least {batch} tokens per "
                                f"request; the server takes at most {limit}")
    return limit // batch


def cuts(total: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) pieces of at most `size` covering [0, total) in order."""
    if size < 1 or total < 0:
        raise ValueError(f"cannot cut {total} into pieces of {size}")
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _check(limit: int, count: int) -> None:
    if limit < 1 or count < 1:
        raise ValueError(f"a request limit and a count must be at least 1, got {limit} and "
                         f"{count}")
