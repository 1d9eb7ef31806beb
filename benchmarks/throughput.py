"""Throughput at batch size, and the largest batch that fits a memory budget, per method (issue #17).

Every (method, batch size) is one real ``lcbench run ... --batch-size N --share-prefill off`` in a
fresh process, so its peak memory is that run's own (CUDA allocator peak, or the process's RSS
high-water mark on CPU — model weights included) and its timings are the engine's. The same NIAH
samples (``--samples``, default the largest batch asked; lcbench's filler haystack, so nothing is
downloaded) run at every batch size; each batch size writes its own output folder (a run's folder
is its spec's hash, which leaves the batch size out). The table is read back from the records by
:mod:`lcbench.report.throughput` — the view ``lcbench report`` prints:

* decode tok/s: Σ decode tokens / Σ each record's share of its batch's decode time;
* samples/s: samples / Σ each record's share of its batch's TTFT + decode (model loading excluded);
* peak MB, compress s, text s (mean per record; a batched record holds its batch's).

With ``--memory-budget-mb M``, each method then runs at doubling batch sizes past the largest asked
(one group of that many samples each) until its measured peak exceeds M or ``--max-batch`` is
reached, and the largest batch within M is reported — found by running, never estimated.

    python benchmarks/throughput.py [--methods full,snapkv,kivi] [--ratio 0.5] [--batches 1,2,4]
        [--context-tokens 1024] [--new-tokens 32] [--memory-budget-mb 1500] [--max-batch 32]
        [--model smollm2-135m-instruct] [--device cpu] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lcbench.report.frame import load_runs  # noqa: E402
from lcbench.report.throughput import (REFERENCE_MARK, REFERENCE_NOTE, ThroughputPoint, largest_batch,  # noqa: E402
                                       throughput_points)


def lcbench_command() -> list[str]:
    exe = shutil.which("lcbench")
    return [exe] if exe else [sys.executable, "-m", "lcbench.cli"]


def run_one(args, method: str, batch: int, samples: int, out: Path) -> float:
    """One ``lcbench run`` of ``samples`` NIAH samples at ``--batch-size batch``; returns its wall seconds."""
    depths = ";".join(f"{100 * i / max(1, samples - 1):.4g}" for i in range(samples))
    task_args = (f"lengths={args.context_tokens},depths={depths},haystack=filler,needle=passkey,"
                 f"max_new_tokens={args.new_tokens}")
    cmd = [*lcbench_command(), "run", "--model", args.model, "--method", method, "--ratio", str(args.ratio),
           "--task", "niah", "--task-args", task_args, "--batch-size", str(batch), "--share-prefill", "off",
           "--device", args.device, "--output-path", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "COLUMNS": "200"}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` exited {done.returncode}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def points_of(folder: Path) -> list[ThroughputPoint]:
    return throughput_points(load_runs([folder]))


def fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else (f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}")


def table(points: list[ThroughputPoint]) -> str:
    lines = ["| method | ratio | batch | samples | decode tok/s | samples/s | peak MB | compress s | text s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(points, key=lambda p: (p.method != "full", p.method, p.batch)):
        ref = REFERENCE_MARK.strip() if p.reference else ""
        lines.append(f"| {p.method} | {p.ratio:g} | {p.batch} | {p.samples} | {fmt(p.decode_tok_s)}{ref} | "
                     f"{fmt(p.samples_s)}{ref} | {fmt(p.peak_memory_mb, 4)} | {fmt(p.compress_s)}{ref} | {fmt(p.text_s)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="full,snapkv,kivi")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--samples", type=int, default=0, help="samples per run (default: the largest batch)")
    ap.add_argument("--context-tokens", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--memory-budget-mb", type=float, default=0.0, help="0: no search for the largest batch")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="", help="folder for the runs (default: a temporary one, kept)")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    batches = sorted({int(b) for b in args.batches.split(",") if b})
    samples = args.samples or max(batches)
    out = Path(args.out or tempfile.mkdtemp(prefix="lcbench-throughput-"))
    print(f"model {args.model}, {args.device}, {args.threads} threads; NIAH (filler) at {args.context_tokens} tokens, "
          f"{samples} samples, ≤ {args.new_tokens} new tokens; ratio {args.ratio:g}; runs under {out}", flush=True)
    for method in methods:
        for b in batches:
            wall = run_one(args, method, b, samples, out / "table" / f"batch-{b}")
            print(f"  {method} batch {b}: {wall:.1f} s wall (model load included)", flush=True)
    points = points_of(out / "table")
    print("\n## Throughput at batch size\n")
    print(table(points))
    if any(p.reference for p in points):
        print(f"\n{REFERENCE_NOTE}")
    if args.memory_budget_mb > 0:
        search = []
        for method in methods:
            mine = sorted((p for p in points if p.method == method), key=lambda p: p.batch)
            b = max(batches)
            exceeded = any(p.peak_memory_mb is not None and p.peak_memory_mb > args.memory_budget_mb for p in mine)
            while not exceeded and b * 2 <= args.max_batch:
                b *= 2
                run_one(args, method, b, b, out / "search" / f"batch-{b}")
                got = [p for p in points_of(out / "search" / f"batch-{b}") if p.method == method]
                mine += got
                exceeded = any(p.peak_memory_mb is not None and p.peak_memory_mb > args.memory_budget_mb for p in got)
                print(f"  {method} batch {b}: peak {fmt(got[0].peak_memory_mb, 4)} MB", flush=True)
            search += mine
        best = largest_batch(search, args.memory_budget_mb)
        print(f"\n## Largest batch within {args.memory_budget_mb:g} MB (measured peak; "
              f"{'CPU RSS, model included' if args.device == 'cpu' else 'CUDA allocator peak'})\n")
        print("| method | ratio | batches run (peak MB) | largest batch within budget |")
        print("|---|---:|---|---:|")
        for (method, ratio), size in best.items():
            runs = ", ".join(f"{p.batch}: {fmt(p.peak_memory_mb, 4)}" for p in sorted(
                (p for p in search if (p.method, p.ratio) == (method, ratio)), key=lambda p: p.batch))
            more = "" if size is None or any(p.peak_memory_mb and p.peak_memory_mb > args.memory_budget_mb for p in search
                                             if p.method == method) else f" (≥; --max-batch {args.max_batch} reached)"
            print(f"| {method} | {ratio:g} | {runs} | {size if size is not None else 'none'}{more} |")


if __name__ == "__main__":
    main()
