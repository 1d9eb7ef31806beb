"""Throughput and latency views of stored runs (issue #17 "throughput mode", issue #14 "reference-only
latencies").

* **Throughput** (:func:`throughput_points`, :func:`throughput_grouped`): per run, the decode tokens
  per second and the end-to-end samples per second of its batches (``--batch-size N``), with peak
  memory, compression time and text-stage time, so runs of one method at batch sizes 1…N sit side
  by side. The batch is what the records measured (``batch_samples``: samples that shared a prefill;
  a run's folder is its spec's hash, which leaves ``--batch-size`` out, so give each batch size its own
  ``--output-path`` or a later command resumes the earlier records). Each record of a batched run holds its batch's times (``decode_s``, ``ttft_s``) and how
  many decode rows shared them (``batch_rows``), so a record's share of its batch's time is
  ``time / batch_rows`` and the run's time is the sum of those shares: decode tok/s = Σ decode
  tokens / Σ ``decode_s / batch_rows``; samples/s = samples / Σ ``(ttft_s + decode_s) / batch_rows``.
  Model loading and the task's sample generation are outside both.
* **Largest batch within a memory budget** (:func:`largest_batch`): from runs at increasing batch
  sizes, the largest whose measured peak memory stays within the budget — measured by running, never
  estimated (``benchmarks/throughput.py`` runs until the budget is exceeded).
* **Reference-only latencies** (:func:`reference_components`): a method whose class sets
  ``reference_latency`` (:class:`lcbench.methods.base.Stage`; spec.json's ``methods`` records it) has
  latencies of a reference implementation; tables and the leaderboard mark them with § and say why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import pandas as pd

from .frame import Run, method_label

REFERENCE_MARK = " §"
REFERENCE_NOTE = ("§: a reference implementation's latency (the method declares it: Python loops or a dense stand-in "
                  "for its kernel), shown for completeness — do not rank methods on it; its score, KV bytes and "
                  "memory are measured as for any run.")
# the report table's latency columns a reference implementation makes unrepresentative
LATENCY_COLUMNS = ("ttft_s", "compress_s", "decode_tok_s")


def reference_components(methods: Iterable[dict[str, Any]]) -> list[str]:
    """Names of the chain's components whose latency is reference-only, from spec.json's ``methods``."""
    return [str(m.get("name")) for m in methods if isinstance(m, dict) and m.get("reference_latency")]


def is_reference(run: Run) -> bool:
    return bool(reference_components(run.methods))


@dataclass(frozen=True)
class ThroughputPoint:
    """One run's throughput: its batch setting and what its records measured."""

    run_id: str
    task: str
    model: str
    method: str
    ratio: float
    batch: int  # the most samples that shared a prefill (measured: batch_samples; --batch-size N asks for N)
    rows: float  # mean decode rows that shared a record's decode (measured: batch_rows)
    samples: int
    decode_tokens: int
    decode_tok_s: float | None
    samples_s: float | None
    peak_memory_mb: float | None
    compress_s: float | None  # mean per record (a batch's, in a batched run)
    text_s: float | None
    reference: bool

    @property
    def batch_size(self) -> int:
        return self.batch


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _mean(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def throughput_point(run: Run) -> ThroughputPoint | None:
    """The run's throughput from its records (None for a run without records)."""
    recs = list(run.records)
    if not recs:
        return None
    decode_share = e2e_share = 0.0
    tokens = 0
    for r in recs:
        rows = max(1, int(r.get("batch_rows") or 1))
        decode = _num(r.get("decode_s")) or 0.0
        decode_share += decode / rows
        e2e_share += ((_num(r.get("ttft_s")) or 0.0) + decode) / rows
        tokens += int(r.get("decode_tokens") or 0)
    samples = len({r.get("sample_id") for r in recs})
    peaks = [p for p in (_num(r.get("peak_memory_mb")) for r in recs) if p is not None]
    s = run.spec
    return ThroughputPoint(
        run_id=run.run_id, task=s["task"], model=s["model"],
        method=method_label(run.method, bool(s.get("query_aware"))), ratio=float(s["ratio"]),
        batch=max(max(1, int(r.get("batch_samples") or 1)) for r in recs), rows=sum(max(1, int(r.get("batch_rows") or 1)) for r in recs) / len(recs),
        samples=samples, decode_tokens=tokens, decode_tok_s=tokens / decode_share if decode_share > 0 else None,
        samples_s=samples / e2e_share if e2e_share > 0 else None, peak_memory_mb=max(peaks) if peaks else None,
        compress_s=_mean([_num(r.get("compress_s")) for r in recs]), text_s=_mean([_num(r.get("text_s")) for r in recs]),
        reference=is_reference(run))


def throughput_points(runs: Iterable[Run]) -> list[ThroughputPoint]:
    points = [p for p in (throughput_point(r) for r in runs if not r.failed) if p is not None]
    return sorted(points, key=lambda p: (p.task, p.model, p.method != "full", p.method, p.ratio, p.batch_size))


def largest_batch(points: Iterable[ThroughputPoint], budget_mb: float) -> dict[tuple[str, float], int | None]:
    """Per (method, ratio): the largest batch size whose measured peak memory is within ``budget_mb``
    (None when even the smallest run exceeded it). Batches above the first one that exceeded the
    budget do not count, so a noisy smaller peak further up cannot claim a batch that did not fit."""
    out: dict[tuple[str, float], int | None] = {}
    by: dict[tuple[str, float], list[ThroughputPoint]] = {}
    for p in points:
        by.setdefault((p.method, p.ratio), []).append(p)
    for key, ps in by.items():
        best = None
        for p in sorted(ps, key=lambda q: q.batch_size):
            if p.peak_memory_mb is None or p.peak_memory_mb > budget_mb:
                break
            best = p.batch_size
        out[key] = best
    return out


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"


def throughput_frames(points: list[ThroughputPoint]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(numeric, display) frames of the points; display marks reference-only latencies with §."""
    numeric, display = [], []
    for p in points:
        mark = REFERENCE_MARK if p.reference else ""
        numeric.append({"task": p.task, "model": p.model, "method": p.method, "ratio": p.ratio, "batch": p.batch,
                        "rows": p.rows, "samples": p.samples, "decode_tokens": p.decode_tokens,
                        "decode_tok_s": p.decode_tok_s, "samples_s": p.samples_s, "peak_memory_mb": p.peak_memory_mb,
                        "compress_s": p.compress_s, "text_s": p.text_s, "reference_latency": p.reference,
                        "run_id": p.run_id})
        display.append({"task": p.task, "model": p.model, "method": p.method, "ratio": f"{p.ratio:g}",
                        "batch": str(p.batch), "rows": _fmt(p.rows), "samples": str(p.samples),
                        "decode tok/s": _fmt(p.decode_tok_s) + mark, "samples/s": _fmt(p.samples_s) + mark,
                        "peak MB": _fmt(p.peak_memory_mb), "compress s": _fmt(p.compress_s) + mark,
                        "text s": _fmt(p.text_s)})
    return pd.DataFrame(numeric), pd.DataFrame(display)


THROUGHPUT_NOTE = ("decode tok/s: Σ decode tokens / Σ each record's share of its batch's decode time (decode_s / "
                   "batch_rows); samples/s: samples / Σ each record's share of its batch's TTFT + decode (model loading "
                   "excluded); peak MB: the largest peak any record of the run measured; compress s and text s: mean "
                   "per record (in a batched run, the batch's).")


def throughput_grouped(runs: Iterable[Run]):
    """The report's throughput table (a :class:`~lcbench.report.grouped.GroupedTable`), or None when
    no run was batched (the run table already shows one-at-a-time latencies)."""
    from .grouped import GroupedTable

    points = throughput_points(runs)
    if not any(p.batch_size > 1 or p.rows > 1 for p in points):
        return None
    numeric, display = throughput_frames(points)
    note = THROUGHPUT_NOTE + (" " + REFERENCE_NOTE if any(p.reference for p in points) else "")
    return GroupedTable("throughput", "throughput at batch size", numeric, display, note)
