"""Prefill once, compress many (issue #14): runs of one command that differ only in cache/decode
methods or ratio reuse one prefill per context, and every record equals the run made alone."""

import shutil
import subprocess
import sys

from lcbench.results import read_records

EXE = shutil.which("lcbench")
TASK = ["--model", "tiny-random-llama", "--task", "niah", "--task-args",
        "lengths=320;480,depths=25;75,haystack=filler,max_new_tokens=6", "--device", "cpu"]


def _run(out, *args):
    cmd = [EXE] if EXE else [sys.executable, "-m", "lcbench.cli"]
    proc = subprocess.run([*cmd, "run", *TASK, *args, "--output-path", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return {folder.name: read_records(folder) for folder in out.iterdir() if folder.is_dir()}, proc.stdout


def test_shared_prefill_records_equal_each_run_alone(tmp_path):
    methods = ["--method", "snapkv,streamingllm,kivi,h2o,truncate", "--ratio", "0.25,0.5"]
    shared, table = _run(tmp_path / "shared", *methods)
    alone, plain = _run(tmp_path / "alone", *methods, "--share-prefill", "off")
    assert "‡: prefill shared" in table and "‡" not in plain  # the table says whose peak memory is shared
    assert shared.keys() == alone.keys() and len(shared) == 10  # the run ids do not depend on sharing
    for name, records in shared.items():
        others = alone[name]
        assert [(r.sample_id, r.turn) for r in records] == [(r.sample_id, r.turn) for r in others]
        for a, b in zip(records, others):
            assert a.decoded_ids == b.decoded_ids and a.prediction == b.prediction, name
            for field in ("kv_bytes", "kv_bytes_full", "kept_tokens", "achieved_ratio", "decode_tokens",
                          "kv_bytes_end", "kept_tokens_end"):
                assert getattr(a.measured, field) == getattr(b.measured, field), (name, field)
            assert a.method_stats == b.method_stats and a.scores == b.scores, name
            assert b.measured.shared_prefill is None
            # truncate has a text stage (it changes the prefill): it never shares
            assert a.measured.shared_prefill is (None if "truncate" in name else True), name
            # the sharing runs' turns decode in one batch (engine/joint.py): 8 runs × 1 turn per step
            assert a.measured.batch_rows == (1 if "truncate" in name else 8), name
    # each shared run records the one measured prefill of a context
    snap = {r.sample_id: r.measured.prefill_s for r in shared[next(n for n in shared if "snapkv__r0.5" in n)]}
    kivi = {r.sample_id: r.measured.prefill_s for r in shared[next(n for n in shared if "kivi__r0.25" in n)]}
    assert snap == kivi


def test_share_prefill_is_validated(tmp_path):
    cmd = [EXE] if EXE else [sys.executable, "-m", "lcbench.cli"]
    proc = subprocess.run([*cmd, "run", *TASK, "--share-prefill", "lots", "--output-path", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--share-prefill lots" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())
