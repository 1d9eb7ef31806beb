"""Plots from stored records (matplotlib, written as PNG and SVG):

- score vs achieved compression, one line per method, one figure per task and model (the
  kvpress benchmark plot): the uncompressed ``full`` run is a dashed reference line;
- the needle heatmap, depth × context length, one per run that has both in its sample meta
  (gkamradt/LLMTest_NeedleInAHaystack's visualisation);
- TTFT, decode speed and peak memory against context length, one line per method × ratio;
- the equal-memory view: score against measured KV MB, every run of a task and model on one axis
  (marker by family, the frontier drawn as a step line; :mod:`lcbench.report.equal_memory`).

File names are slugs of the labels plus a short hash, so any method or model name is safe on disk.
SVGs carry no date and a fixed hash salt, so rebuilding from the same results gives the same files.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..results.summary import bootstrap_ci  # noqa: E402
from .frame import method_label  # noqa: E402

EXTENSIONS = ("png", "svg")


@dataclass
class Plot:
    """One figure on disk: ``stem`` + each extension, what it shows and which runs it draws."""

    kind: str  # score_vs_ratio | needle | cost | equal_memory
    title: str
    stem: str
    task: str
    model: str
    methods: tuple[str, ...]
    run_id: str | None = None  # the run a per-run plot (needle heatmap) draws

    def path(self, ext: str = "png") -> str:
        return f"{self.stem}.{ext}"


def slug(*parts: str) -> str:
    """A filesystem- and URL-safe name for ``parts`` (readable prefix + hash of the exact text)."""
    text = "__".join(parts)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60] or "x"
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _save(fig, out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with plt.rc_context({"svg.hashsalt": "lcbench"}):
        for ext in EXTENSIONS:
            meta = {"Date": None} if ext == "svg" else {}
            fig.savefig(out_dir / f"{stem}.{ext}", dpi=110, metadata=meta)
    plt.close(fig)


def _labelled(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out["label"] = [method_label(m, qa) for m, qa in zip(out["method"], out["query_aware"])]
    out["text"] = out["label"].map(_text)
    out["model_text"] = out["model"].map(_text)
    out["task_text"] = out["task"].map(_text)
    return out


def _text(label: str) -> str:
    """Text for matplotlib: '$' would start mathtext and a leading '_' hides a legend entry."""
    label = str(label).replace("$", r"\$")
    return " " + label if label.startswith("_") else label


def _mean_ci(values) -> tuple[float, float, float]:
    x = pd.to_numeric(pd.Series(values), errors="coerce").dropna().to_numpy(float)
    if len(x) == 0:
        return (np.nan, np.nan, np.nan)
    lo, hi = bootstrap_ci(x)
    return (float(x.mean()), lo, hi)


def score_vs_ratio(df: pd.DataFrame, out_dir: Path) -> list[Plot]:
    """Per task and model: mean score (95% CI bars) against mean achieved ratio, one line per method."""
    plots = []
    df = _labelled(df[df["score"].notna()])
    for (task, model), part in df.groupby(["task", "model"], sort=True):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
        methods = []
        for label, mpart in part.groupby("label", sort=True):
            pts = []
            for _, run in mpart.groupby("run_id"):
                score, lo, hi = _mean_ci(run["score"])
                achieved = pd.to_numeric(run["achieved_ratio"], errors="coerce").mean()
                pts.append((0.0 if np.isnan(achieved) else achieved, score, lo, hi))
            pts.sort()
            x, y, lo, hi = (np.array(v) for v in zip(*pts))
            methods.append(label)
            if label == "full":
                ax.axhline(y[0], color="black", linestyle="--", linewidth=1, label="full (uncompressed)")
                continue
            ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", capsize=3, label=_text(label))
        ax.set_xlabel("achieved compression ratio (fraction of context KV removed)")
        ax.set_ylabel("score")
        ax.set_xlim(-0.02, 1.0)
        ax.set_title(f"{_text(task)} — {_text(model)}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        stem = slug("score_vs_ratio", task, model)
        _save(fig, out_dir, stem)
        plots.append(Plot("score_vs_ratio", f"score vs achieved compression: {task}, {model}", stem, task, model,
                          tuple(methods)))
    return plots


def needle_grid(part: pd.DataFrame) -> pd.DataFrame:
    """Mean score per needle depth (rows, ascending) × context length (columns, ascending)."""
    return part.pivot_table(index="depth", columns="length", values="score", aggfunc="mean").sort_index()


def needle_heatmaps(df: pd.DataFrame, out_dir: Path) -> list[Plot]:
    """Per run with ``depth`` and ``length`` in its meta: mean score, depth (rows) × length (columns)."""
    plots = []
    df = _labelled(df[df["score"].notna() & df["depth"].notna() & df["length"].notna()])
    for run_id, part in df.groupby("run_id", sort=True):
        first = part.iloc[0]
        grid = needle_grid(part)
        fig, ax = plt.subplots(figsize=(2.6 + 0.9 * grid.shape[1], 1.8 + 0.45 * grid.shape[0]), layout="constrained")
        im = ax.imshow(grid.to_numpy(float), cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [f"{c:g}" for c in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{d:g}%" for d in grid.index])
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                v = grid.iat[i, j]
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        title = f"{first['task']} — {first['label']} r={first['ratio']:g} — {first['model']}"
        shown = f"{first['task_text']} — {first['text']} r={first['ratio']:g} — {first['model_text']}"
        ax.set_title(shown, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
        stem = slug("needle", str(run_id))
        _save(fig, out_dir, stem)
        plots.append(Plot("needle", f"needle heatmap: {title}", stem, first["task"], first["model"], (first["label"],),
                          str(run_id)))
    return plots


COST_PANELS = (("ttft_s", "TTFT (s)"), ("decode_tok_s", "decode tokens/s"), ("peak_memory_mb", "peak memory (MB)"))


def cost_vs_length(df: pd.DataFrame, out_dir: Path) -> list[Plot]:
    """Per task and model: TTFT, decode speed and peak memory against context length (input tokens,
    averaged per length bucket), one line per method × ratio."""
    plots = []
    df = _labelled(df)
    for (task, model), part in df.groupby(["task", "model"], sort=True):
        kinds = set(part["memory_kind"].dropna())
        mem = {"cpu_rss": "peak RSS (MB, CPU)", "cuda_peak_allocated": "peak CUDA allocated (MB)"}.get(
            next(iter(kinds)) if len(kinds) == 1 else "", "peak memory (MB)")
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
        labels = []
        for (label, ratio), lpart in part.groupby(["label", "ratio"], sort=True):
            bucket = lpart["length_bucket"].where(lpart["length_bucket"].notna(), lpart["input_tokens"])
            grouped = lpart.assign(bucket=bucket).groupby("bucket")
            x = grouped["input_tokens"].mean()
            name = f"{_text(label)} r={ratio:g}"
            labels.append(label)
            for ax, (key, ylabel) in zip(axes, COST_PANELS):
                y = grouped[key].apply(lambda s: pd.to_numeric(s, errors="coerce").mean())
                ax.plot(x.to_numpy(), y.to_numpy(), marker="o", label=name)
                ax.set_ylabel(mem if key == "peak_memory_mb" else ylabel)
        for ax in axes:
            ax.set_xlabel("input tokens")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"latency and memory vs context length: {_text(task)} — {_text(model)}", fontsize=10)
        stem = slug("cost", task, model)
        _save(fig, out_dir, stem)
        plots.append(Plot("cost", f"latency and memory vs context length: {task}, {model}", stem, task, model,
                          tuple(sorted(set(labels)))))
    return plots


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def equal_memory(df: pd.DataFrame, out_dir: Path, family_of: dict[str, str] | None = None) -> list[Plot]:
    """Per task and model: each run's mean score (95% CI bars) against its measured KV MB (mean over
    turns), colour by method, marker by family; the frontier as a dashed step line."""
    from .equal_memory import equal_memory_points

    plots = []
    for (task, model), points in equal_memory_points(df, family_of).items():
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6.8, 4.4), layout="constrained")
        families = sorted({p.family for p in points})
        methods = sorted({p.method for p in points})
        colours = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
        for method in methods:
            mine = [p for p in points if p.method == method]
            for fam in families:
                pts = [p for p in mine if p.family == fam]
                if not pts:
                    continue
                x = np.array([p.kv_mb for p in pts])
                y = np.array([p.score for p in pts])
                err = [y - np.array([p.ci[0] for p in pts]), np.array([p.ci[1] for p in pts]) - y]
                ax.errorbar(x, y, yerr=err, fmt=MARKERS[families.index(fam) % len(MARKERS)], capsize=3,
                            color=colours[method], label=_text(f"{method} ({fam})"))
                for p in pts:
                    ax.annotate(p.size, (p.kv_mb, p.score), textcoords="offset points", xytext=(4, 3),
                                fontsize=6, color=colours[method])
        front = sorted((p for p in points if p.frontier), key=lambda p: p.kv_bytes)
        if front:
            ax.step([p.kv_mb for p in front], [p.score for p in front], where="post", color="black",
                    linestyle="--", linewidth=0.8, label="frontier")
        ax.set_xlabel("measured KV cache (MB, mean per turn)")
        ax.set_ylabel("score")
        ax.set_xlim(left=0)
        ax.set_title(f"equal memory: {_text(task)} — {_text(model)}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        stem = slug("equal_memory", task, model)
        _save(fig, out_dir, stem)
        plots.append(Plot("equal_memory", f"score vs measured KV memory: {task}, {model}", stem, task, model,
                          tuple(methods)))
    return plots


def all_plots(df: pd.DataFrame, out_dir: Path, family_of: dict[str, str] | None = None) -> list[Plot]:
    """Every plot the records support, written under ``out_dir``."""
    return (score_vs_ratio(df, out_dir) + needle_heatmaps(df, out_dir) + cost_vs_length(df, out_dir)
            + equal_memory(df, out_dir, family_of))
