"""Grouped report tables: rows method × ratio (per model), columns per task/dataset, length
bucket or turn index, each cell a mean score with its bootstrap 95% interval; plus the cost
columns (achieved ratio, KV MB, TTFT, compression and text-stage time, decode tok/s, peak
memory) averaged over the row's turns.

Numbers come as a numeric frame (for CSV) and as a display frame of strings (terminal, Markdown,
LaTeX), built from the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import UserError
from ..results.summary import bootstrap_ci
from .frame import BATCH_DEPENDENT, BATCH_MARK, batch_note, method_label

GROUPINGS = ("dataset", "length", "turn")
ROW_KEYS = ("model", "method", "ratio")
COST_COLUMNS = {"achieved_ratio": "achieved", "kv_mb": "KV MB", "ttft_s": "TTFT s", "compress_s": "compress s",
                "text_s": "text s", "decode_tok_s": "decode tok/s", "peak_memory_mb": "peak MB"}
# compress_s: the time in the cache stages' compress_layer; text_s: the prompt-compression stage's time
# on the context (both part of TTFT; in a run batched across samples, compress_s is the batch's too)


@dataclass
class GroupedTable:
    """One table: ``numeric`` has columns ``(<group>, score|ci_lo|ci_hi|n)`` and the cost columns;
    ``display`` has one string column per group ("0.83 [0.67, 1.00]") and the cost columns."""

    name: str
    title: str
    numeric: pd.DataFrame
    display: pd.DataFrame
    note: str = ""  # a footnote to the display (e.g. what † means)


def _column_label(df: pd.DataFrame, by: str) -> pd.Series:
    several_tasks = df["task"].nunique() > 1
    if by == "dataset":
        return df.apply(lambda r: r["dataset"] if r["dataset"] == r["task"] or not several_tasks
                        else f"{r['task']}/{r['dataset']}", axis=1)
    prefix = df["task"] + " · " if several_tasks else ""
    if by == "length":
        bucket = df["length_bucket"].where(df["length_bucket"].notna(), df["input_tokens"])
        return prefix + bucket.map(lambda b: f"{_num(b)} tok")
    if by == "turn":
        return prefix + df["turn"].map(lambda t: f"turn {int(t)}")
    raise UserError(f"--group-by {by!r}: choose one of {', '.join(GROUPINGS)}. "
                    f"Fix: e.g. --group-by dataset.")


def _num(x) -> str:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return str(x)
    return f"{f:g}" if not f.is_integer() else str(int(f))


def _sort_key(label: str):
    """Natural order: '500 tok' < '1000 tok', 'turn 2' < 'turn 10'."""
    parts = []
    for token in label.replace("·", " ").split():
        try:
            parts.append((0, float(token), ""))
        except ValueError:
            parts.append((1, 0.0, token))
    return parts


def _row_frame(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out["method"] = [method_label(m, qa) for m, qa in zip(out["method"], out["query_aware"])]
    return out


def _row_order(index: pd.MultiIndex) -> list:
    """Models, then 'full' first, then methods by name, then ratios ascending."""
    return sorted(index, key=lambda k: (k[0], k[1] != "full", k[1], k[2]))


def grouped_table(df: pd.DataFrame, by: str = "dataset", n_boot: int = 1000) -> GroupedTable:
    """The table of ``df`` (from :func:`records_frame`) grouped into columns by ``by``."""
    if df.empty:
        raise UserError("no records to report: the run folders hold no samples yet. Fix: let `lcbench run` finish.")
    df = _row_frame(df)
    df["column"] = _column_label(df, by)
    scored = df[df["score"].notna()]
    cells = {}
    for key, part in scored.groupby([*ROW_KEYS, "column"], sort=False):
        vals = part["score"].astype(float).to_numpy()
        lo, hi = bootstrap_ci(vals, n_boot=n_boot)
        cells[key] = {"score": float(vals.mean()), "ci_lo": lo, "ci_hi": hi, "n": len(vals)}
    columns = sorted(df["column"].unique(), key=_sort_key)
    rows = _row_order(pd.MultiIndex.from_frame(df[list(ROW_KEYS)].drop_duplicates()))
    numbers = df.assign(**{k: pd.to_numeric(df[k], errors="coerce") for k in COST_COLUMNS})
    costs = numbers.groupby(list(ROW_KEYS))[list(COST_COLUMNS)].mean()
    batch = pd.to_numeric(df["batch_samples"], errors="coerce").fillna(1).groupby(
        [df[k] for k in ROW_KEYS]).mean()
    mem_label = _memory_label(df)
    numeric, display = [], []
    for r in rows:
        num = dict(zip(ROW_KEYS, r))
        disp = {"model": r[0], "method": r[1], "ratio": f"{r[2]:g}"}
        for col in columns:
            cell = cells.get((*r, col), {})
            for stat in ("score", "ci_lo", "ci_hi", "n"):
                num[f"{col} {stat}"] = cell.get(stat, np.nan)
            disp[col] = _fmt_ci(cell.get("score"), cell.get("ci_lo"), cell.get("ci_hi"))
        for key, label in COST_COLUMNS.items():
            num[key] = costs.loc[r, key]
            disp[mem_label if key == "peak_memory_mb" else label] = fmt_number(num[key], key) + (
                BATCH_MARK if key in BATCH_DEPENDENT and batch.loc[r] > 1 else "")
        num["batch_samples"] = batch.loc[r]
        numeric.append(num)
        display.append(disp)
    titles = {"dataset": "score per task/dataset", "length": "score per context length",
              "turn": "score per turn index"}
    batched = batch[batch > 1]
    return GroupedTable(f"by_{by}", f"{titles[by]} (mean [95% bootstrap CI])", pd.DataFrame(numeric),
                        pd.DataFrame(display), batch_note(batched.mean()) if len(batched) else "")


def _memory_label(df: pd.DataFrame) -> str:
    kinds = set(df["memory_kind"].dropna())
    if kinds == {"cpu_rss"}:
        return "peak RSS MB (CPU)"
    if kinds == {"cuda_peak_allocated"}:
        return "peak CUDA MB"
    return "peak MB"


def _fmt_ci(score: float, lo: float, hi: float) -> str:
    if score is None or pd.isna(score):
        return "–"
    return f"{score:.2f} [{lo:.2f}, {hi:.2f}]"


def fmt_number(value, key: str = "") -> str:
    """Short human format: ratios with 2 decimals, other numbers with 3 significant digits."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if key in ("ratio", "achieved_ratio", "requested_ratio"):
        return f"{value:.2f}"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def report_tables(df: pd.DataFrame, groupings: tuple[str, ...] = GROUPINGS) -> list[GroupedTable]:
    """The tables ``lcbench report`` prints and writes; a turn table only for multi-turn data."""
    tables = []
    for by in groupings:
        if by == "turn" and df["turn"].nunique() <= 1 and len(groupings) > 1:
            continue
        if by == "length" and df["length_bucket"].isna().all() and len(groupings) > 1:
            continue
        tables.append(grouped_table(df, by))
    return tables
