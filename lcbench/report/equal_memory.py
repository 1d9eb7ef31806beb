"""The equal-memory view: every run of a task and model placed by the KV bytes it measured, all
method families and chains on one axis, so a dropping method at ratio 0.75 and a 2-bit quantizer
are compared at the memory they actually hold rather than at the ratio they were asked for.

Per run: the mean over turns of the measured ``kv_bytes`` (read from the tensors held, the
record's own field) and of ``kv_bytes / kv_bytes_full``, the mean score with its seeded bootstrap
interval, and whether the run is on the frontier (no other run of the task and model holds at most
its bytes with a higher score, or fewer bytes with at least its score). Rows are ordered by KV
bytes ascending, then score descending, then method and ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from ..results.summary import bootstrap_ci
from .frame import Run, method_label


@dataclass
class MemoryPoint:
    """One run on the equal-memory axis."""

    task: str
    model: str
    method: str
    family: str
    ratio: float
    kv_bytes: float  # mean over turns of the measured KV bytes
    kv_share: float  # mean over turns of kv_bytes / kv_bytes_full (the uncompressed cache)
    score: float
    ci: tuple[float, float]
    n: int
    run_id: str
    frontier: bool = False
    budget: int | None = None  # a --budget run's tokens per layer and head (its ratio is then 0)

    @property
    def size(self) -> str:
        """The ratio, or ``budget N`` for a --budget run."""
        return f"budget {self.budget}" if self.budget is not None else f"{self.ratio:g}"

    @property
    def kv_mb(self) -> float:
        return self.kv_bytes / 2**20


def chain_family(run: Run) -> str:
    """The families of a run's chain, as its spec.json described them (``?`` for a component no
    run described), joined with ``+``."""
    known = {p.get("name"): p.get("family") for p in run.methods if isinstance(p, dict) and p.get("registered")}
    return "+".join(str(known.get(part["name"]) or "?") for part in run.spec["method"])


def families(runs: Iterable[Run]) -> dict[str, str]:
    return {run.run_id: chain_family(run) for run in runs}


def _frontier(points: list[MemoryPoint], lower_is_better: bool = False) -> None:
    """Mark the runs no other run beats on both axes (fewer KV bytes, a better score; a perplexity's
    better is lower)."""
    sign = -1.0 if lower_is_better else 1.0
    for p in points:
        p.frontier = not any((q.kv_bytes <= p.kv_bytes and sign * q.score > sign * p.score)
                             or (q.kv_bytes < p.kv_bytes and sign * q.score >= sign * p.score)
                             for q in points if q is not p)


def equal_memory_points(df: pd.DataFrame, family_of: Mapping[str, str] | None = None,
                        n_boot: int = 1000) -> dict[tuple[str, str], list[MemoryPoint]]:
    """(task, model) → its runs in equal-memory order (``df`` from :func:`records_frame`).
    Runs without a measured ``kv_bytes`` or score are left out."""
    family_of = family_of or {}
    out: dict[tuple[str, str], list[MemoryPoint]] = {}
    num = df.assign(kv_bytes=pd.to_numeric(df["kv_bytes"], errors="coerce"),
                    kv_bytes_full=pd.to_numeric(df["kv_bytes_full"], errors="coerce"),
                    score=pd.to_numeric(df["score"], errors="coerce"))
    for (task, model), part in num.groupby(["task", "model"], sort=True):
        points = []
        for run_id, run in part.groupby("run_id", sort=True):
            scores = run["score"].dropna().to_numpy(float)
            kv = run["kv_bytes"].dropna()
            if not len(scores) or not len(kv):
                continue
            share = (run["kv_bytes"] / run["kv_bytes_full"]).replace([np.inf, -np.inf], np.nan).dropna()
            lo, hi = bootstrap_ci(scores, n_boot=n_boot)
            first = run.iloc[0]
            points.append(MemoryPoint(str(task), str(model), method_label(first["method"], bool(first["query_aware"])),
                                      family_of.get(str(run_id), "?"), float(first["ratio"]), float(kv.mean()),
                                      float(share.mean()) if len(share) else float("nan"), float(scores.mean()),
                                      (lo, hi), len(scores), str(run_id),
                                      budget=None if pd.isna(first.get("budget")) else int(first["budget"])))
        lower = bool(part["lower_is_better"].fillna(False).any()) if "lower_is_better" in part else False
        _frontier(points, lower)
        points.sort(key=lambda p: (p.kv_bytes, p.score if lower else -p.score, p.method, p.ratio))
        out[(str(task), str(model))] = points
    return out


def equal_memory_table(df: pd.DataFrame, family_of: Mapping[str, str] | None = None,
                       commands: Mapping[str, str] | None = None):
    """The report's table: one row per run, grouped by task and model in equal-memory order."""
    from .grouped import GroupedTable, fmt_number

    commands = commands or {}
    numeric, display = [], []
    groups = equal_memory_points(df, family_of)
    several = len({model for _, model in groups}) > 1
    for (task, model), points in groups.items():
        for p in points:
            numeric.append({"task": task, "model": model, "method": p.method, "family": p.family, "ratio": p.ratio,
                            "kv_bytes": p.kv_bytes, "kv_share": p.kv_share, "score": p.score, "ci_lo": p.ci[0],
                            "ci_hi": p.ci[1], "n": p.n, "frontier": p.frontier, "run_id": p.run_id,
                            "command": commands.get(p.run_id, "")})
            row = {"task": task}
            if several:
                row["model"] = model
            row.update({"KV MB": fmt_number(p.kv_mb), "KV % of full": _percent(p.kv_share), "method": p.method,
                        "family": p.family, "ratio": p.size,
                        "score [95% CI]": f"{p.score:.2f} [{p.ci[0]:.2f}, {p.ci[1]:.2f}]",
                        "frontier": "yes" if p.frontier else ""})
            display.append(row)
    note = ("Runs of each task and model ordered by the KV bytes they measured (mean over turns), all families and "
            "chains on one axis. frontier: yes when no run holds at most these bytes with a higher score. "
            "Sparse attention keeps the full cache, so it sits at full's bytes.")
    return GroupedTable("equal_memory", "score at equal KV memory (measured bytes)", pd.DataFrame(numeric),
                        pd.DataFrame(display), note)


def _percent(share: float) -> str:
    return "–" if share is None or np.isnan(share) else f"{100 * share:.1f} %"
