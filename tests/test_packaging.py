"""Every top-level package of the repository ships in the distribution: a package missing from
pyproject's `packages.find` list imports in the test suite (run from the checkout) but not from
an installed `overlay-node` console script."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_top_level_package_is_in_the_distribution() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests")
    assert packages, "no packages found"
    missing = [name for name in packages
               if not any(fnmatch.fnmatch(name, pattern) for pattern in include)]
    assert not missing, f"packages left out of pyproject's packages.find include: {missing}"
