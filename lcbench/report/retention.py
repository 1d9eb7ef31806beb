"""Per method and task: the largest compression ratio at which the method keeps ≥ 95 % of the
uncompressed (``full``) run's score on the same task and model, with a bootstrap interval.

The curve is the method's mean score (over turns) at each ratio it ran, linearly interpolated,
starting from ``full``'s score at ratio 0 (a method at ratio 0 is ``full``; a run of the method
itself at 0 is used instead where there is one). The reported ratio is where that curve first
falls below 95 % of ``full``'s score: the method keeps the level on the whole range up to it. What
the data cannot bracket is said, not extrapolated:

- ``crossed``: below the level between two ratios the method ran (the interpolated ratio);
- ``before_first``: already below at the smallest ratio run — not reached at any ratio run; the
  number is interpolated between ``full`` at 0 and that ratio, so it is < the smallest ratio;
- ``not_below``: at or above the level at every ratio run — the answer is ≥ the largest ratio run;
- ``no_reference``: no ``full`` run of the task and model, or ``full`` scores 0.

The interval is a paired percentile bootstrap over samples (seeded): samples are drawn with
replacement once per replicate and the same draw re-scores ``full`` and every ratio of the method,
so the uncertainty of the reference is in it too. A replicate that never falls below counts as
+∞ (shown "≥ largest ratio run").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from .frame import method_label

LEVEL = 0.95
N_BOOT = 1000


@dataclass(frozen=True)
class Crossing:
    """Where an interpolated score curve first falls below ``level`` × the reference."""

    kind: str  # crossed | before_first | not_below | no_reference
    ratio: float  # the interpolated ratio; +inf for not_below; nan for no_reference
    smallest: float = math.nan  # smallest and largest ratio run (other than 0)
    largest: float = math.nan
    recovers_at: float | None = None  # a larger ratio run at which the score is back at the level

    def text(self) -> str:
        if self.kind == "crossed":
            return f"{self.ratio:.3f}"
        if self.kind == "before_first":
            return f"not reached (< {self.smallest:g}, the smallest ratio run; ≈{self.ratio:.3f} from full at r=0)"
        if self.kind == "not_below":
            return f"≥ {self.largest:g} (largest ratio run)"
        return "– (no full run scoring > 0 on this task and model)"


def crossing(points: Sequence[tuple[float, float]], reference: float, level: float = LEVEL) -> Crossing:
    """The first ratio where ``points`` ((ratio, score), any order) fall below ``level × reference``.

    ``reference`` is ``full``'s score, the curve's value at ratio 0 unless a point at 0 is given."""
    pts = sorted((float(r), float(s)) for r, s in points if s is not None and not math.isnan(float(s)))
    if reference is None or math.isnan(reference) or reference <= 0 or not pts:
        return Crossing("no_reference", math.nan)
    run = [r for r, _ in pts if r > 0]
    smallest, largest = (min(run), max(run)) if run else (0.0, 0.0)
    prepended = pts[0][0] > 0
    if prepended:
        pts.insert(0, (0.0, float(reference)))
    target = level * reference
    if pts[0][1] < target:  # below already at ratio 0: the method's own r=0 run
        return Crossing("before_first", 0.0, smallest, largest)
    for (r0, s0), (r1, s1) in zip(pts, pts[1:]):
        if s1 < target:
            r = r0 + (r1 - r0) * (s0 - target) / (s0 - s1)
            later = [rr for rr, ss in pts if rr > r1 and ss >= target]
            kind = "before_first" if prepended and r0 == 0.0 else "crossed"
            return Crossing(kind, r, smallest, largest, later[0] if later else None)
    return Crossing("not_below", math.inf, smallest, largest)


@dataclass
class Retention:
    """One row of the 95 % summary: a method on one task and model."""

    task: str
    model: str
    method: str
    reference: float  # full's mean score
    ratios: tuple[float, ...]
    scores: tuple[float, ...]
    run_ids: tuple[str, ...]  # the method's runs, by ratio (full's is reference_run)
    estimate: Crossing
    interval: tuple[float, float]  # bootstrap percentiles of the crossing ratio (+inf: never below)
    reference_run: str | None = None
    n_samples: int = 0
    level: float = LEVEL
    retained: tuple[float, ...] = field(default_factory=tuple)  # score / full's score at each ratio

    def interval_text(self) -> str:
        lo, hi = self.interval
        if math.isnan(lo) or self.estimate.kind == "no_reference":
            return "–"
        largest = self.estimate.largest

        def one(v: float) -> str:
            return f"≥{largest:g}" if math.isinf(v) else f"{v:.3f}"

        return f"[{one(lo)}, {one(hi)}]"


def _sums(part: pd.DataFrame, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per sample (in ``keys`` order): the sum of its turns' scores and their count."""
    g = part.groupby("sample_id")["score"]
    sums = g.sum().reindex(keys).fillna(0.0).to_numpy(float)
    counts = g.count().reindex(keys).fillna(0).to_numpy(float)
    return sums, counts


def retention_table(df: pd.DataFrame, level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> list[Retention]:
    """The summary rows of ``df`` (:func:`lcbench.report.frame.records_frame`), per task and model,
    methods by name."""
    df = df[df["score"].notna()].copy()
    if "lower_is_better" in df:  # "keeps 95 % of full's score" means nothing for a perplexity: left out
        df = df[~df["lower_is_better"].fillna(False).astype(bool)]
    df["label"] = [method_label(m, qa) for m, qa in zip(df["method"], df["query_aware"])]
    df["score"] = df["score"].astype(float)
    rows = []
    rng_seed = seed
    for (task, model), part in df.groupby(["task", "model"], sort=True):
        ref = part[part["label"] == "full"]
        ref_run = sorted(ref["run_id"].unique())[:1]
        ref = ref[ref["run_id"].isin(ref_run)]
        keys = sorted(part["sample_id"].astype(str).unique())
        part = part.assign(sample_id=part["sample_id"].astype(str))
        ref_sums, ref_counts = _sums(ref, keys) if len(ref) else (np.zeros(len(keys)), np.zeros(len(keys)))
        reference = float(ref["score"].mean()) if len(ref) else math.nan
        for label, mpart in part[part["label"] != "full"].groupby("label", sort=True):
            runs = mpart.groupby("run_id")
            points = sorted((float(r["ratio"].iloc[0]), float(r["score"].mean()), str(rid)) for rid, r in runs)
            # one run per ratio (the first by run id where a ratio was run twice)
            by_ratio: dict[float, tuple[float, str]] = {}
            for r, s, rid in points:
                by_ratio.setdefault(r, (s, rid))
            ratios = tuple(sorted(by_ratio))
            scores = tuple(by_ratio[r][0] for r in ratios)
            run_ids = tuple(by_ratio[r][1] for r in ratios)
            estimate = crossing(list(zip(ratios, scores)), reference, level)
            interval = (math.nan, math.nan)
            if estimate.kind != "no_reference" and len(keys) > 1:
                sums = [_sums(mpart[mpart["run_id"] == rid], keys) for rid in run_ids]
                interval = _bootstrap(ratios, sums, (ref_sums, ref_counts), level, n_boot, rng_seed)
            retained = tuple(s / reference if reference and reference > 0 else math.nan for s in scores)
            rows.append(Retention(str(task), str(model), str(label), reference, ratios, scores, run_ids, estimate,
                                  interval, ref_run[0] if ref_run else None, len(keys), level, retained))
    return rows


def _bootstrap(ratios, sums, ref, level, n_boot, seed) -> tuple[float, float]:
    n = len(ref[0])
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))

    def means(s: np.ndarray, c: np.ndarray) -> np.ndarray:
        total = c[idx].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, s[idx].sum(1) / np.where(total > 0, total, 1), np.nan)

    ref_means = means(*ref)
    cols = [means(s, c) for s, c in sums]
    values = []
    for b in range(n_boot):
        c = crossing([(r, col[b]) for r, col in zip(ratios, cols)], float(ref_means[b]), level)
        if c.kind != "no_reference":
            values.append(c.ratio)
    if not values:
        return (math.nan, math.nan)
    v = np.asarray(values, float)  # +inf where a replicate never falls below: order statistics, no arithmetic
    return (float(np.quantile(v, 0.025, method="inverted_cdf")), float(np.quantile(v, 0.975, method="inverted_cdf")))


def retention_grouped(df: pd.DataFrame, level: float = LEVEL, n_boot: int = N_BOOT):
    """The report's table of :func:`retention_table`: one row per method, task and model."""
    from .grouped import GroupedTable

    rows = retention_table(df, level, n_boot)
    numeric, display = [], []
    for r in rows:
        numeric.append({"task": r.task, "model": r.model, "method": r.method, "full_score": r.reference,
                        "kind": r.estimate.kind, "ratio_at_level": r.estimate.ratio, "ci_lo": r.interval[0],
                        "ci_hi": r.interval[1], "ratios": ";".join(f"{x:g}" for x in r.ratios),
                        "scores": ";".join(f"{x:.6g}" for x in r.scores), "n_samples": r.n_samples,
                        "runs": ";".join(r.run_ids)})
        display.append({"task": r.task, "model": r.model, "method": r.method, "full": _score(r.reference),
                        "score at ratios run": points_text(r), f"ratio at {level:.0%} of full": r.estimate.text(),
                        "95% interval": r.interval_text()})
    note = (f"The largest ratio up to which the method keeps ≥ {level:.0%} of full's mean score on the same task and "
            "model, by linear interpolation over the ratios run (full's score at ratio 0); interval: paired "
            f"percentile bootstrap over samples ({n_boot} resamples, seed 0).")
    return GroupedTable("retention", f"compression kept at {level:.0%} of full's score", pd.DataFrame(numeric),
                        pd.DataFrame(display), note)


def _score(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def points_text(r: Retention) -> str:
    """``0.5: 0.97 (97 %); 0.75: 0.90 (90 %)``: each ratio run, its score and share of full's."""
    parts = []
    for ratio, score, kept in zip(r.ratios, r.scores, r.retained):
        share = "" if math.isnan(kept) else f" ({100 * kept:.0f} %)"
        parts.append(f"{ratio:g}: {score:.2f}{share}")
    text = "; ".join(parts)
    if r.estimate.recovers_at is not None:
        text += f" — back at the level at r={r.estimate.recovers_at:g}"
    return text
