"""LogLimiter: a bounded number of lines per kind and interval, then one summary (no sleeps)."""

import logging

import pytest

from overlay.log_limit import MAX_KEYS, LogLimiter


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def limiter(caplog, **kwargs) -> tuple[LogLimiter, Clock]:
    caplog.set_level(logging.INFO, logger="test.limit")
    clock = Clock()
    return LogLimiter(logging.getLogger("test.limit"), clock=clock, **kwargs), clock


def test_a_flood_logs_its_burst_then_one_summary_per_interval(caplog):
    limit, clock = limiter(caplog, burst=3, interval=10.0)
    logged = [limit.log(logging.INFO, "bad", "bad request %d", i) for i in range(1000)]
    assert logged == [True] * 3 + [False] * 997
    assert [r.getMessage() for r in caplog.records] == [f"bad request {i}" for i in range(3)]
    assert limit.suppressed("bad") == 997
    clock.now += 9.9  # still the same interval
    assert not limit.log(logging.INFO, "bad", "bad request late")
    clock.now += 0.1
    caplog.clear()
    assert limit.log(logging.INFO, "bad", "bad request next")
    assert [r.getMessage() for r in caplog.records] == [
        "bad: 998 more lines suppressed (at most 3 per 10 s are logged)", "bad request next"]
    assert limit.suppressed("bad") == 0


def test_kinds_are_limited_apart_and_a_quiet_kind_gets_no_summary(caplog):
    limit, clock = limiter(caplog, burst=1, interval=10.0)
    assert limit.log(logging.INFO, "a", "a1")
    assert not limit.log(logging.INFO, "a", "a2")
    assert limit.log(logging.INFO, "b", "b1")  # a's flood does not hide b
    clock.now += 10
    caplog.clear()
    assert limit.log(logging.INFO, "b", "b2")
    assert [r.getMessage() for r in caplog.records] == ["b2"]


def test_disabled_levels_cost_nothing_and_keys_stay_bounded(caplog):
    limit, _ = limiter(caplog, burst=1)
    assert not limit.log(logging.DEBUG, "x", "debug")
    assert limit.suppressed("x") == 0 and not caplog.records
    for i in range(MAX_KEYS + 10):
        limit.log(logging.INFO, f"k{i}", "line")
    assert len(limit._windows) == MAX_KEYS
    with pytest.raises(ValueError):
        LogLimiter(logging.getLogger("test.limit"), burst=0)
