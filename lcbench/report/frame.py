"""Stored runs as pandas frames: one :class:`Run` per folder, one row per turn record.

Everything in ``lcbench/report`` starts here, so reports, plots, the leaderboard and ``lcbench
check`` read results the same way (json only, never by running a model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from ..errors import UserError
from ..results.store import RunStore, find_runs
from ..tasks.base import LOWER_IS_BETTER_MODES
from ..results.summary import summarize

# record fields copied into the frame (the rest stay in the JSON)
RECORD_FIELDS = ("sample_id", "turn", "score", "achieved_ratio", "requested_ratio", "kv_bytes", "kv_bytes_full",
                 "kept_tokens", "input_tokens", "context_tokens", "text_s", "prefill_s", "compress_s",
                 "question_prefill_s", "ttft_s", "decode_tokens", "decode_s", "decode_tok_s", "peak_memory_mb",
                 "memory_kind", "attention_density", "batch_samples", "prediction")
META_FIELDS = ("dataset", "length", "depth", "length_bucket")


@dataclass
class Run:
    """One run folder: its resolved spec, provenance, records and summary."""

    folder: Path
    run_id: str
    spec: dict[str, Any]
    provenance: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    status: str = "complete"  # status.json: complete, failed, aborted or running (unfinished)
    error: str | None = None  # why a failed run failed
    notes: list[str] = field(default_factory=list)  # e.g. corrupt lines skipped while reading
    methods: list[dict[str, Any]] = field(default_factory=list)  # spec.json "methods": each component described

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @property
    def method(self) -> str:
        return "+".join(str(m["name"]) for m in self.spec["method"])

    @property
    def key(self) -> tuple:
        """What a run measures, apart from the code that ran it: used to pair runs across versions."""
        s = self.spec
        return (s["task"], self.method, float(s["ratio"]), s["model"], bool(s.get("query_aware", False)),
                repr(sorted(s.get("task_args", {}).items())), s.get("limit"), s.get("seed", 0), s.get("budget"))

    @property
    def lower_is_better(self) -> bool:
        """Whether the run's ``score`` is a perplexity (a log-likelihood task): lower is better."""
        return self.spec.get("mode") in LOWER_IS_BETTER_MODES

    @property
    def size(self) -> str:
        """``r=0.5``, or ``budget=512`` for a ``--budget`` run (tokens kept per layer and head)."""
        return size_text(self.spec)

    def label(self) -> str:
        s = self.spec
        qa = " (query-aware)" if s.get("query_aware") else ""
        return f"{s['task']} · {self.method} · {size_text(s)} · {s['model']}{qa}"


def size_text(spec: Mapping[str, Any]) -> str:
    """How much a run keeps, from its spec (or a table row): ``r=0.5`` or ``budget=512``."""
    budget = spec.get("budget")
    if budget is not None and not (isinstance(budget, float) and math.isnan(budget)):
        return f"budget={int(budget)}"
    return f"r={float(spec['ratio']):g}"


def load_run(folder: Path | str) -> Run:
    store = RunStore(folder)
    payload = store.spec()
    spec = payload["spec"]
    missing = [k for k in ("task", "model", "method", "ratio") if k not in spec]
    if missing or not isinstance(spec.get("method"), list) or not all(isinstance(m, dict) and "name" in m
                                                                    for m in spec.get("method") or []):
        raise UserError(f"{store.folder / RunStore.SPEC}: the spec misses {missing or ['method names']}. Fix: "
                        f"restore it from the run's copy, or delete the folder and re-run.")
    records = store.records()
    status = store.status()
    if status["state"] == "complete" and (store.folder / RunStore.SUMMARY).exists():
        summary = store.summary()
    else:  # an unfinished or failed run: summarize what it holds
        summary = summarize(records)
    notes = [f"{store.folder / RunStore.SAMPLES}: {store.skipped} corrupt line(s) skipped (re-running the same "
             f"command moves them to {RunStore.QUARANTINE} and recomputes those turns)"] if store.skipped else []
    return Run(store.folder, payload["run_id"], spec, payload.get("provenance", {}), records, summary,
               status["state"], status.get("error"), notes, list(payload.get("methods") or []))


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run folder under ``paths`` (run folders or folders containing them), in path order."""
    return [load_run(f) for f in find_runs(paths)]


def scored_runs(runs: Iterable[Run]) -> list[Run]:
    """The runs whose records are results: a failed run's are not (its score would be that of fewer
    samples); it is listed as failed instead."""
    return [r for r in runs if not r.failed]


def _setup(run: Run) -> dict[str, Any]:
    """What decides a run's samples: the task's arguments, the sample limit and the seed."""
    s = run.spec
    return {**{k: v for k, v in (s.get("task_args") or {}).items()}, "limit": s.get("limit"), "seed": s.get("seed", 0)}


def task_labels(runs: Iterable[Run]) -> dict[str, str]:
    """Run folder → the task's name, plus ``[k=v, …]`` naming the settings in which it differs from
    other runs of the same task and model (other lengths, a sample limit, another seed), so that
    tables, plots and rankings never pool or compare runs made on different samples."""
    runs = list(runs)
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((run.spec["task"], run.spec["model"]), []).append(run)
    labels = {}
    for (task, _), members in groups.items():
        setups = [_setup(r) for r in members]
        differ = sorted({k for st in setups for k in st if len({repr(o.get(k)) for o in setups}) > 1})
        for run, st in zip(members, setups):
            parts = [f"{k}={_short(st.get(k))}" for k in differ]
            labels[str(run.folder)] = f"{task} [{', '.join(parts)}]" if parts else task
    return labels


def _short(value: Any, width: int = 24) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def records_frame(runs: Iterable[Run]) -> pd.DataFrame:
    """One row per turn record, with the run's task/method/ratio/model and the sample's meta. The
    task column is :func:`task_labels`' label, so runs made on different samples stay apart."""
    rows = []
    runs = list(runs)
    labels = task_labels(runs)
    for run in runs:
        s = run.spec
        base = {"run_id": run.run_id, "task": labels[str(run.folder)], "method": run.method, "ratio": float(s["ratio"]),
                "budget": s.get("budget"), "model": s["model"], "query_aware": bool(s.get("query_aware", False)),
                "lower_is_better": run.lower_is_better}
        for rec in run.records:
            row = dict(base)
            row.update({k: rec.get(k) for k in RECORD_FIELDS})
            meta = rec.get("meta") or {}
            row.update({k: meta.get(k) for k in META_FIELDS})
            if row["dataset"] is None or row["dataset"] == s["task"]:  # the task itself, with its setup label
                row["dataset"] = labels[str(run.folder)]
            rows.append(row)
    columns = ["run_id", "task", "method", "ratio", "budget", "model", "query_aware", "lower_is_better",
               *RECORD_FIELDS, *META_FIELDS]
    df = pd.DataFrame(rows, columns=columns)
    df["kv_mb"] = pd.to_numeric(df["kv_bytes"], errors="coerce") / 2**20
    return df


# cost columns that measure the whole batch a record ran in (--batch-size N|auto), not one request
BATCH_DEPENDENT = ("ttft_s", "decode_tok_s", "peak_memory_mb")
BATCH_MARK = " †"


def batch_note(mean_samples: float) -> str:
    """The footnote for cost cells marked with :data:`BATCH_MARK`."""
    return (f"†: measured on batches of {mean_samples:.2g} samples on average (--batch-size N|auto): the "
            f"batch's time and memory, not one request's. Per-request numbers: --batch-size turns (the default).")


def method_label(method: str, query_aware: bool) -> str:
    return f"{method} (qa)" if query_aware else method
