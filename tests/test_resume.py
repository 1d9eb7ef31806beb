"""A run killed with SIGKILL mid-way and re-run ends with exactly one record per turn and the
same summary as an uninterrupted run (a real subprocess, a real kill)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lcbench.results import read_records

ARGS = ["--model", "tiny-random-llama", "--method", "snapkv", "--ratio", "0.5", "--task", "niah",
        "--task-args", "lengths=400;600,depths=0;25;50;75;100,max_new_tokens=24", "--method-args", "window_size=8"]


def _cli(out: Path) -> list[str]:
    return [sys.executable, "-m", "lcbench.cli", "run", *ARGS, "--output-path", str(out)]


def _records(folder: Path) -> list[dict]:
    return read_records(folder)


def _strip_timing(summary: dict) -> dict:
    """Scores and sizes only: timings and memory differ between any two runs."""
    keep = ("score", "score_ci", "achieved_ratio", "kv_bytes", "kept_tokens", "n", "input_tokens")
    overall = {k: v for k, v in summary["overall"].items() if k in keep}
    return {"overall": overall, "aggregate": summary["aggregate"],
            "by_length": {k: {m: v[m] for m in keep if m in v} for k, v in summary["by_length"].items()}}


def test_sigkill_then_resume(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    folder = None
    while time.time() < deadline:
        runs = list(killed.glob("*/samples.jsonl"))
        if runs and len(runs[0].read_text().splitlines()) >= 3:
            folder = runs[0].parent
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert folder is not None, "the run wrote no records before the deadline"
    partial = len(_records(folder))
    assert 3 <= partial < 10, partial  # killed mid-way
    assert not (folder / "summary.json").exists()

    subprocess.run(_cli(killed), env=env, check=True, capture_output=True)
    records = _records(folder)
    keys = [(r["sample_id"], r["turn"]) for r in records]
    assert len(keys) == 10 and len(set(keys)) == 10

    clean = tmp_path / "clean"
    subprocess.run(_cli(clean), env=env, check=True, capture_output=True)
    clean_folder = next(clean.glob("*/summary.json")).parent
    assert clean_folder.name == folder.name  # same spec → same run id
    a = json.loads((folder / "summary.json").read_text())
    b = json.loads((clean_folder / "summary.json").read_text())
    assert _strip_timing(a) == _strip_timing(b)
    by_id = {(r["sample_id"], r["turn"]): r["prediction"] for r in _records(clean_folder)}
    assert {(r["sample_id"], r["turn"]): r["prediction"] for r in records} == by_id


def test_torn_last_line_is_dropped_on_resume(tmp_path):
    from lcbench.results.record import TurnRecord
    from lcbench.results.store import RunStore

    store = RunStore(tmp_path / "run")
    store.open({"run_id": "x"})
    store.append(TurnRecord(sample_id="a", turn=0, prediction="x"))
    with open(tmp_path / "run" / "samples.jsonl", "a") as f:
        f.write('{"sample_id": "b", "tu')  # a kill in the middle of a write
    RunStore(tmp_path / "run").open({"run_id": "x"})
    assert [(r.sample_id, r.turn, r.prediction) for r in store.records()] == [("a", 0, "x")]
    assert store.done_turns() == {"a": {0}}
