"""``lcbench leaderboard``: a self-contained static site built from stored runs.

Pages: ``index.html`` (per task and model, methods ranked at fixed ratios; the equal-memory view,
score against measured KV bytes with every family on one axis; the ratio at which each method
keeps 95 % of full's score, with its interval; every run in one sortable, filterable table; the
plots), ``methods/<slug>.html`` (paper, parameters, all runs of
a method), ``runs/<slug>.html`` (the provenance of every number: resolved spec, library versions,
git revision, hardware, per-dataset/length/turn breakdowns and the records). Styles and the small
sort/filter script are inlined, so pages open from disk with no network. Templates are rendered by
jinja2 with autoescaping on and data embedded with ``|tojson`` (``<``, ``>``, ``&`` escaped), so no
string from results is read as HTML or script. Every number carries the one ``lcbench run``
command that reproduces it (:mod:`lcbench.report.reproduce`, built from the run's spec.json): as
the tooltip of its cell, in the run's table row and on its run page.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import jinja2
import numpy as np

import lcbench

from ..errors import UserError
from ..results.summary import summarize
from .equal_memory import MemoryPoint, equal_memory_points, families
from .frame import BATCH_MARK, Run, batch_note, load_runs, method_label, records_frame, scored_runs, task_labels
from .grouped import fmt_number
from .plots import Plot, all_plots, slug
from .reproduce import Command, run_command
from .retention import LEVEL, points_text, retention_table
from .throughput import REFERENCE_MARK, REFERENCE_NOTE, is_reference, throughput_points

MARKER = ".lcbench-leaderboard"
OWNED = ("index.html", "data.json", "methods", "runs", "plots")
MAX_RECORD_ROWS = 500


@dataclass
class RunView:
    """What the pages show of one run (numbers from :func:`summarize` of its records)."""

    run: Run
    slug: str
    method: str  # with "(qa)" when query-aware
    method_slug: str
    overall: dict[str, Any]
    summary: dict[str, Any]
    task: str = ""  # the task's name, plus the settings that set it apart (frame.task_labels)
    plots: list[Plot] = field(default_factory=list)

    @property
    def spec(self) -> dict[str, Any]:
        return self.run.spec

    @property
    def command(self) -> Command:
        """The ``lcbench run`` command that reproduces this run, from its stored spec."""
        return run_command(self.run.spec, f"{self.run.folder.name}/spec.json")

    @property
    def batched(self) -> bool:
        """Latency and memory were measured on batches of several samples (--batch-size N|auto)."""
        return (self.overall.get("batch_samples") or 1) > 1

    @property
    def reference(self) -> bool:
        """Its chain has a component whose latency is a reference implementation's (spec.json says)."""
        return is_reference(self.run)

    @property
    def score(self) -> float | None:
        """The suite's headline number (e.g. LongBench's mean of dataset scores), else the turn mean."""
        return (self.summary.get("suite") or {}).get("score", self.overall.get("score"))

    def cells(self) -> dict[str, Any]:
        """The numbers of a table row: (sort value, shown text) per column."""
        o = self.overall
        kv_mb = o["kv_bytes"] / 2**20 if o.get("kv_bytes") is not None else None
        suite = self.summary.get("suite") or {"score": o.get("score"), "ci": o.get("score_ci")}
        ci = suite.get("ci") or [np.nan, np.nan]
        mark = BATCH_MARK if self.batched else ""
        ref = REFERENCE_MARK if self.reference else ""  # a reference implementation's latency
        density = o.get("attention_density")
        return {
            "score": (suite.get("score"), _score_text(suite.get("score"), ci)),
            "achieved": (o.get("achieved_ratio"), fmt_number(o.get("achieved_ratio"), "achieved_ratio")),
            "kv_mb": (kv_mb, fmt_number(kv_mb)),
            "density": (density, fmt_number(density, "achieved_ratio") if density is not None else "–"),
            "ttft": (o.get("ttft_s"), fmt_number(o.get("ttft_s")) + mark + ref),
            "compress": (o.get("compress_s"), fmt_number(o.get("compress_s")) + ref),
            "text": (o.get("text_s"), fmt_number(o.get("text_s"))),
            "tok_s": (o.get("decode_tok_s"), fmt_number(o.get("decode_tok_s")) + mark + ref),
            "peak_mb": (o.get("peak_memory_mb"), fmt_number(o.get("peak_memory_mb")) + mark),
            "n": (o.get("n"), str(o.get("n", 0))),
        }


def _score_text(score, ci) -> str:
    if score is None:
        return "–"
    return f"{score:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _views(runs: list[Run]) -> list[RunView]:
    """Every run's numbers, recomputed from its records; the suite's score and aggregate are the
    stored summary's (computing them needs the task's own aggregation)."""
    views = []
    labels = task_labels(runs)
    for run in runs:
        label = method_label(run.method, bool(run.spec.get("query_aware")))
        summary = summarize(run.records, run.summary.get("aggregate"), run.summary.get("suite"))
        views.append(RunView(run, slug("run", run.run_id), label, slug("method", label), summary["overall"], summary,
                             labels[str(run.folder)]))
    return sorted(views, key=lambda v: (v.task, v.spec["model"], v.method != "full", v.method,
                                        float(v.spec["ratio"])))


def rankings(views: list[RunView], ratios: list[float] | None) -> list[dict[str, Any]]:
    """Per (task, model): methods ranked by mean score over the fixed ratios they all ran at.

    A method missing one of the ratios is listed unranked; ``full`` is the reference row."""
    sections = []
    keys = sorted({(v.task, v.spec["model"]) for v in views})
    for task, model in keys:
        group = [v for v in views if (v.task, v.spec["model"]) == (task, model)]
        fixed = ratios or sorted({float(v.spec["ratio"]) for v in group if float(v.spec["ratio"]) > 0})
        reference = [v for v in group if v.method == "full"]
        rows = []
        for method in sorted({v.method for v in group} - {"full"}):
            at = {float(v.spec["ratio"]): v for v in group if v.method == method}
            cells = [at.get(r) for r in fixed]
            scores = [c.score for c in cells if c is not None]
            complete = all(c is not None and c.score is not None for c in cells) and bool(cells)
            rows.append({"method": method, "method_slug": slug("method", method), "cells": cells,
                         "mean": float(np.mean(scores)) if complete else None, "complete": complete})
        lower = any(v.run.lower_is_better for v in group)  # a perplexity: the lowest mean ranks first
        ranked = sorted(rows, key=lambda r: (not r["complete"], (r["mean"] or 0.0) * (1 if lower else -1), r["method"]))
        rank, previous = 0, None
        for i, row in enumerate(ranked, 1):  # competition ranking: equal means share a rank
            if row["complete"] and row["mean"] != previous:
                rank, previous = i, row["mean"]
            row["rank"] = rank if row["complete"] else None
        sections.append({"task": task, "model": model, "ratios": fixed, "rows": ranked, "lower_is_better": lower,
                         "reference": reference[0] if reference else None, "anchor": slug("rank", task, model)})
    return sections


def memory_sections(df, views: list[RunView], family_of: dict[str, str], plots: list[Plot]) -> list[dict[str, Any]]:
    """Per (task, model): the equal-memory plot and its runs, each with its run view (page, command)."""
    by_id = {v.run.run_id: v for v in views}
    sections = []
    for (task, model), points in equal_memory_points(df, family_of).items():
        rows: list[tuple[MemoryPoint, RunView]] = [(p, by_id[p.run_id]) for p in points if p.run_id in by_id]
        plot = next((p for p in plots if p.kind == "equal_memory" and (p.task, p.model) == (task, model)), None)
        sections.append({"task": task, "model": model, "rows": rows, "plot": plot,
                         "anchor": slug("memory", task, model)})
    return sections


def retention_rows(df, views: list[RunView]) -> list[dict[str, Any]]:
    """The 95 % summary: each row with the views of the runs it was computed from (full's first)."""
    by_id = {v.run.run_id: v for v in views}
    out = []
    for r in retention_table(df):
        runs = [by_id[i] for i in ([r.reference_run] if r.reference_run else []) + list(r.run_ids) if i in by_id]
        out.append({"r": r, "points": points_text(r), "runs": runs, "method_slug": slug("method", r.method),
                    "value": {"no_reference": None, "not_below": r.estimate.largest}.get(r.estimate.kind, r.estimate.ratio)})
    return out


def method_info(label: str, runs: Iterable[Run]) -> list[dict[str, Any]]:
    """Family, paper, summary and declared parameters of each component of a method chain, as the
    runs stored them in their spec.json (reports never read the live registry); a component no
    run described is ``{"name", "registered": False}``."""
    name = label.removesuffix(" (qa)")
    stored: dict[str, dict[str, Any]] = {}
    for run in runs:
        for part in run.methods:
            if isinstance(part, dict) and part.get("registered") and part.get("name") not in stored:
                stored[part["name"]] = part
    return [stored.get(part, {"name": part, "registered": False}) for part in name.split("+")]


def _assets() -> dict[str, str]:
    """The inlined stylesheet and script, and the script's CSP hash (only that script may run)."""
    folder = Path(__file__).parent / "templates"
    script = (folder / "site.js").read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    return {"css": (folder / "site.css").read_text(encoding="utf-8"), "script": script,
            "script_hash": f"sha256-{digest}"}


def _finite(obj):
    """JSON-safe copy: NaN/inf become null (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = fmt_number
    env.filters["pretty_json"] = lambda obj: json.dumps(obj, indent=2, ensure_ascii=False, default=str)
    env.filters["compact_json"] = lambda obj: json.dumps(obj, ensure_ascii=False, default=str)
    return env


def _prepare(out: Path) -> None:
    """Create ``out`` or clear what an earlier build wrote there; never touch a foreign folder."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise UserError(f"'{out}' exists and was not written by `lcbench leaderboard`. Fix: pass an empty or new "
                        f"folder with -o (the command replaces its own earlier output only).")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in OWNED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        (out / MARKER).write_text("built by lcbench leaderboard; rebuilding replaces index.html, data.json, "
                                  "methods/, runs/, plots/\n")
    except OSError as exc:
        raise UserError(f"cannot write the leaderboard to '{out}': {exc.strerror or exc}. "
                        f"Fix: pass a writable -o.") from None


def _record_rows(run: Run) -> list[dict[str, Any]]:
    rows = []
    for rec in run.records[:MAX_RECORD_ROWS]:
        pred = str(rec.get("prediction", ""))
        rows.append({"sample_id": rec.get("sample_id"), "turn": rec.get("turn"), "score": rec.get("score"),
                     "achieved": rec.get("achieved_ratio"), "input_tokens": rec.get("input_tokens"),
                     "ttft": rec.get("ttft_s"), "prediction": pred[:300] + ("…" if len(pred) > 300 else ""),
                     "answers": " | ".join(map(str, rec.get("answers") or []))})
    return rows


def site_data(views: list[RunView]) -> list[dict[str, Any]]:
    """Machine-readable numbers of every run (embedded in index.html and written as data.json)."""
    return _finite([{"run_id": v.run.run_id, "task": v.spec["task"], "task_label": v.task, "model": v.spec["model"],
                     "method": v.method, "ratio": float(v.spec["ratio"]), "suite": v.summary.get("suite"),
                     "overall": v.overall, "command": v.command.text, "page": f"runs/{v.slug}.html"}
                    for v in views])


def build_leaderboard(run_dirs: Iterable[Path | str], out: Path, ratios: list[float] | None = None,
                      title: str = "lcbench leaderboard") -> Path:
    """Write the site under ``out``; returns ``out/index.html``."""
    every = load_runs(run_dirs)
    failed = [r for r in every if r.failed]
    runs = scored_runs(every)
    if not any(r.records for r in runs):
        raise UserError("the runs hold no records yet" + (f" ({len(failed)} failed)" if failed else "")
                        + ". Fix: let `lcbench run` finish before building the leaderboard.")
    out = Path(out)
    _prepare(out)
    views = _views(runs)
    df = records_frame(runs)
    family_of = families(runs)
    plots = all_plots(df, out / "plots", family_of)
    for v in views:
        v.plots = [p for p in plots if p.run_id == v.run.run_id]
    env = _environment()
    methods = sorted({v.method for v in views}, key=lambda m: (m != "full", m))
    batched = [v.overall["batch_samples"] for v in views if v.batched]
    common = {"title": title, "version": lcbench.__version__, "n_runs": len(views), **_assets(),
              "batch_note": batch_note(float(np.mean(batched))) if batched else "",
              "show_density": any(v.overall.get("attention_density") is not None for v in views),
              "reference_note": REFERENCE_NOTE if any(v.reference for v in views) else ""}
    throughput = throughput_points(runs)
    if not any(p.batch_size > 1 or p.rows > 1 for p in throughput):
        throughput = []  # nothing batched: the runs table already shows one-at-a-time latencies
    data = site_data(views)
    (out / "data.json").write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    index = env.get_template("index.html").render(
        **common, root="", sections=rankings(views, ratios), views=views, methods=methods, failed=failed,
        method_slugs={m: slug("method", m) for m in methods},
        overview_plots=[p for p in plots if p.kind in ("score_vs_ratio", "cost")], data=data,
        memory=memory_sections(df, views, family_of, plots), retention=retention_rows(df, views), level=LEVEL,
        throughput=throughput, run_pages={v.run.run_id: v.slug for v in views})
    (out / "index.html").write_text(index, encoding="utf-8")
    (out / "methods").mkdir()
    for method in methods:
        mine = [v for v in views if v.method == method]
        page = env.get_template("method.html").render(
            **common, root="../", method=method, info=method_info(method, [v.run for v in mine]), views=mine,
            plots=[p for v in mine for p in v.plots]
            + [p for p in plots if p.kind == "score_vs_ratio" and method in p.methods])
        (out / "methods" / f"{slug('method', method)}.html").write_text(page, encoding="utf-8")
    (out / "runs").mkdir()
    for v in views:
        page = env.get_template("run.html").render(
            **common, root="../", v=v, records=_record_rows(v.run), n_records=len(v.run.records),
            max_rows=MAX_RECORD_ROWS)
        (out / "runs" / f"{v.slug}.html").write_text(page, encoding="utf-8")
    return out / "index.html"
