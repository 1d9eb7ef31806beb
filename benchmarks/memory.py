"""Peak memory falls with compression: each layer's KV is compressed as soon as that layer has
finished its prefill, so the full cache of all layers never exists at once.

For each (method, ratio, prefill chunk) one sample runs through ``Engine.run`` in a fresh child
process, and the table compares the run's peak memory above the loaded model with the full
cache's: how much of the KV bytes a method saves shows up as a lower peak (target: most of it,
i.e. peak saved ÷ KV saved > 0.5).

Peak memory: on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``, reset before
the run); on CPU the kernel's high-water mark of the process RSS (``VmHWM``, reset through
``/proc/self/clear_refs``), with glibc told to return every freed block over 64 KiB to the OS
(``MALLOC_MMAP_THRESHOLD_``) so that RSS follows the live tensors.

Two more tables (issue #12), each as peak above the model ÷ KV held (the compressed context's
bytes), which says how much transient memory a run needs beside what it keeps:

* a long context (``--long-tokens``, 16K by default; 0 skips it): ``full`` and ``snapkv`` —
  observations (window attention, H2O's attention sums) are computed per KV head in bounded
  chunks, so the peak stays a small multiple of the KV held;
* several turns on one context (``--turns``, 5 by default) against one turn: the turns share
  the compressed context (``lcbench/cache/shared.py``) instead of copying it per turn, so the
  ratio must not grow with the number of turns.

    python benchmarks/memory.py [--context-tokens 4000] [--long-tokens 16384] [--turns 5] [--device cpu] [--chunk 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CASES = [("full", 0.0, None), ("snapkv", 0.5, None), ("snapkv", 0.75, None), ("streamingllm", 0.75, None),
         ("kivi", 0.75, None)]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> dict:
    """One measured run in this (fresh) process; prints its numbers as JSON."""
    import gc

    import torch

    from lcbench.engine.runner import Engine, EngineConfig
    from lcbench.methods.chain import Chain, resolve_chain
    from lcbench.models.loading import DEFAULT_MODEL, load_model
    from lcbench.tasks.sample import Sample, Turn

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model or DEFAULT_MODEL, {}, args.device)
    tok = loaded.tokenizer
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    unit = len(tok(filler, add_special_tokens=False)["input_ids"])
    context = filler * max(1, args.context_tokens // unit)
    questions = ["What colour is the sky?", "What colour is the grass?", "What colour is the sun?",
                 "Where do we go?", "Where and back again?", "What is green?", "What is blue?", "What is yellow?"]
    turns = [Turn(f"\n\nQuestion: {questions[i % len(questions)]}\nAnswer:", ["blue"], 8, "x", min_new_tokens=8)
             for i in range(args.turns)]
    sample = Sample("memory", context, turns)
    warm = Sample("warm", filler * 4, sample.turns[:1])
    chain = Chain.build(resolve_chain(args.method, None, args.ratio))
    engine = Engine(loaded.model, tok, chain, EngineConfig(prefill_chunk=args.chunk or None, check_ratio=False))
    engine.run(warm, False)
    gc.collect()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kb("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    record = engine.run(sample, False)[0]
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kb("VmHWM") * 1024
    return {"method": args.method, "ratio": args.ratio, "chunk": args.chunk, "turns": args.turns,
            "peak_above_model": peak - base,
            "kv_bytes": record["kv_bytes"], "kv_bytes_full": record["kv_bytes_full"],
            "context_tokens": record["context_tokens"], "kind": "cuda allocator peak" if cuda else "cpu VmHWM"}


def measure(case: tuple[str, float, int | None], opts, tokens: int | None = None, turns: int = 1) -> dict:
    method, ratio, chunk = case
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(opts.threads)}
    cmd = [sys.executable, __file__, "--child", "--method", method, "--ratio", str(ratio), "--turns", str(turns),
           "--context-tokens", str(tokens or opts.context_tokens), "--device", opts.device, "--threads", str(opts.threads)]
    if chunk:
        cmd += ["--chunk", str(chunk)]
    if opts.model:
        cmd += ["--model", opts.model]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="full")
    ap.add_argument("--ratio", type=float, default=0.0)
    ap.add_argument("--chunk", type=int, default=0, help="also measure full and snapkv with this --prefill-chunk")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--context-tokens", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--long-tokens", type=int, default=16384, help="context of the long-context table (0: skip it)")
    ap.add_argument("--turns", type=int, default=5, help="turns of the shared-context table (0: skip it)")
    ap.add_argument("--skip-main", action="store_true", help="only the long-context and shared-context tables")
    opts = ap.parse_args()
    if opts.child:
        print(json.dumps(child(opts)))
        return
    mb = 2 ** 20
    if not opts.skip_main:
        main_table(opts, mb)
    if opts.long_tokens:
        rows = [measure(case, opts, tokens=opts.long_tokens) for case in LONG_CASES]
        print(f"\nLong context: {rows[0]['context_tokens']} tokens on {opts.device}; peak = {rows[0]['kind']} "
              f"above the loaded model\n")
        ratio_table(rows, mb, "ratio")
    if opts.turns:
        rows = [measure(case, opts, turns=turns) for case in TURN_CASES for turns in (1, opts.turns)]
        print(f"\nTurns sharing one context: {rows[0]['context_tokens']} tokens on {opts.device}, multi-request "
              f"(all turns decoded together); peak ÷ KV held must not grow with the turns\n")
        ratio_table(rows, mb, "turns")


LONG_CASES = [("full", 0.0, None), ("snapkv", 0.5, None)]
TURN_CASES = [("full", 0.0, None), ("snapkv", 0.5, None), ("kivi", 0.75, None)]


def ratio_table(rows: list[dict], mb: int, label: str) -> None:
    print(f"| method | ratio | turns | KV held MB | peak above model MB | peak ÷ KV held |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['ratio']:g} | {r['turns']} | {r['kv_bytes'] / mb:.1f} | "
              f"{r['peak_above_model'] / mb:.1f} | {r['peak_above_model'] / r['kv_bytes']:.2f} |")


def main_table(opts, mb: int) -> None:
    cases = list(CASES)
    if opts.chunk:
        cases += [("full", 0.0, opts.chunk), ("snapkv", 0.5, opts.chunk)]
    rows = [measure(c, opts) for c in cases]
    full = next(r for r in rows if r["method"] == "full" and not r["chunk"])
    print(f"\n{full['context_tokens']} context tokens on {opts.device}; peak = {full['kind']} above the loaded model\n")
    print("| method | ratio | prefill chunk | KV MB | KV saved MB | peak MB | peak saved MB | peak saved ÷ KV saved |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        kv_saved = (full["kv_bytes"] - r["kv_bytes"]) / mb
        peak_saved = (full["peak_above_model"] - r["peak_above_model"]) / mb
        share = f"{peak_saved / kv_saved:.2f}" if kv_saved > 0.5 else "–"
        print(f"| {r['method']} | {r['ratio']:g} | {r['chunk'] or '–'} | {r['kv_bytes'] / mb:.1f} | {kv_saved:.1f} | "
              f"{r['peak_above_model'] / mb:.1f} | {peak_saved:.1f} | {share} |")

if __name__ == "__main__":
    main()
