#!/usr/bin/env python
"""Benchmark tensor_wire: round-trip throughput, size and error per compression.

Two workloads: a large float32 tensor (64 MiB by default) and a (1, 1, 8192) decode-step
activation, whose round-trip time is the per-call overhead. Baselines run in the same process
so that ratios mean something on any machine: a raw copy (`bytearray(t.numpy())`, the floor for
anything that returns bytes), torch.save/torch.load through BytesIO, and the cost of touching
fresh memory (page faults), which dominates large copies on some virtual machines. The copy
paths of the large tensor then run a second time after asking glibc to keep large blocks in its
heap (mallopt), as a long-running server exchanging same-sized tensors can; the small-tensor
table runs last, in that mode (its 32 KiB buffers come from the heap either way).

    python scripts/bench_tensor_wire.py [--large-mib 64] [--repeats 5] [--small-calls 3000]

Prints a table, then one JSON object on the last line. Default run: well under a minute.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import io
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from overlay.cli.arguments import positive_int  # counts: refused when below 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large-mib", type=positive_int, default=64)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--small-calls", type=positive_int, default=3000)
    return parser.parse_args()


if __name__ == "__main__":
    # Before torch (4-7 s to import), so that `--help` and typos answer at once; torch stays a
    # module global, as the timed functions below use it.
    ARGS = parse_args()

import torch  # noqa: E402

import tensor_wire as tw  # noqa: E402
from overlay.runtime import keep_large_buffers_in_heap  # noqa: E402

COMPRESSIONS = ("none", "float16", "bfloat16", "int8_blockwise", "lz4")


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(best, median) seconds of `repeats` calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def per_call(fn: Callable[[], object], calls: int) -> float:
    """Best mean seconds per call over 5 batches of calls/5 (robust to a noisy neighbour)."""
    fn()
    batch = max(1, calls // 5)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        best = min(best, (time.perf_counter() - start) / batch)
    return best


def relative_error(decoded: torch.Tensor, original: torch.Tensor) -> float:
    return ((decoded.double() - original.double()).norm() / original.double().norm()).item()


def round_trip(tensor: torch.Tensor, compression: str, writable: bool) -> torch.Tensor:
    data = tw.serialize(tensor, compression)
    return tw.deserialize(bytearray(data) if writable else data)


def chunked_round_trip(tensor: torch.Tensor, max_chunk: int) -> torch.Tensor:
    assembler = tw.ChunkAssembler()
    message = None
    for chunk in tw.iter_chunks([tensor], {"step": 1}, max_chunk=max_chunk):
        message = assembler.feed(chunk)
    assert message is not None
    return message.tensors[0]


def torch_save_round_trip(tensor: torch.Tensor) -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def raw_copy_round_trip(tensor: torch.Tensor) -> torch.Tensor:
    """Two plain copies, the minimum for bytes out and a private tensor back in."""
    data = bytes(tensor.numpy())
    return torch.frombuffer(bytearray(data), dtype=tensor.dtype)


def large_rows(tensor: torch.Tensor, repeats: int, prefix: str = "", every: bool = True
               ) -> list[dict]:
    """Round trips of the large tensor; with every=False only the uncompressed copy paths."""
    nbytes = tensor.numel() * tensor.element_size()
    rows = []

    def row(name: str, fn: Callable[[], torch.Tensor], size: int, error: float) -> None:
        best, median = timed(fn, repeats)
        rows.append({"case": prefix + name, "best_s": best, "median_s": median,
                     "gb_per_s": nbytes / best / 1e9, "size_ratio": size / nbytes,
                     "rel_l2": error})

    row("baseline raw copy x2", lambda: raw_copy_round_trip(tensor), nbytes, 0.0)
    saved = io.BytesIO()
    torch.save(tensor, saved)
    if every:
        row("baseline torch.save/load", lambda: torch_save_round_trip(tensor),
            len(saved.getvalue()), 0.0)
    for compression in COMPRESSIONS if every else ("none",):
        data = tw.serialize(tensor, compression)
        error = relative_error(tw.deserialize(data), tensor)
        row(f"{compression} (bytes in)", lambda c=compression: round_trip(tensor, c, False),
            len(data), error)
    data = tw.serialize(tensor)
    row("none (serialize only)", lambda: tw.serialize(tensor), len(data), 0.0)
    row("none (deserialize bytes)", lambda: tw.deserialize(data), len(data), 0.0)
    writable = bytearray(data)
    row("none (deserialize bytearray, zero-copy)", lambda: tw.deserialize(writable), len(data),
        0.0)
    row("none (1 MiB chunks -> assembler)", lambda: chunked_round_trip(tensor, 1 << 20),
        len(data), 0.0)
    return rows


def small_rows(tensor: torch.Tensor, calls: int) -> list[dict]:
    nbytes = tensor.numel() * tensor.element_size()
    rows = []

    def row(name: str, fn: Callable[[], object], size: int, error: float) -> None:
        seconds = per_call(fn, calls)
        rows.append({"case": name, "us_per_call": seconds * 1e6, "size_ratio": size / nbytes,
                     "rel_l2": error})

    row("baseline raw copy x2", lambda: raw_copy_round_trip(tensor), nbytes, 0.0)
    saved = io.BytesIO()
    torch.save(tensor, saved)
    row("baseline torch.save/load", lambda: torch_save_round_trip(tensor),
        len(saved.getvalue()), 0.0)
    for compression in COMPRESSIONS:
        data = tw.serialize(tensor, compression)
        error = relative_error(tw.deserialize(data), tensor)
        row(f"{compression} (bytes in)", lambda c=compression: round_trip(tensor, c, False),
            len(data), error)
    data = tw.serialize(tensor)
    row("none (serialize only)", lambda: tw.serialize(tensor), len(data), 0.0)
    row("none (deserialize bytes)", lambda: tw.deserialize(data), len(data), 0.0)
    message = tw.encode_message([tensor], {"step": 1})
    row("none message + meta round trip",
        lambda: tw.decode_message(tw.encode_message([tensor], {"step": 1})), len(message), 0.0)
    return rows


def page_fault_cost(nbytes: int) -> dict:
    """Seconds to fill fresh memory vs memory already mapped: how costly page faults are here."""
    fresh, _ = timed(lambda: torch.empty(nbytes, dtype=torch.uint8).fill_(1), 3)
    mapped = torch.empty(nbytes, dtype=torch.uint8)
    warm, _ = timed(lambda: mapped.fill_(1), 3)
    return {"fill_fresh_s": fresh, "fill_mapped_s": warm}


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)

    machine = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    for key, value in machine.items():
        print(f"{key}: {value}")

    generator = torch.Generator().manual_seed(0)
    large = torch.randn(args.large_mib * (1 << 20) // 4, generator=generator)
    small = torch.randn(1, 1, 8192, generator=generator)
    faults = page_fault_cost(large.numel() * 4)
    print(f"\nfresh-memory fill {faults['fill_fresh_s'] * 1e3:.1f} ms vs mapped "
          f"{faults['fill_mapped_s'] * 1e3:.1f} ms for {args.large_mib} MiB (page-fault cost)")

    large_table = large_rows(large, args.repeats)
    print(f"\n{args.large_mib} MiB float32, serialize + deserialize, best of {args.repeats}:")
    print(f"{'case':42s} {'GB/s':>7s} {'best ms':>8s} {'med ms':>8s} {'size':>7s} {'rel L2':>9s}")
    for r in large_table:
        print(f"{r['case']:42s} {r['gb_per_s']:7.2f} {r['best_s'] * 1e3:8.1f} "
              f"{r['median_s'] * 1e3:8.1f} {r['size_ratio']:7.3f} {r['rel_l2']:9.2e}")

    reuse = keep_large_buffers_in_heap()
    if reuse:
        large_table += large_rows(large, args.repeats, prefix="[heap reuse] ", every=False)
        print("\nsame, after mallopt(M_MMAP_THRESHOLD=1 GiB, M_TRIM_THRESHOLD=2 GiB):")
        for r in large_table[-6:]:
            if r["case"].startswith("[heap reuse]"):
                print(f"{r['case']:42s} {r['gb_per_s']:7.2f} {r['best_s'] * 1e3:8.1f} "
                      f"{r['median_s'] * 1e3:8.1f} {r['size_ratio']:7.3f} {r['rel_l2']:9.2e}")

    small_table = small_rows(small, args.small_calls)
    print("\n(1, 1, 8192) float32 activation, serialize + deserialize, per call:")
    print(f"{'case':42s} {'us':>8s} {'size':>7s} {'rel L2':>9s}")
    for r in small_table:
        print(f"{r['case']:42s} {r['us_per_call']:8.1f} {r['size_ratio']:7.3f} "
              f"{r['rel_l2']:9.2e}")

    by_case = {r["case"]: r for r in large_table}
    none_gbps = by_case["none (bytes in)"]["gb_per_s"]
    raw_gbps = by_case["baseline raw copy x2"]["gb_per_s"]
    small_none = next(r for r in small_table if r["case"] == "none (bytes in)")["us_per_call"]
    small_raw = small_table[0]["us_per_call"]
    reused = by_case.get("[heap reuse] none (bytes in)", {}).get("gb_per_s")
    summary = {
        "machine": machine,
        "page_faults": faults,
        "large_mib": args.large_mib,
        "large": large_table,
        "small": small_table,
        "none_round_trip_gb_per_s": none_gbps,
        "none_vs_raw_copy": none_gbps / raw_gbps,
        "none_target_2gbps_met": none_gbps >= 2.0,
        "none_round_trip_gb_per_s_heap_reuse": reused,
        "none_target_2gbps_met_heap_reuse": reused is not None and reused >= 2.0,
        "small_round_trip_us": small_none,
        "small_overhead_beyond_raw_copy_us": small_none - small_raw,
        "small_target_30us_met": small_none < 30.0,
    }
    print(f"\nnone: {none_gbps:.2f} GB/s ({none_gbps / raw_gbps:.2f}x the raw copy baseline), "
          f"{reused or float('nan'):.2f} GB/s with heap reuse; small round trip "
          f"{small_none:.1f} us ({small_none - small_raw:+.1f} us vs raw copy)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main(ARGS)
