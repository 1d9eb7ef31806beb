"""The throughput view (lcbench/report/throughput.py): decode tok/s and samples/s of runs at batch
sizes 1…N from their records, the largest batch within a memory budget, and the table in
`lcbench report` (a real process over real tiny-model runs)."""

from __future__ import annotations

import csv
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from lcbench.report.frame import Run, load_runs
from lcbench.report.throughput import largest_batch, throughput_point, throughput_points

REPO = Path(__file__).resolve().parents[1]
NIAH = "lengths=300,depths=0;50;100,max_new_tokens=4,haystack=filler"


@functools.lru_cache(maxsize=None)
def batched_runs() -> Path:
    """Real runs of the tiny random Llama on 3 NIAH samples: full and kivi (ratio 0.5) at batch sizes 1 and 3,
    each batch size in its own output folder (a run's folder leaves --batch-size out of its hash)."""
    from lcbench.evaluate import ModelPool, build_spec, evaluate

    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="lcbench-throughput-runs-"))
    pool = ModelPool()
    for batch in ("turns", "3"):
        for method in ("full", "kivi"):
            spec = build_spec(model="tiny-random-llama", method=method, ratio=0.5, task="niah", task_args=NIAH,
                              device="cpu", batch_size=batch, share_prefill="off",
                              output_path=str(root / f"batch-{batch}"))
            evaluate(spec, pool)
    return root


def _run(records: list[dict], batch_size: str = "turns", method: str = "full", methods=None) -> Run:
    spec = {"task": "niah", "model": "m", "ratio": 0.0, "method": [{"name": method}], "batch_size": batch_size}
    return Run(Path("/nowhere"), f"id-{method}-{batch_size}", spec, {}, records, {},
               methods=methods or [{"name": method, "registered": True}])


def _rec(sample: str, tokens: int, decode_s: float, ttft_s: float, rows: int, samples: int, peak: float = 100.0):
    return {"sample_id": sample, "turn": 0, "decode_tokens": tokens, "decode_s": decode_s, "ttft_s": ttft_s,
            "batch_rows": rows, "batch_samples": samples, "peak_memory_mb": peak, "compress_s": 0.5, "text_s": 0.0}


def test_tokens_and_samples_per_second_from_batch_shares():
    # one batch of two rows: 10 + 6 tokens in the batch's 2 s of decode, after its 1 s of TTFT
    batched = throughput_point(_run([_rec("a", 10, 2.0, 1.0, 2, 2), _rec("b", 6, 2.0, 1.0, 2, 2)], "2"))
    assert batched.decode_tok_s == pytest.approx(16 / 2.0) and batched.samples_s == pytest.approx(2 / 3.0)
    assert (batched.batch, batched.rows, batched.samples, batched.decode_tokens) == (2, 2.0, 2, 16)
    # the same two samples one at a time: each its own decode and TTFT
    alone = throughput_point(_run([_rec("a", 10, 1.5, 1.0, 1, 1), _rec("b", 6, 1.0, 1.0, 1, 1)]))
    assert alone.decode_tok_s == pytest.approx(16 / 2.5) and alone.samples_s == pytest.approx(2 / 4.5)
    assert alone.batch == 1 and alone.compress_s == 0.5 and not alone.reference


def test_largest_batch_within_a_budget_stops_at_the_first_that_exceeds_it():
    runs = [_run([_rec(f"s{i}", 4, 1.0, 1.0, b, b, peak) for i in range(b)], str(b))
            for b, peak in ((1, 100.0), (2, 150.0), (4, 260.0), (8, 240.0))]  # 8 measured less: noise, not a fit
    points = throughput_points(runs)
    assert [p.batch for p in points] == [1, 2, 4, 8]
    assert largest_batch(points, 200.0) == {("full", 0.0): 2}
    assert largest_batch(points, 300.0) == {("full", 0.0): 8}
    assert largest_batch(points, 50.0) == {("full", 0.0): None}


def test_points_of_real_batched_runs_match_their_records():
    points = throughput_points(load_runs([batched_runs()]))
    assert sorted((p.method, p.batch) for p in points) == [("full", 1), ("full", 3), ("kivi", 1), ("kivi", 3)]
    for p in points:
        (run,) = [r for r in load_runs([batched_runs()]) if r.run_id == p.run_id and
                  max(x["batch_samples"] for x in r.records) == p.batch]
        assert p.decode_tokens == sum(r["decode_tokens"] for r in run.records) and p.samples == 3
        if p.batch == 3:  # one batch: every record holds the batch's decode time
            assert {r["batch_rows"] for r in run.records} == {3}
            assert p.decode_tok_s == pytest.approx(p.decode_tokens / run.records[0]["decode_s"])
        assert p.reference == (p.method == "kivi")  # kivi declares a reference-only latency


def test_report_prints_and_writes_the_throughput_table(tmp_path):
    exe = shutil.which("lcbench")
    cmd = [exe] if exe else [sys.executable, "-m", "lcbench.cli"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "250"}
    p = subprocess.run([*cmd, "report", str(batched_runs()), "-o", str(tmp_path), "--format", "csv", "--no-plots"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "throughput at batch size" in p.stdout
    rows = list(csv.DictReader((tmp_path / "throughput.csv").open()))
    assert sorted((r["method"], r["batch"]) for r in rows) == [("full", "1"), ("full", "3"), ("kivi", "1"), ("kivi", "3")]
    assert {r["method"]: r["reference_latency"] for r in rows} == {"full": "False", "kivi": "True"}
    assert all(float(r["decode_tok_s"]) > 0 and float(r["samples_s"]) > 0 and float(r["peak_memory_mb"]) > 0
               for r in rows)
    # compress s and text s have their own columns in the run table and in the throughput table
    assert "compress s" in p.stdout and "text s" in p.stdout and {"compress_s", "text_s"} <= set(rows[0])
