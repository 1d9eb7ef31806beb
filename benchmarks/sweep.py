"""Shared prefill across runs (issue #14): a sweep of cache-stage methods × ratios on NIAH with each
context prefilled once and the runs' turns decoded in one batch (lcbench/run_together.py), against
the same runs one by one (``--share-prefill off``), side by side in one process, with every record
compared.

    python benchmarks/sweep.py [--methods snapkv,streamingllm,knorm,tova,kivi,int8] [--ratios 0.5,0.75]
                               [--length 2048] [--samples 2] [--threads 2]

Target (issue #14): wall time ≥ 5× lower with sharing, records identical. Prints one table: wall
seconds of each mode, their ratio, summed prefill seconds, and whether predictions, decoded ids,
KV bytes, kept tokens and achieved ratios are identical run by run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lcbench.evaluate import ModelPool, build_spec
from lcbench.results import read_records
from lcbench.run_together import run_each
from lcbench.spec import DEFAULT_MODEL


def sweep(args, out: Path, share: str) -> tuple[float, dict[str, list]]:
    specs = [build_spec(model=args.model, method=m, ratio=float(r), task="niah",
                        task_args=f"lengths={args.length},depths={';'.join(str(d) for d in range(0, 100, 100 // args.samples))},"
                                  f"haystack=filler,max_new_tokens=16",
                        device="cpu", output_path=str(out), share_prefill=share)
             for m in args.methods.split(",") for r in args.ratios.split(",")]
    pool = ModelPool()
    pool.get(specs[0])  # the model loads outside the timed region in both modes
    pool.plan_shared_prefill(specs)
    start = time.perf_counter()
    folders = []
    for _, outcome in run_each(specs, pool):  # as `lcbench run`/`sweep` do: sharing runs go side by side
        if isinstance(outcome, Exception):
            raise outcome
        folders.append(outcome.folder)
    wall = time.perf_counter() - start
    return wall, {f.name: read_records(f) for f in folders}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--methods", default="snapkv,streamingllm,knorm,tova,kivi,int8")
    p.add_argument("--ratios", default="0.5,0.75")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        shared_wall, shared = sweep(args, Path(tmp) / "shared", "auto")
        alone_wall, alone = sweep(args, Path(tmp) / "alone", "off")
    same = all(
        [(a.decoded_ids, a.measured.kv_bytes, a.measured.kept_tokens, a.measured.achieved_ratio, a.measured.kv_bytes_end,
          a.method_stats)
         for a in shared[name]] ==
        [(b.decoded_ids, b.measured.kv_bytes, b.measured.kept_tokens, b.measured.achieved_ratio, b.measured.kv_bytes_end,
          b.method_stats)
         for b in alone[name]] for name in alone)
    prefill = {k: sum(r.measured.prefill_s for recs in d.values() for r in recs) for k, d in
               (("shared", shared), ("alone", alone))}
    runs = len(alone)
    print(f"| runs | samples | context tokens | one by one s | shared prefill s | one by one ÷ shared | records identical |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    print(f"| {runs} | {args.samples} | {args.length} | {alone_wall:.1f} | {shared_wall:.1f} | "
          f"{alone_wall / shared_wall:.2f} | {'yes' if same else 'NO'} |")
    print(f"(summed prefill_s in records: one by one {prefill['alone']:.1f}, shared {prefill['shared']:.1f} — "
          f"a shared run records the one pass it reused)")


if __name__ == "__main__":
    main()
