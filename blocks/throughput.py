"""What a server announces as its throughput (units: blocks/announcement.py), and how it
finds out: a short compute benchmark of one block on its device, cached on disk, and a
short network measurement against a peer, not cached.

- Compute: `measure(span)` times one block of the loaded span (the first): single-token
  inference steps and a 128-token forward pass, best of a few repeats; a second or so on a
  CPU, far less on a GPU.
- Cache: measurements are kept in one JSON file, by key `model|device|dtype|quant|threads`
  (`cache_key`), written atomically (temp file + rename) under an exclusive lock, so servers
  started together on one machine measure one at a time and reuse each other's result. The
  file is `$OVERLAY_NODE_THROUGHPUT_CACHE` if set, else
  `${XDG_CACHE_HOME:-~/.cache}/overlay-node/throughput.json`.
- Network: `network_rps = bps / (16 x hidden_size)` tokens/s of 16-bit hidden states. The
  server measures bps at start against a peer it knows, through the bandwidth test every
  node offers (overlay/bandwidth.py; blocks/serve_placement.py `link_bps`), the slower of
  upload and download, and does not cache it (it depends on the peer and the moment, and
  takes about a second); it assumes `DEFAULT_NETWORK_BPS` (Petals' fallback when its speed
  test fails) when no peer answers; `--network-mbps` sets the figure.
- Announced: `min(forward_rps / span length, network_rps)` (the server adds that many
  tokens/s to every block it holds), unless `--throughput X` overrides it;
  `--throughput eval` re-measures and overwrites the cached figure (as in Petals).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from blocks.span import BlockSpan

log = logging.getLogger(__name__)

FORWARD_TOKENS = 128  # a typical prompt chunk
# Petals `measure_network_rps(default_speed=100e6)` (src/petals/server/throughput.py):
# 100 Mbit/s, assumed when the link could not be measured.
DEFAULT_NETWORK_BPS = 100e6
BITS_PER_HIDDEN_VALUE = 16  # clients send 16-bit hidden states
CACHE_ENV = "OVERLAY_NODE_THROUGHPUT_CACHE"
CACHE_VERSION = 1  # bump when what is measured changes: old entries are then ignored


@dataclass(frozen=True, slots=True)
class ComputeRates:
    """What the server knows about its speed; every field may be unknown (None), e.g. when
    `--throughput` overrides the measurement."""

    inference_rps: float | None  # tokens/s through one block, single-token steps
    forward_rps: float | None  # tokens/s through one block, long forward passes
    network_rps: float | None = None  # tokens/s of 16-bit hidden states the link carries
    override: float | None = None  # `--throughput X`: announce X whatever was measured

    def throughput(self, num_blocks: int) -> float:
        """Tokens/s the server adds to every block of a span of `num_blocks` blocks."""
        if self.override is not None:
            return self.override
        if self.forward_rps is None:
            raise ValueError("no measured compute rate and no override")
        compute = self.forward_rps / num_blocks
        return compute if self.network_rps is None else min(compute, self.network_rps)


def network_rps(hidden_size: int, bits_per_second: float = DEFAULT_NETWORK_BPS) -> float:
    return bits_per_second / (BITS_PER_HIDDEN_VALUE * hidden_size)


def measure(span: BlockSpan, repeats: int = 3) -> ComputeRates:
    """Time the span's first block: (inference_rps, forward_rps), per block."""
    block = span.subspan(span.start, span.start + 1)
    with torch.inference_mode():
        hidden = torch.randn(1, FORWARD_TOKENS, block.hidden_size, dtype=block.dtype,
                             device=block.device)
        block.forward(hidden[:, :8])  # warm-up: first calls pay for lazy initialisation
        forward = min(_timed(block.forward, hidden) for _ in range(repeats))
        with block.new_session(1, repeats + 2) as session:
            session.step(hidden[:, :1])
            step = min(_timed(session.step, hidden[:, i:i + 1]) for i in range(1, repeats + 1))
    return ComputeRates(inference_rps=1 / step, forward_rps=FORWARD_TOKENS / forward)


def _timed(fn, *args) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return max(time.perf_counter() - start, 1e-9)


# -- the on-disk cache ---------------------------------------------------------------------


def default_cache_path() -> Path:
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "overlay-node" / "throughput.json"


def device_name(device: torch.device) -> str:
    """A name for the hardware the figure holds for: the GPU model, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def cache_key(model_id: str, device: torch.device, dtype: torch.dtype, quant: str = "none"
              ) -> str:
    """`model|device|dtype|quant|threads`: everything the measured speed depends on (CPU
    speed also depends on the number of torch threads)."""
    dtype_name = str(dtype).removeprefix("torch.")
    threads = f"threads={torch.get_num_threads()}" if device.type == "cpu" else device.type
    return "|".join((model_id, device_name(device), dtype_name, quant, threads))


def cached_rates(key: str, measure_fn: Callable[[], ComputeRates], *, force: bool = False,
                 path: Path | None = None) -> tuple[ComputeRates, bool]:
    """The rates stored under `key`, or `measure_fn()`'s (stored); `force` re-measures.
    Returns (rates, measured now). A cache that cannot be read or written is logged and
    ignored: the server still starts."""
    path = path or default_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 - closed below
    except OSError as e:
        log.warning("throughput cache %s unusable (%s); measuring", path, e)
        return measure_fn(), True
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        entries = _read(path)
        entry = entries.get(key)
        if not force and isinstance(entry, dict):
            rates = _parse(entry)
            if rates is not None:
                return rates, False
        rates = measure_fn()
        entries[key] = {"version": CACHE_VERSION, "inference_rps": rates.inference_rps,
                        "forward_rps": rates.forward_rps, "measured_at": time.time()}
        _write_atomically(path, entries)
        return rates, True


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("throughput cache %s unreadable (%s); starting it afresh", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _parse(entry: dict) -> ComputeRates | None:
    if entry.get("version") != CACHE_VERSION:
        return None
    values = [entry.get("inference_rps"), entry.get("forward_rps")]
    if not all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in values):
        return None
    return ComputeRates(inference_rps=float(values[0]), forward_rps=float(values[1]))


def _write_atomically(path: Path, entries: dict) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        log.warning("could not save the throughput cache %s: %s", path, e)

