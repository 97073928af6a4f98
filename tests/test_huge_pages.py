"""Huge pages for CPU tensors (model_parts/huge_pages.py): who asks, when, and that torch's
allocator then really maps large tensors in 2 MiB pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model_parts.huge_pages import ENV_VARS, huge_pages_requested, request_huge_pages

ROOT = Path(__file__).resolve().parents[1]
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_request_sets_every_name_and_keeps_a_users_choice() -> None:
    env: dict[str, str] = {}
    if "torch" in sys.modules:  # this test process imported torch long ago
        assert request_huge_pages(env) is False and env == {}
    else:
        assert request_huge_pages(env) is True
        assert env == dict.fromkeys(ENV_VARS, "1") and huge_pages_requested(env)
    mine = {"THP_MEM_ALLOC_ENABLE": "0"}
    assert request_huge_pages(mine) is False
    assert mine == {"THP_MEM_ALLOC_ENABLE": "0"} and not huge_pages_requested(mine)
    assert not huge_pages_requested({})


def test_too_late_once_torch_is_imported() -> None:
    result = _run(
        "import json, os, torch\n"
        "from model_parts.huge_pages import request_huge_pages\n"
        "print(json.dumps({'made': request_huge_pages(),"
        " 'set': 'THP_MEM_ALLOC_ENABLE' in os.environ}))")
    assert result == {"made": False, "set": False}


@pytest.mark.parametrize("command, asks", [("serve", True), ("generate", True), ("demo", True),
                                           ("join", False), ("status", False)])
def test_the_commands_that_hold_weights_ask_before_torch_loads(command: str, asks: bool) -> None:
    result = _run(
        "import json, os, sys\n"
        "from overlay.cli.main import build_parser\n"
        f"build_parser([{command!r}])\n"
        "print(json.dumps({'asked': os.environ.get('THP_MEM_ALLOC_ENABLE') == '1'}))")
    assert result == {"asked": asks}


@pytest.mark.skipif(not THP_SETTING.exists() or "[never]" in THP_SETTING.read_text(),
                    reason="the kernel has no transparent huge pages here")
def test_torch_then_maps_a_large_tensor_in_huge_pages() -> None:
    code = (
        "import json{request}\n"
        "import torch\n"
        "x = torch.ones(16 << 20)  # 64 MiB\n"
        "kb = sum(int(line.split()[1]) for line in open('/proc/self/smaps_rollup')"
        " if line.startswith('AnonHugePages:'))\n"
        "print(json.dumps({{'huge_kib': kb}}))")
    asked = _run(code.format(
        request="\nfrom model_parts.huge_pages import request_huge_pages; request_huge_pages()"))
    plain = _run(code.format(request=""))
    assert asked["huge_kib"] >= 32 << 10  # most of the 64 MiB (the kernel may fall short)
    assert plain["huge_kib"] < asked["huge_kib"]
