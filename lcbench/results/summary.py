"""Aggregates of a run's records: means with bootstrap confidence intervals, per task, per
length bucket and per turn index (DESIGN.md "Measurement")."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

METRICS = ("score", "achieved_ratio", "kv_bytes", "kept_tokens", "ttft_s", "prefill_s", "compress_s",
           "text_s", "decode_tok_s", "decode_s", "peak_memory_mb", "input_tokens", "attention_density",
           "batch_samples", "kv_bytes_end", "kept_tokens_end")


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


def suite_score(records: list[dict[str, Any]], score_of: Callable[[list[dict]], float | None],
                n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict[str, Any] | None:
    """The suite's own headline number (``score_of``: e.g. LongBench's mean of dataset scores,
    RULER's mean over lengths) with a percentile bootstrap interval that resamples whole samples
    (every turn of a sample together) within each dataset and length (so every resample has the
    suite's composition) and recomputes the number each time."""
    value = score_of(records)
    if value is None:
        return None
    strata: dict[tuple, dict[str, list[dict]]] = {}
    for r in records:
        meta = r.get("meta") or {}
        stratum = strata.setdefault((str(meta.get("dataset")), str(meta.get("length"))), {})
        stratum.setdefault(str(r.get("sample_id")), []).append(r)
    groups = [list(stratum.values()) for stratum in strata.values()]
    if all(len(g) < 2 for g in groups):
        return {"score": float(value), "ci": [float(value), float(value)]}
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        resample = [r for g in groups for i in rng.integers(0, len(g), size=len(g)) for r in g[i]]
        stat = score_of(resample)
        if stat is not None:
            stats.append(stat)
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2]) if stats else (float("nan"),) * 2
    return {"score": float(value), "ci": [float(lo), float(hi)]}


def summarize(records: list[dict[str, Any]], task_aggregate: dict[str, float] | None = None,
              suite: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``summary.json`` payload; ``suite`` is :func:`suite_score`'s result, when known."""
    return {
        "overall": describe(records),
        "suite": suite,
        "aggregate": task_aggregate or {},
        "by_dataset": group(records, lambda r: r.get("meta", {}).get("dataset")),
        "by_length": group(records, lambda r: r.get("meta", {}).get("length_bucket")),
        "by_turn": group(records, lambda r: r.get("turn")),
    }
