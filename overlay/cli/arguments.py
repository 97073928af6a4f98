"""argparse types for the numbers the overlay's subcommands take: refused while parsing
(exit 2, one line) rather than failing later with a traceback, or timing out at once."""

from __future__ import annotations

import argparse


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def positive_int(text: str) -> int:
    """An argparse type for counts and sizes: 0 would do nothing (or serve nothing) and
    still report success."""
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_seconds(text: str) -> float:
    """Timeouts: a finite number > 0."""
    return _seconds(text, allow_zero=False)


def non_negative_seconds(text: str) -> float:
    """Waits between actions: a finite number >= 0."""
    return _seconds(text, allow_zero=True)


def _seconds(text: str, *, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    low_ok = value >= 0 if allow_zero else value > 0  # both false for nan
    if not (low_ok and value < float("inf")):
        bound = ">= 0" if allow_zero else "> 0"
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds {bound}, got {text}")
    return value
