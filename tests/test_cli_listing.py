"""`overlay-node --help` lists the subcommands of other packages without importing them: the
one-line help it shows for each must be the one its package gives when it is loaded."""

from __future__ import annotations

import argparse

import pytest

from overlay.cli.main import _PLUGINS, build_parser


def _listed_help(parser: argparse.ArgumentParser, name: str) -> str | None:
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return next((a.help for a in sub._choices_actions if a.dest == name), None)


@pytest.mark.parametrize("name", sorted(_PLUGINS))
def test_listed_help_is_the_subcommands_own(name: str) -> None:
    loaded = build_parser([name])  # this one imported, the others listed
    listed = build_parser(["--help"])
    assert _listed_help(listed, name) == _PLUGINS[name][1]
    assert _listed_help(loaded, name) == _PLUGINS[name][1]
