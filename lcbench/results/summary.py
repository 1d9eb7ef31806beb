"""Aggregates of a run's records: means with bootstrap confidence intervals, per task, per
length bucket and per turn index (DESIGN.md "Measurement")."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

METRICS = ("score", "achieved_ratio", "kv_bytes", "kept_tokens", "ttft_s", "prefill_s", "compress_s",
           "text_s", "decode_tok_s", "decode_s", "peak_memory_mb", "input_tokens", "attention_density",
           "batch_samples")


def bootstrap_ci(values: Iterable[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (seeded, so summaries are reproducible)."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    if len(x) == 1:
        return (float(x[0]), float(x[0]))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
    return (float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2)))


def describe(records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(records)}
    for key in METRICS:
        vals = [r[key] for r in records if r.get(key) is not None]
        if not vals:
            continue
        out[key] = float(np.mean(vals))
        if key == "score":
            lo, hi = bootstrap_ci(vals)
            out["score_ci"] = [lo, hi]
    return out


def group(records: list[dict[str, Any]], key) -> dict[str, dict[str, Any]]:
    buckets: dict[str, list[dict]] = {}
    for r in records:
        k = key(r)
        if k is not None:
            buckets.setdefault(str(k), []).append(r)
    return {k: describe(v) for k, v in sorted(buckets.items(), key=lambda kv: _sort_key(kv[0]))}


def _sort_key(k: str):
    try:
        return (0, float(k), "")
    except ValueError:
        return (1, 0.0, k)


def summarize(records: list[dict[str, Any]], task_aggregate: dict[str, float] | None = None) -> dict[str, Any]:
    """The ``summary.json`` payload."""
    return {
        "overall": describe(records),
        "aggregate": task_aggregate or {},
        "by_dataset": group(records, lambda r: r.get("meta", {}).get("dataset")),
        "by_length": group(records, lambda r: r.get("meta", {}).get("length_bucket")),
        "by_turn": group(records, lambda r: r.get("turn")),
    }
