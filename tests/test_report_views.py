"""The report's views across runs: the ratio that keeps 95 % of full's score (interpolation and its
bootstrap interval), the equal-memory order, and the `lcbench run` command rebuilt from a stored
spec.json (exact string, and a real spawn that re-makes the same run)."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_report_fixtures import KV_BYTES_FULL, TINY_NIAH, write_run
from typer.testing import CliRunner

from lcbench.cli import app
from lcbench.report.equal_memory import equal_memory_points, families
from lcbench.report.frame import load_runs, records_frame
from lcbench.report.reproduce import run_command
from lcbench.report.retention import crossing, retention_table
from lcbench.results.store import RunStore

REPO = Path(__file__).resolve().parents[1]

# --- 95 % of full: interpolation -----------------------------------------------------------------


def test_crossing_interpolates_linearly_between_the_bracketing_ratios():
    expected = 0.5 + 0.25 * (0.97 - 0.95) / (0.97 - 0.9)  # ≈ 0.5714
    with_zero = crossing([(0.0, 1.0), (0.5, 0.97), (0.75, 0.9)], reference=1.0)
    assert with_zero.kind == "crossed" and with_zero.ratio == pytest.approx(expected) and with_zero.text() == "0.571"
    # without a run of the method at 0, full's score is the curve's value there: the same answer
    assert crossing([(0.75, 0.9), (0.5, 0.97)], reference=1.0).ratio == pytest.approx(expected)
    # the level is 95 % of full's score, not 0.95: full 0.8 → level 0.76
    half = crossing([(0.5, 0.78), (0.75, 0.74)], reference=0.8)
    assert half.ratio == pytest.approx(0.5 + 0.25 * (0.78 - 0.76) / (0.78 - 0.74))


def test_crossing_says_what_the_ratios_run_do_not_bracket():
    never = crossing([(0.5, 0.99), (0.75, 0.96)], reference=1.0)
    assert never.kind == "not_below" and math.isinf(never.ratio) and never.text() == "≥ 0.75 (largest ratio run)"
    early = crossing([(0.5, 0.5), (0.75, 0.4)], reference=1.0)
    assert early.kind == "before_first" and early.ratio == pytest.approx(0.5 * 0.05 / 0.5)
    assert early.text().startswith("not reached (< 0.5, the smallest ratio run")
    assert crossing([(0.5, 0.5)], reference=0.0).kind == "no_reference"  # 95 % of nothing is no level
    assert crossing([(0.5, 0.5)], reference=float("nan")).kind == "no_reference"
    dip = crossing([(0.25, 0.9), (0.5, 1.0)], reference=1.0)  # first crossing; the recovery is named
    assert dip.kind == "before_first" and dip.recovers_at == 0.5


def test_retention_table_on_constructed_runs_with_exact_values_and_intervals(tmp_path):
    write_run(tmp_path, [1.0] * 4, method="full", ratio=0.0)
    write_run(tmp_path, [0.97] * 4, method="snapkv", ratio=0.5)
    write_run(tmp_path, [0.9] * 4, method="snapkv", ratio=0.75)
    write_run(tmp_path, [1, 1, 1, 1], method="h2o", ratio=0.5)
    write_run(tmp_path, [1, 0, 1, 1], method="h2o", ratio=0.75)
    rows = {r.method: r for r in retention_table(records_frame(load_runs([tmp_path])))}
    assert sorted(rows) == ["h2o", "snapkv"]  # full is the reference, not a row
    snap = rows["snapkv"]
    assert snap.reference == 1.0 and snap.ratios == (0.5, 0.75) and snap.scores == pytest.approx((0.97, 0.9))
    assert snap.estimate.ratio == pytest.approx(0.5714285714)
    # every sample scores the same, so every resample gives the same crossing: a zero-width interval
    assert snap.interval == pytest.approx((0.5714285714, 0.5714285714))
    h2o = rows["h2o"]
    assert h2o.estimate.kind == "crossed" and h2o.estimate.ratio == pytest.approx(0.5 + 0.25 * 0.05 / 0.25)
    # resampling the 4 samples: r=0.75's mean is 1 when sample s1 is not drawn (p = 0.32 → the replicate never
    # falls below: +inf), 0.25 when s1 is drawn 3 times (the 2.5 % quantile: p(≤0.25) = 0.051, p(0) = 0.004)
    lo, hi = h2o.interval
    assert lo == pytest.approx(0.5 + 0.25 * 0.05 / 0.75) and math.isinf(hi)
    assert h2o.interval_text() == "[0.517, ≥0.75]"
    again = {r.method: r for r in retention_table(records_frame(load_runs([tmp_path])))}
    assert again["h2o"].interval == h2o.interval  # seeded


# --- equal memory --------------------------------------------------------------------------------


def test_equal_memory_orders_by_measured_bytes_then_score_and_marks_the_frontier(tmp_path):
    write_run(tmp_path, [1, 1, 1, 1], method="full", ratio=0.0)
    write_run(tmp_path, [1, 1, 0, 1], method="snapkv", ratio=0.5)  # 0.75 at half the bytes
    write_run(tmp_path, [1, 1, 0, 1], method="kivi", ratio=0.5, achieved=0.75)  # 0.75 at a quarter
    write_run(tmp_path, [1, 0, 0, 1], method="streamingllm", ratio=0.5)  # 0.5 at half
    write_run(tmp_path, [1, 0, 1, 1], method="snapkv+kivi", ratio=0.75, achieved=0.875)  # a chain, an eighth
    runs = load_runs([tmp_path])
    (points,) = equal_memory_points(records_frame(runs), families(runs)).values()
    order = [(p.method, p.kv_bytes, p.score, p.frontier) for p in points]
    assert order == [("snapkv+kivi", KV_BYTES_FULL // 8, 0.75, True),
                     ("kivi", KV_BYTES_FULL // 4, 0.75, False),  # same score with more bytes: dominated
                     ("snapkv", KV_BYTES_FULL // 2, 0.75, False),
                     ("streamingllm", KV_BYTES_FULL // 2, 0.5, False),  # equal bytes: higher score first
                     ("full", KV_BYTES_FULL, 1.0, True)]
    fam = {p.method: p.family for p in points}
    assert fam["kivi"] == "kv_quantization" and fam["snapkv"] == "kv_dropping"  # as the spec.json stored them
    assert fam["snapkv+kivi"] == "kv_dropping+kv_quantization" and fam["full"] == "baseline"
    assert points[0].kv_share == pytest.approx(0.125) and points[-1].kv_share == 1.0


def test_report_prints_and_writes_the_equal_memory_table_the_95_summary_and_compression_time(tmp_path):
    write_run(tmp_path / "runs", [1.0] * 4, method="full", ratio=0.0)
    write_run(tmp_path / "runs", [0.97] * 4, method="snapkv", ratio=0.5)
    write_run(tmp_path / "runs", [0.9] * 4, method="snapkv", ratio=0.75)
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "-o", str(out), "--no-plots"],
                                terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "score at equal KV memory" in result.output and "compression kept at 95% of full's score" in result.output
    assert "0.571" in result.output and "compress s" in result.output and "text s" in result.output
    memory = pd.read_csv(out / "equal_memory.csv")
    assert list(memory["method"]) == ["snapkv", "snapkv", "full"] and list(memory["ratio"]) == [0.75, 0.5, 0.0]
    spec = json.loads(next((tmp_path / "runs").glob("*snapkv__r0.75*/spec.json")).read_text())["spec"]
    assert memory.loc[0, "command"] == run_command(spec).text
    kept = pd.read_csv(out / "retention.csv")
    assert kept.loc[0, "method"] == "snapkv" and kept.loc[0, "kind"] == "crossed"
    assert kept.loc[0, "ratio_at_level"] == pytest.approx(0.5714285714)
    by_dataset = pd.read_csv(out / "by_dataset.csv")
    assert by_dataset["compress_s"].tolist() == pytest.approx([0.01] * 3) and by_dataset["text_s"].tolist() == [0.0] * 3
    assert "retention.md" in {p.name for p in out.iterdir()} and "equal_memory.tex" in {p.name for p in out.iterdir()}


# --- the reproduce command -----------------------------------------------------------------------

STORED = {  # the "spec" object of a spec.json, as lcbench wrote it for a two-component chain
    "model": "smollm2-135m-instruct",
    "model_args": {"dtype": "float32", "gguf_file": None, "revision": None, "trust_remote_code": False,
                   "local_files_only": False, "attn_implementation": "sdpa"},
    "method": [{"name": "snapkv", "ratio": 0.292893, "args": {"window_size": 64, "kernel_size": 5, "pooling": "avg"}},
               {"name": "kivi", "ratio": 0.292893, "args": {"bits": 2, "residual": 32}}],
    "ratio": 0.5, "task": "niah",
    "task_args": {"lengths": "500;1000", "depths": "0;50;100", "linspace": None, "needle": "passkey",
                  "haystack": "filler", "max_new_tokens": 16, "repeats": 1},
    "task_version": "1.0", "task_template_hash": "ebd91011be4d61e3", "limit": 6, "seed": 3, "device": "cpu",
    "dtype": "float32", "query_aware": True, "mode": "multi_request", "batch_size": 8,
    "output_path": "results/example", "prefill_chunk": None, "extra": {},
}


def test_reproduce_command_of_a_stored_spec_is_exact():
    command = run_command(STORED)
    assert command.exact
    assert command.text == (
        "lcbench run --model smollm2-135m-instruct "
        "--model-args trust_remote_code=false,local_files_only=false,attn_implementation=sdpa --dtype float32 "
        "--method snapkv+kivi --method-args snapkv.ratio=0.292893,snapkv.window_size=64,snapkv.kernel_size=5,"
        "snapkv.pooling=avg,kivi.ratio=0.292893,kivi.bits=2,kivi.residual=32 "
        "--task niah --task-args 'lengths=500;1000,depths=0;50;100,needle=passkey,haystack=filler,max_new_tokens=16,"
        "repeats=1' --ratio 0.5 --limit 6 --seed 3 --device cpu --query-aware --batch-size 8")
    single = dict(STORED, method=[{"name": "snapkv", "ratio": 0.5, "args": {"window_size": 64}}], query_aware=False,
                  batch_size="turns", limit=None)
    text = run_command(single).text
    assert "--method snapkv --method-args snapkv.window_size=64 " in text and "snapkv.ratio" not in text
    assert "--query-aware" not in text and "--batch-size" not in text and "--limit" not in text


def test_reproduce_command_falls_back_to_the_spec_replay_when_flags_cannot_carry_it():
    comma = dict(STORED, task_args={"haystack": "a,b"})
    assert run_command(comma, "run-x/spec.json").text == "lcbench run --spec run-x/spec.json"
    assert not run_command(comma).exact
    twice = dict(STORED, method=[STORED["method"][0], STORED["method"][0]])
    assert not run_command(twice).exact


def _lcbench() -> list[str]:
    script = shutil.which("lcbench")
    return [script] if script else [sys.executable, "-m", "lcbench.cli"]


def test_the_command_of_a_real_stored_run_remakes_the_same_run(tmp_path):
    """A chain with a non-default argument run in-process; its command, spawned as a user would
    type it, writes the same run id, the same resolved spec and the same answers."""
    import torch

    from lcbench.evaluate import ModelPool, build_spec, evaluate

    torch.set_num_threads(2)
    spec = build_spec(model="tiny-random-llama", method="snapkv+kivi", method_args="snapkv.window_size=8", ratio=0.5,
                      task="niah", task_args=TINY_NIAH + ",haystack=filler", limit=1, seed=1, device="cpu",
                      output_path=str(tmp_path / "first"))
    first = evaluate(spec, ModelPool()).folder
    stored = RunStore(first).spec()
    command = run_command(stored["spec"])
    assert command.exact and "snapkv.window_size=8" in command.text
    args = shlex.split(command.text)
    assert args[:2] == ["lcbench", "run"]
    # the spawned lcbench imports this checkout's package (what the in-process run used)
    env = dict(os.environ, OMP_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([*_lcbench(), *args[1:], "--output-path", str(tmp_path / "again")], capture_output=True,
                          text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (again,) = [p for p in (tmp_path / "again").iterdir() if p.is_dir()]
    assert again.name == first.name
    remade = RunStore(again).spec()
    assert remade["run_id"] == stored["run_id"]
    assert {k: v for k, v in remade["spec"].items() if k != "output_path"} == \
        {k: v for k, v in stored["spec"].items() if k != "output_path"}
    assert [r["prediction"] for r in RunStore(again).records()] == [r["prediction"] for r in RunStore(first).records()]
