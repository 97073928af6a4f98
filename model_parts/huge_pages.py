"""Transparent huge pages for the tensors a process allocates on the CPU, asked for before torch
is imported.

Why: a decode step on the CPU is bound by memory, not arithmetic: it reads every weight of its
span once per token. In 4 KiB pages a span of the 8 x 512 test model (47 MB) spans 12,000 page
table entries, far more than the TLB holds, so each step walks page tables throughout and
evicts every other translation: the messaging code that runs next, on the same token's path,
starts with misses on its pages too. In 2 MiB pages the same weights take 24 entries.

PyTorch's CPU allocator (c10/core/impl/alloc_cpu.cpp) aligns allocations of 2 MiB and more to
2 MiB and asks `madvise(MADV_HUGEPAGE)` for them when the environment variable
``THP_MEM_ALLOC_ENABLE`` is 1 (torch 2.11 and 2.13 read that name; some builds read
``C10_THP_MEM_ALLOC_ENABLE``: both are set). It reads the
variable once, at its first allocation, so it must be set before torch is imported. The
kernel honours the request when /sys/kernel/mm/transparent_hugepage/enabled is ``always`` or
``madvise`` (a common default); with ``never`` it is a no-op. Small tensors are unaffected.

Imports nothing heavy: the command line calls it before importing a command's package.
"""

from __future__ import annotations

import os
import sys

ENV_VARS = ("THP_MEM_ALLOC_ENABLE", "C10_THP_MEM_ALLOC_ENABLE")


def request_huge_pages(environ: dict[str, str] | None = None) -> bool:
    """Ask torch's allocator for huge pages, unless the environment already says either way
    (a user's ``THP_MEM_ALLOC_ENABLE=0`` is kept) or torch is already imported (too late: it
    would have no effect). Returns whether the request was made now. Child processes inherit
    the setting with the environment."""
    env = os.environ if environ is None else environ
    if "torch" in sys.modules or any(name in env for name in ENV_VARS):
        return False
    for name in ENV_VARS:
        env[name] = "1"
    return True


def huge_pages_requested(environ: dict[str, str] | None = None) -> bool:
    """Whether this environment asks torch's allocator for huge pages."""
    env = os.environ if environ is None else environ
    return any(env.get(name, "0").strip() not in ("", "0") for name in ENV_VARS)
