"""Sparse attention: attention time vs density at several context lengths, on the CPU.

Times one layer's prefill attention exactly as the engine calls it (``Stage.prefill_attention``
with the query/key/value of the whole context) for every sparse-prefill method at several
density targets, next to dense attention (the engine's SDPA path), and one Quest decode step
against a dense decode step. Shapes are SmolLM2-135M's attention (9 query heads, 3 KV heads,
head dim 64); the inputs are random, so the data-dependent patterns (vertical_slash, block_topk)
are timed on arbitrary scores — their timing, not their choices, is what this measures. Each
time is the best of ``--repeats`` runs (dense is re-timed between methods and its best kept, so a
busy machine inflates neither side); pattern estimation is included in the sparse times.

    python benchmarks/sparse.py                      # 4K/8K/16K, all methods
    python benchmarks/sparse.py --lengths 4096 --methods ashape --densities 0.1
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from lcbench.cache.layer import DenseLayer
from lcbench.engine.attention import dense_attention
from lcbench.methods.registry import METHODS

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30  # SmolLM2-135M


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def prefill_rows(lengths, methods, densities, repeats):
    module = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, config=SimpleNamespace(num_hidden_layers=LAYERS))
    scaling = HEAD_DIM ** -0.5
    rows = []
    for L in lengths:
        gen = torch.Generator().manual_seed(L)
        q = torch.randn(1, HEADS, L, HEAD_DIM, generator=gen)
        k = torch.randn(1, KV_HEADS, L, HEAD_DIM, generator=gen)
        v = torch.randn(1, KV_HEADS, L, HEAD_DIM, generator=gen)

        def dense():
            return dense_attention(module, q, k, v, None, scaling)

        dense_s = best_time(dense, repeats)[0]
        measured = []
        for name in methods:
            for target in densities:
                stage = METHODS.get(name)(ratio=1.0 - target)
                stage.begin_sample()
                seconds, _ = best_time(lambda: stage.prefill_attention(module, q, k, v, None, scaling, 0), repeats)
                measured.append((name, target, stage.sample_stats()["attention_density"], seconds))
                print(f"{L:>6}  {name:<15} {target:>5.2f}  {measured[-1][2]:.3f}  {seconds * 1000:.1f} ms", flush=True)
            dense_s = min(dense_s, best_time(dense, 1)[0])  # dense re-timed between methods: same load
        rows.append((L, "dense", 1.0, 1.0, dense_s, 1.0))
        rows += [(L, name, target, achieved, seconds, dense_s / seconds) for name, target, achieved, seconds in measured]
    return rows


def quest_rows(lengths, densities, repeats):
    """One decode step of a layer past Quest's dense layers: dense vs page-selected attention."""
    module = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, config=SimpleNamespace(num_hidden_layers=LAYERS))
    scaling = HEAD_DIM ** -0.5
    rows = []
    for L in lengths:
        gen = torch.Generator().manual_seed(L + 1)
        layer = DenseLayer()
        layer.append(torch.randn(1, KV_HEADS, L, HEAD_DIM, generator=gen), torch.randn(1, KV_HEADS, L, HEAD_DIM, generator=gen),
                     torch.arange(L)[None], None)
        q = torch.randn(1, HEADS, 1, HEAD_DIM, generator=gen)
        k, v = layer.dense()
        dense_s, _ = best_time(lambda: dense_attention(module, q, k, v, None, scaling), repeats * 5)
        rows.append((L, "dense decode", 1.0, 1.0, dense_s, 1.0))
        for target in densities:
            stage = METHODS.get("quest")(ratio=1.0 - target, dense_layers=0)
            stage.begin_sample()
            stage.decode_attention(module, q, layer, scaling, 5)  # computes the context's page bounds, reused after
            seconds, _ = best_time(lambda: stage.decode_attention(module, q, layer, scaling, 5), repeats * 5)
            achieved = stage.sample_stats()["attention_density"]
            rows.append((L, "quest decode", target, achieved, seconds, dense_s / seconds))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--methods", default="ashape,trishape,vertical_slash,block_topk")
    ap.add_argument("--densities", default="0.5,0.3,0.2,0.1,0.05")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 gives steadier times on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    densities = [float(x) for x in args.densities.split(",")]
    print(f"torch {torch.__version__}, {args.threads} thread(s); one layer, SmolLM2-135M shapes "
          f"({HEADS} q heads, {KV_HEADS} kv heads, d={HEAD_DIM}); best of {args.repeats}")
    print("length  method          target  achieved  time  (prefill attention; the KV cache stays full)")
    with torch.inference_mode():
        rows = prefill_rows(lengths, args.methods.split(","), densities, args.repeats)
        decode = quest_rows(lengths, densities, args.repeats)
    print("\n| length | method | target density | achieved density | time (ms) | speedup vs dense |")
    print("|---:|---|---:|---:|---:|---:|")
    for row in rows + decode:
        L, name, target, achieved, seconds, speedup = row
        print(f"| {L} | {name} | {target:.2f} | {achieved:.3f} | {seconds * 1000:.1f} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
