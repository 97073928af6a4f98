"""overlay/timeline.py: off unless asked for; when on, one file per process of `ns event` lines
on the monotonic clock."""

import os
import subprocess
import sys
import time

SCRIPT = ("from overlay import timeline\n"
          "print(timeline.ENABLED)\n"
          "if timeline.ENABLED:\n"
          "    timeline.mark('first')\n"
          "    timeline.mark('second')\n")


def _run(env_extra: dict) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "OVERLAY_TIMELINE_DIR"} | env_extra
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    return proc.stdout.strip(), proc.returncode


def test_off_by_default(tmp_path):
    out, _ = _run({})
    assert out == "False"
    assert not list(tmp_path.iterdir())


def test_marks_land_in_one_file_per_process_in_order(tmp_path):
    before = time.perf_counter_ns()
    out, _ = _run({"OVERLAY_TIMELINE_DIR": str(tmp_path / "t")})
    after = time.perf_counter_ns()
    assert out == "True"
    [path] = (tmp_path / "t").iterdir()
    assert path.stem.isdigit()
    lines = [line.split(" ") for line in path.read_text().splitlines()]
    assert [event for _, event in lines] == ["first", "second"]
    stamps = [int(ns) for ns, _ in lines]
    assert before <= stamps[0] <= stamps[1] <= after  # the same clock as this process's
