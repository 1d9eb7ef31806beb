"""Regression comparison of two runs of the same spec, turn by turn (``lcbench check``).

Turns are paired by (sample id, turn index), so a sample that is hard for every method does not
widen the interval: the paired bootstrap resamples the per-turn score differences (Efron &
Tibshirani 1993, ch. 16; the paired test used for NLP system comparisons, Koehn 2004). The
question is one-sided (did the score drop?), so the bounds are one-sided: the upper bound at 95%
is the 95th percentile of the resampled mean differences. A run *regresses* when

- the upper bound lies below zero (the drop is real at the chosen confidence) **and** the drop is
  larger than ``tolerance`` (it matters), or
- the mean drop exceeds a declared ``max_drop``, whatever the interval says (small suites, where
  the interval is wide), or
- it compresses less than the baseline did (achieved ratio lower by more than ``ratio_tolerance``).

Identical re-runs give all-zero differences, whose bounds are [0, 0]: they pass. A run that lacks
turns the baseline has is *incomplete*, and one that ended in an error *failed*: both fail too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

REGRESSED, IMPROVED, SAME, OK, INCOMPLETE = "regressed", "improved", "same", "ok", "incomplete"
FAILED = "failed"  # the new run ended in an error (a compression shortfall, a crash): no score to compare
FAILING = (REGRESSED, INCOMPLETE, FAILED)


def paired_bootstrap(base: np.ndarray, new: np.ndarray, n_boot: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``new - base`` and its one-sided percentile-bootstrap bounds at ``confidence``
    (lower, upper) — together the two-sided interval at ``2 * confidence - 1``; seeded."""
    d = np.asarray(new, dtype=float) - np.asarray(base, dtype=float)
    if d.size == 0:
        return (float("nan"), float("nan"), float("nan"))
    if not d.any():
        return (0.0, 0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(1)
    return (float(d.mean()), float(np.quantile(means, 1.0 - confidence)), float(np.quantile(means, confidence)))


def _by_turn(records: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(str(r["sample_id"]), int(r["turn"])): r for r in records}


def _mean(records: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in records if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


@dataclass
class Comparison:
    """Before/after of one run: paired turns, scores, the difference's interval, the verdict."""

    label: str
    baseline_run: str
    new_run: str
    n_paired: int
    n_baseline: int
    before: float | None
    after: float | None
    delta: float
    ci: tuple[float, float]
    changed: int
    achieved_before: float | None
    achieved_after: float | None
    verdict: str
    reasons: list[str] = field(default_factory=list)
    model: str = ""

    @property
    def failed(self) -> bool:
        return self.verdict in FAILING


def compare_records(label: str, baseline_run: str, new_run: str, base: list[dict[str, Any]],
                    new: list[dict[str, Any]], tolerance: float = 0.0, ratio_tolerance: float = 0.02,
                    confidence: float = 0.95, n_boot: int = 2000, max_drop: float | None = None,
                    lower_is_better: bool = False) -> Comparison:
    """Compare ``new`` with ``base`` (turn records of the same spec) and decide the verdict.
    ``lower_is_better`` (a perplexity: loglik mode): the verdict is on the score's fall, not its rise;
    ``delta`` and its interval stay ``new − base``."""
    b, n = _by_turn(base), _by_turn(new)
    keys = sorted(k for k in b if k in n and b[k].get("score") is not None and n[k].get("score") is not None)
    before = np.array([b[k]["score"] for k in keys], dtype=float)
    after = np.array([n[k]["score"] for k in keys], dtype=float)
    sign = -1.0 if lower_is_better else 1.0
    gain, lo, hi = paired_bootstrap(sign * before, sign * after, n_boot, confidence)  # > 0: better
    delta, interval = sign * gain, ((lo, hi) if sign > 0 else (-hi, -lo))
    paired_base = [b[k] for k in keys]
    paired_new = [n[k] for k in keys]
    comp = Comparison(label, baseline_run, new_run, len(keys), len(b),
                      float(before.mean()) if keys else None, float(after.mean()) if keys else None,
                      delta, interval, int((before != after).sum()),
                      _mean(paired_base, "achieved_ratio"), _mean(paired_new, "achieved_ratio"), OK)
    if len(keys) < len(b):
        comp.reasons.append(f"{len(b) - len(keys)} of {len(b)} baseline turns missing from the new run")
    worse = "rose (lower is better)" if lower_is_better else "dropped"
    if keys and hi < 0 and -gain > tolerance:
        bound = f"lower bound {-hi:+.3f} is above 0" if lower_is_better else f"upper bound {hi:+.3f} is below 0"
        comp.reasons.append(f"score {worse} by {-gain:.3f}: its {confidence:.0%} {bound} "
                            f"and the drop exceeds the tolerance {tolerance:g}")
    elif keys and max_drop is not None and -gain > max_drop:
        comp.reasons.append(f"score {worse} by {-gain:.3f}, more than the declared maximum drop {max_drop:g}")
    ab, aa = comp.achieved_before, comp.achieved_after
    if ab is not None and aa is not None and aa < ab - ratio_tolerance:
        comp.reasons.append(f"achieved compression fell from {ab:.3f} to {aa:.3f} "
                            f"(more than the ratio tolerance {ratio_tolerance:g})")
    if len(keys) < len(b):
        comp.verdict = INCOMPLETE
    elif comp.reasons:
        comp.verdict = REGRESSED
    elif keys and lo > 0:
        comp.verdict = IMPROVED
    elif comp.changed == 0:
        comp.verdict = SAME
    return comp
