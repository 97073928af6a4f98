"""Every tool in scripts/ answers `--help` with its usage and exit 0, from any directory, and
starts no work first: no model written, no benchmark run, nothing left in the directory or in
the temporary directory, and none of torch, transformers or the serving code imported (4-7 s:
arguments are parsed before the heavy imports)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "scripts").glob("*.py"))
HELP_TIMEOUT_S = 30  # a few standard modules and the overlay, on a loaded machine
HEAVY = ("torch", "transformers", "blocks.span", "client.inference")
# Runs the script as `python SCRIPT --help` would, then reports the heavy modules it imported.
RUN_AND_REPORT = (
    "import runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "finally:\n"
    f"    print('imported:', *sorted(set({HEAVY!r}) & set(sys.modules)), file=sys.stderr)\n"
)


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_answers_help(script: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    env["OVERLAY_NODE_THROUGHPUT_CACHE"] = str(tmp_path / "throughput.json")
    work, temp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    temp.mkdir()
    env["TMPDIR"] = str(temp)
    done = subprocess.run(
        [sys.executable, "-c", RUN_AND_REPORT, str(script), "--help"], cwd=work, env=env,
        capture_output=True, text=True, timeout=HELP_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {script.name} "), done.stdout[:200]
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == "imported:", done.stderr[-500:]
    assert list(work.iterdir()) == []
    assert list(temp.iterdir()) == []  # no temporary directory left (trace_token made one)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "tmp"]  # no cache written


COUNTS = {  # script -> a count it takes: 0 crashed (division by zero, empty medians) or did
    # nothing, after minutes of setup; now refused while parsing, before any heavy import
    "bench_bandwidth.py": "--repeat", "bench_cold_cache.py": "--steps",
    "bench_dht.py": "--keys", "bench_gpu.py": "--runs", "bench_inference.py": "--tokens",
    "bench_padding.py": "--repeat", "bench_push.py": "--tokens", "bench_rpc_cpu.py": "--calls",
    "bench_tensor_wire.py": "--repeats", "bench_transport.py": "--repeat",
    "compiled_precision.py": "--steps", "finetune_example.py": "--batch",
    "trace_token.py": "--tokens",
}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_a_count_below_one_is_refused_while_parsing(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", RUN_AND_REPORT, str(REPO / "scripts" / name), COUNTS[name], "0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HELP_TIMEOUT_S,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert lines[-2] == f"{name}: error: argument {COUNTS[name]}: must be at least 1, got 0"
    assert lines[-1] == "imported:" and list(tmp_path.iterdir()) == []


def test_bench_inference_refuses_an_unknown_model_while_parsing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", RUN_AND_REPORT, str(REPO / "scripts" / "bench_inference.py"),
         "--models", "small-4x64,big"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=HELP_TIMEOUT_S,
    )
    assert done.returncode == 2 and "argument --models: unknown 'big'; known: " in done.stderr
    assert done.stderr.splitlines()[-1] == "imported:"


def test_trace_token_imports_no_timeline_before_it_sets_its_directory() -> None:
    """overlay/timeline.py reads OVERLAY_TIMELINE_DIR when first imported; trace_token.py sets
    it in main, after the imports at its top (bench_inference's among them): were any of them
    to load the overlay's connections, the client process would record no marks."""
    probe = ("import runpy, sys\n"
             f"sys.argv = [{str(REPO / 'scripts' / 'trace_token.py')!r}, '--tokens', '0']\n"
             "try:\n"
             "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "finally:\n"
             "    print('timeline' if 'overlay.timeline' in sys.modules else 'none')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                          timeout=HELP_TIMEOUT_S)
    assert done.returncode == 2 and done.stdout.splitlines() == ["none"], done.stderr
