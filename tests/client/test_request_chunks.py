"""The arithmetic of cutting work to a server's request limit (client/request_chunks.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.request_chunks import (
    RequestLimitError,
    cuts,
    positions_per_step,
    rows_per_forward,
)


def test_a_forward_is_cut_by_whole_rows():
    assert rows_per_forward(64, 30) == 2  # 60 tokens; a third row would make 90
    assert rows_per_forward(64, 64) == 1
    assert rows_per_forward(16384, 1) == 16384
    assert rows_per_forward(64, 65) == 0  # one row is over the limit: a session, in steps


def test_a_step_is_cut_by_positions_of_every_row():
    assert positions_per_step(64, 1) == 64
    assert positions_per_step(64, 2) == 32
    assert positions_per_step(40, 3) == 13  # 39 tokens
    assert positions_per_step(64, 64) == 1


def test_a_batch_larger_than_the_limit_is_a_clear_error():
    with pytest.raises(RequestLimitError, match=r"65 rows needs at least 65 tokens .* at most 64"):
        positions_per_step(64, 65)


@pytest.mark.parametrize(("limit", "count"), [(0, 1), (1, 0), (-3, 2)])
def test_nonsense_limits_and_counts_are_refused(limit, count):
    with pytest.raises(ValueError):
        rows_per_forward(limit, count)
    with pytest.raises(ValueError):
        positions_per_step(limit, count)


def test_cuts():
    assert cuts(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert cuts(8, 4) == [(0, 4), (4, 8)]
    assert cuts(3, 8) == [(0, 3)]
    assert cuts(0, 8) == []
    with pytest.raises(ValueError):
        cuts(5, 0)


@given(st.integers(1, 20_000), st.integers(1, 300), st.integers(1, 3000))
def test_every_piece_fits_and_the_pieces_cover_the_work(limit, batch, length):
    if batch <= limit:  # a step of `batch` rows, `length` new positions
        pieces = cuts(length, positions_per_step(limit, batch))
        assert all(batch * (b - a) <= limit for a, b in pieces)
        assert [p for a, b in pieces for p in range(a, b)] == list(range(length))
    rows = rows_per_forward(limit, length)  # a forward of `batch` rows of `length`
    if rows:
        pieces = cuts(batch, rows)
        assert all((b - a) * length <= limit for a, b in pieces)
        assert [r for a, b in pieces for r in range(a, b)] == list(range(batch))
        assert (rows + 1) * length > limit  # as many rows as fit
    else:
        assert length > limit
