"""The summary table of runs: one row per run (task × method × ratio × model) with quality,
achieved compression, latency and memory side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd
from rich.console import Console
from rich.table import Table

from .frame import BATCH_DEPENDENT, BATCH_MARK, batch_note, load_runs, size_text
from .safe import terminal_text
from .throughput import LATENCY_COLUMNS, REFERENCE_MARK, REFERENCE_NOTE, is_reference

# a run whose prefills were shared with other runs of its command (engine/shared_prefill.py)
SHARED_MARK = " ‡"
SHARED_NOTE = ("‡: prefill shared with other runs of the command (--share-prefill), and their turns decoded in one "
               "batch: predictions, bytes and ratios are the run's own, but the peak memory is the recording pass's, "
               "which held the whole dense cache, and tok/s is one row's rate in that batch (--share-prefill off for "
               "a run's own peak and rate).")

COLUMNS = {
    "task": "task", "model": "model", "method": "method", "ratio": "ratio", "budget": "budget", "n": "n",
    "score": "score [95% CI]", "achieved_ratio": "achieved", "kv_mb": "KV MB",
    "attention_density": "attn density", "ttft_s": "TTFT s", "compress_s": "compress s", "text_s": "text s",
    "decode_tok_s": "tok/s", "peak_memory_mb": "peak MB",
}
DENSITY_NOTE = ("attn density: share of the prefill's attention computed by a sparse-attention component; "
                "sparse attention keeps the full KV cache, so KV MB falls only through a chain's other components.")

def run_rows(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per run folder found under ``paths``, from its summary.json. ``score`` is the suite's
    own headline number where the summary has it (LongBench: mean of dataset scores; RULER: mean
    over lengths; SCBench: mean over tasks), else the mean over turns."""
    rows = []
    for run in load_runs(paths):
        overall = run.summary.get("overall", {})
        suite = run.summary.get("suite") or {"score": overall.get("score"), "ci": overall.get("score_ci")}
        batch = overall.get("batch_samples")
        if batch is None and run.records:  # summaries written before batch_samples was summarized
            batch = sum(r.get("batch_samples") or 1 for r in run.records) / len(run.records)
        s = run.spec
        failed = run.failed
        # a task's own label for the data it fell back to (NIAH's filler haystack: meta["data_label"])
        labels = sorted({str(r["meta"]["data_label"]) for r in run.records if (r.get("meta") or {}).get("data_label")})
        rows.append({
            "task": s["task"] + (f"[{', '.join(labels)}]" if labels else ""), "method": run.method, "ratio": s["ratio"],
            "budget": s.get("budget"), "lower_is_better": run.lower_is_better,
            "model": s["model"], "query_aware": s.get("query_aware", False), "n": overall.get("n", 0),
            "score": None if failed else suite.get("score"), "score_ci": None if failed else suite.get("ci"),
            "achieved_ratio": overall.get("achieved_ratio"),
            "kv_mb": overall["kv_bytes"] / 2**20 if overall.get("kv_bytes") is not None else None,
            "ttft_s": overall.get("ttft_s"), "compress_s": overall.get("compress_s"),
            "text_s": overall.get("text_s"), "decode_tok_s": overall.get("decode_tok_s"),
            "peak_memory_mb": overall.get("peak_memory_mb"),
            "memory_kind": run.records[0].get("memory_kind") if run.records else None,
            "attention_density": overall.get("attention_density"),
            "batch_samples": batch,
            "shared_prefill": any(r.get("shared_prefill") for r in run.records),
            "reference_latency": is_reference(run),
            "run_id": run.run_id, "folder": str(run.folder), "status": run.status, "error": run.error,
        })
    df = pd.DataFrame(rows)
    return df.sort_values(["task", "model", "ratio", "method"]).reset_index(drop=True)


def _fmt(value, key: str) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if key in ("n", "budget"):
        return str(int(value))
    if isinstance(value, float):
        if key in ("ratio", "achieved_ratio"):
            return f"{value:.2f}"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def render_table(df: pd.DataFrame, console: Console | None = None, title: str = "lcbench results") -> None:
    """Print the runs as a rich table (memory column labelled CPU RSS or CUDA peak). Text from
    results is escaped (never read as rich markup); the model column and the attention density
    column appear only when they tell runs apart; footnotes say what † and density mean."""
    console = console or Console()
    kinds = set(df.get("memory_kind", pd.Series(dtype=object)).dropna())
    mem_label = {"cpu_rss": "peak RSS MB (CPU)", "cuda_peak_allocated": "peak CUDA MB"}.get(
        next(iter(kinds)) if len(kinds) == 1 else "", "peak MB")
    models = sorted(set(df["model"])) if "model" in df else []
    shown = [k for k in COLUMNS if not (k == "model" and len(models) <= 1)
             and not (k in ("attention_density", "budget") and df.get(k, pd.Series(dtype=float)).isna().all())]
    table = Table(title=terminal_text(f"{title} — model: {', '.join(models)}" if len(models) == 1 else title))
    for key in shown:
        table.add_column(terminal_text(mem_label if key == "peak_memory_mb" else COLUMNS[key]), overflow="fold",
                         justify="left" if key in ("task", "model", "method") else "right")
    batched = df["batch_samples"].fillna(1) > 1 if "batch_samples" in df else pd.Series(False, index=df.index)
    shared = df["shared_prefill"].fillna(False).astype(bool) if "shared_prefill" in df else pd.Series(False, index=df.index)
    reference = (df["reference_latency"].fillna(False).astype(bool) if "reference_latency" in df
                 else pd.Series(False, index=df.index))
    for idx, row in df.iterrows():
        cells = []
        for k in shown:
            cell = _fmt(row.get(k), k)
            if k == "score" and isinstance(row.get("score_ci"), (list, tuple)):
                lo, hi = row["score_ci"]
                cell = f"{row['score']:.2f} [{lo:.2f},{hi:.2f}]"
            if k == "method" and row.get("query_aware"):
                cell += " (qa)"
            if k in BATCH_DEPENDENT and batched[idx]:
                cell += BATCH_MARK
            if k in ("peak_memory_mb", "decode_tok_s") and shared[idx]:
                cell += SHARED_MARK
            if k in LATENCY_COLUMNS and reference[idx] and cell != "–":
                cell += REFERENCE_MARK
            if k == "score" and row.get("status") == "failed":
                cell = "FAILED"
            elif k == "n" and row.get("status") not in (None, "complete"):
                cell += f" ({row['status']})"
            cells.append(terminal_text(cell))
        table.add_row(*cells, style="red" if row.get("status") == "failed" else None)
    notes = [DENSITY_NOTE] if "attention_density" in shown else []
    if "lower_is_better" in df and df["lower_is_better"].fillna(False).astype(bool).any():
        lower = sorted(set(df.loc[df["lower_is_better"].fillna(False).astype(bool), "task"]))
        notes.append(f"{', '.join(lower)}: the score is a perplexity — lower is better.")
    failed = df[df["status"] == "failed"] if "status" in df else df.iloc[0:0]
    if len(failed):
        notes.append("FAILED: " + "; ".join(f"{r['task']} · {r['method']} · {size_text(r)}: {r['error']}"
                                             for _, r in failed.iterrows()))
    if batched.any():
        notes.append(batch_note(df.loc[batched, "batch_samples"].mean()))
    if shared.any():
        notes.append(SHARED_NOTE)
    if reference.any():
        notes.append(REFERENCE_NOTE)
    if notes:
        table.caption = terminal_text(" ".join(notes))
        table.caption_justify = "left"
    console.print(table)
