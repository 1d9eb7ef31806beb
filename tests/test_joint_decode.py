"""Runs that share a prefill decode their turns in one batch (engine/joint.py, issue #14): every
record equals the run's own alone — tokens, prediction, KV bytes at compression and at the end,
kept tokens — whatever each run's layers are (dense, quantized, evicting while decoding)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import engine_for
from helpers import make_sample

from lcbench.engine.joint import decode_together
from lcbench.engine.shared_prefill import PrefillMemo
from lcbench.results import read_records

METHODS = [("snapkv", 0.5, None), ("streamingllm", 0.5, None), ("kivi", 0.5, None), ("int8", 0.25, None),
           ("tova", 0.75, None), ("full", 0.0, None), ("h2o", 0.5, None),
           # evicts in the question pass too (after_question), then per head while decoding
           ("dms", 0.0, "mode=threshold,threshold=-5,sliding_window_size=16,decoding=true")]
FIELDS = ("kv_bytes", "kept_tokens", "achieved_ratio", "decode_tokens", "kv_bytes_end", "kept_tokens_end")


def _same(a, b) -> None:
    assert a.decoded_ids == b.decoded_ids and a.prediction == b.prediction and a.stopped_by == b.stopped_by
    for field in FIELDS:
        assert getattr(a.measured, field) == getattr(b.measured, field), field
    assert a.method_stats == b.method_stats


@pytest.mark.parametrize("turns", [1, 3])
def test_joint_decode_equals_each_run_alone(tiny, turns):
    model, tok = tiny
    samples = [make_sample(n_turns=turns, repeat=14, max_new_tokens=8, sid="a"),
               make_sample(n_turns=turns, repeat=9, max_new_tokens=5, sid="b")]
    # rows end at different steps: a finished row leaves its run's layer while the others go on
    samples = [dataclasses.replace(s, turns=[s.turns[0], *(dataclasses.replace(t, max_new_tokens=3 + k)
                                                          for k, t in enumerate(s.turns[1:]))]) for s in samples]
    alone = {}
    for name, ratio, args in METHODS:
        engine = engine_for(model, tok, name, ratio, args)
        alone[name] = [r for s in samples for r in engine.run(s, multi_turn=False)]
    engines = [engine_for(model, tok, name, ratio, args) for name, ratio, args in METHODS]
    chains = [e.chain for e in engines]
    needs = chains[0].needs
    for c in chains[1:]:
        needs = needs.merge(c.needs)
    memo = PrefillMemo(needs, None)
    for e in engines:
        e.prefill_memo = memo  # the shared prefill, as runs of one command get it
    together = {name: [] for name, _, _ in METHODS}
    for sample in samples:
        pendings = [e.ask(e.prepare(sample)) for e in engines]
        for (name, _, _), records in zip(METHODS, decode_together(pendings)):
            together[name] += records
    for name, _, _ in METHODS:
        assert len(together[name]) == len(alone[name]) == 2 * turns
        for a, b in zip(together[name], alone[name]):
            _same(a, b)
            assert a.measured.batch_rows == len(METHODS) * turns
    ends = {name: together[name][0].measured.kv_bytes_end for name, _, _ in METHODS}
    assert len(set(ends.values())) > 3  # the runs' layers really differ: each row's bytes are its own run's



def test_runs_asking_different_turns_prefill_their_questions_apart(tiny):
    """A run resumed at a later turn asks other questions than the rest of the group: its question
    parts are prefilled in their own batch (the others' in one batch, one shared time), and every
    row still decodes with the others and equals its run alone."""
    model, tok = tiny
    sample = make_sample(n_turns=3, repeat=12, max_new_tokens=6, sid="a")
    methods = METHODS[:3]
    skips = [set(), set(), {0}]  # the third run already wrote turn 0
    alone = [engine_for(model, tok, n, r, a).run(sample, multi_turn=False, skip_turns=skip)
             for (n, r, a), skip in zip(methods, skips)]
    engines = [engine_for(model, tok, n, r, a) for n, r, a in methods]
    memo = PrefillMemo(engines[0].chain.needs.merge(engines[1].chain.needs).merge(engines[2].chain.needs), None)
    for e in engines:
        e.prefill_memo = memo
    pendings = [e.ask(e.prepare(sample, skip_turns=skip)) for e, skip in zip(engines, skips)]
    together = decode_together(pendings)
    for got, want in zip(together, alone):
        assert [r.turn for r in got] == [r.turn for r in want]
        for a, b in zip(got, want):
            _same(a, b)
            assert a.measured.batch_rows == 8
    first, second, third = (records[0].measured.question_prefill_s for records in together)
    assert first == second != third  # the first two in one batch, the resumed run on its own

# --- runs side by side through the real CLI (lcbench/run_together.py) ------------------------------
EXE = shutil.which("lcbench")
TASK = ["--model", "tiny-random-llama", "--task", "niah", "--device", "cpu", "--task-args",
        "lengths=320;400,depths=0;25;50;75;100,haystack=filler,max_new_tokens=16"]


def _lcbench(*args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [EXE] if EXE else [sys.executable, "-m", "lcbench.cli"]
    return subprocess.run([*cmd, "run", *TASK, *args], capture_output=True, text=True, timeout=600, **kw)


def test_runs_side_by_side_resume_after_a_kill(tmp_path):
    """Killed (SIGKILL) while two runs go side by side, then re-run: each run ends with exactly one
    record per turn, equal to an uninterrupted run's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--method", "snapkv,streamingllm", "--ratio", "0.5"]
    cmd = [EXE] if EXE else [sys.executable, "-m", "lcbench.cli"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "run", *TASK, *args, "--output-path", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        lines = [len(f.read_text().splitlines()) for f in killed.glob("*/samples.jsonl")]
        if len(lines) == 2 and min(lines) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = {f.parent.name: len(read_records(f.parent)) for f in killed.glob("*/samples.jsonl")}
    assert len(partial) == 2 and all(3 <= n < 10 for n in partial.values()), partial
    again = _lcbench(*args, "--output-path", str(killed), env=env)
    assert again.returncode == 0, again.stderr
    clean = _lcbench(*args, "--output-path", str(tmp_path / "clean"), "--share-prefill", "off", env=env)
    assert clean.returncode == 0, clean.stderr
    for name in partial:
        resumed, alone = read_records(killed / name), read_records(tmp_path / "clean" / name)
        assert sorted((r.sample_id, r.turn) for r in resumed) == sorted((r.sample_id, r.turn) for r in alone)
        assert len(resumed) == 10
        alone_ids = {(r.sample_id, r.turn): r.decoded_ids for r in alone}
        assert {(r.sample_id, r.turn): r.decoded_ids for r in resumed} == alone_ids


def test_one_runs_shortfall_ends_it_and_the_others_go_on(tmp_path):
    """kivi cannot reach 0.95 (2 bits keep more than 5 %): that run fails, snapkv side by side with
    it still completes; the command exits 2 naming the failed run."""
    proc = _lcbench("--method", "snapkv,kivi", "--ratio", "0.95", "--output-path", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert "1 of 2 runs failed" in proc.stderr and "kivi" in proc.stderr and "Traceback" not in proc.stderr
    snap = next(tmp_path.glob("niah__snapkv__*"))
    assert len(read_records(snap)) == 10 and (snap / "summary.json").exists()
    kivi = next(tmp_path.glob("niah__kivi__*"))
    assert json.loads((kivi / "status.json").read_text())["state"] == "failed"


def test_the_warm_up_pass_runs_once_per_loaded_model(tmp_path, monkeypatch):
    """Runs of one command share the loaded model, so its untimed warm-up (device start-up) runs
    once, before the first run's first sample, not once per run."""
    from lcbench.engine.runner import Engine
    from lcbench.evaluate import ModelPool, build_spec, evaluate

    calls = []
    real = Engine.warm_up
    monkeypatch.setattr(Engine, "warm_up", lambda self, *a, **k: (calls.append(self.chain.name), real(self, *a, **k)))
    pool = ModelPool()
    for method in ("snapkv", "streamingllm"):
        spec = build_spec(model="tiny-random-llama", method=method, ratio=0.5, task="niah", device="cpu",
                          task_args="lengths=320,depths=50,haystack=filler,max_new_tokens=2", output_path=str(tmp_path))
        evaluate(spec, pool)
    assert calls == ["snapkv"]
