"""Every tool in scripts/ answers `--help` with its usage and exit 0, from any directory, and
starts no work first: no model written, no benchmark run, nothing left in the directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "scripts").glob("*.py"))
HELP_TIMEOUT_S = 60  # importing torch and transformers on a loaded machine; no script runs


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_answers_help(script: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    env["OVERLAY_NODE_THROUGHPUT_CACHE"] = str(tmp_path / "throughput.json")
    work = tmp_path / "cwd"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=work, env=env, capture_output=True,
        text=True, timeout=HELP_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: "), done.stdout[:200]
    assert "Traceback" not in done.stderr
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"]  # no cache written either
