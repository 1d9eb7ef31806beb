"""LongBench aggregates from per-row records (``meta.dataset``, ``score`` 0-100, and the
``score_upstream``/``score_fixed`` variants).

- Per dataset: ``round(mean, 2)`` — ``eval.py scorer``'s ``round(100 * total / N, 2)``.
- Per category, per language: the mean of the category's datasets in that language's table of
  ``LongBench/README.md`` (Code is in both; English Synthetic = passage_count +
  passage_retrieval_en), reported as ``en/<category>``; ``en/Avg`` / ``zh/Avg`` = the mean of the
  six categories. A category appears only when all its datasets were run, an Avg only when all six.
- LongBench-E (``eval.py --e``, ``scorer_e``): per dataset and length bucket
  ``<dataset>/<bucket>`` (an empty bucket, NaN upstream, is left out); ``<bucket>`` and
  ``<category>/<bucket>`` average the datasets' bucket scores (the README's length curve).
- ``score``: the mean of the dataset scores present (lcbench's one-number summary, not upstream).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from .metrics import QUIRKY
from .protocol import longbench_protocol


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def group_scores(records: list[dict], key: str = "score", by: str = "dataset") -> dict[str, list[float]]:
    """Per-row ``key`` values grouped by ``meta[by]`` (rows without a score are skipped)."""
    out: dict[str, list[float]] = defaultdict(list)
    for r in records:
        value = r.get(key, r.get("score"))
        if value is not None:
            out[r["meta"][by]].append(float(value))
    return dict(out)


def dataset_means(records: list[dict], key: str = "score", digits: int | None = 2) -> dict[str, float]:
    """Mean ``key`` per dataset, rounded to ``digits`` (None: unrounded)."""
    means = {ds: _mean(v) for ds, v in group_scores(records, key).items()}
    return means if digits is None else {ds: round(m, digits) for ds, m in means.items()}


def variant_means(records: list[dict], digits: int | None = 2) -> dict[str, float]:
    """``<dataset>:upstream`` and ``<dataset>:fixed`` for datasets whose metric has a quirk."""
    metric = longbench_protocol()["metric"]
    out = {}
    for key, tag in (("score_upstream", "upstream"), ("score_fixed", "fixed")):
        for ds, value in dataset_means(records, key, digits).items():
            if metric.get(ds) in QUIRKY:
                out[f"{ds}:{tag}"] = value
    return out


def leaderboard(per_dataset: dict[str, float]) -> dict[str, float]:
    """README's per-language category scores and Avg from per-dataset scores."""
    out = {}
    for lang, table in longbench_protocol()["leaderboard"].items():
        cats = {}
        for category, members in table.items():
            if all(m in per_dataset for m in members):
                cats[category] = round(_mean(per_dataset[m] for m in members), 2)
                out[f"{lang}/{category}"] = cats[category]
        if len(cats) == len(table):
            out[f"{lang}/Avg"] = round(_mean(cats.values()), 2)
    return out


def longbench_scores(records: list[dict]) -> dict[str, float]:
    per_dataset = dataset_means(records)
    if not per_dataset:
        return {}
    order = {d: i for i, d in enumerate(longbench_protocol()["datasets"])}
    out = {ds: per_dataset[ds] for ds in sorted(per_dataset, key=lambda d: order.get(d, len(order)))}
    out.update(variant_means(records))
    out.update(leaderboard(per_dataset))
    out["score"] = round(_mean(per_dataset.values()), 2)
    return out


def e_scores(records: list[dict]) -> dict[str, float]:
    proto = longbench_protocol()
    out = longbench_scores(records)
    if not out:
        return out
    for key in [k for k in out if k.startswith(("en/", "zh/"))]:
        del out[key]  # LongBench-E is reported per length bucket, not per language table
    buckets: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in records:
        bucket = r["meta"].get("length_bucket")
        if r.get("score") is not None and bucket is not None:
            buckets[r["meta"]["dataset"], bucket].append(float(r["score"]))
    names = [b["name"] for b in proto["length_buckets"]]
    for bucket in names:
        per_ds = {ds: round(_mean(v), 2) for (ds, b), v in buckets.items() if b == bucket}
        for ds, value in per_ds.items():
            out[f"{ds}/{bucket}"] = value
        if per_ds:
            out[bucket] = round(_mean(per_ds.values()), 2)
        by_cat: dict[str, list[float]] = defaultdict(list)
        for ds, value in per_ds.items():
            by_cat[proto["category"][ds]].append(value)
        for category, values in by_cat.items():
            out[f"{category}/{bucket}"] = round(_mean(values), 2)
    return out
