"""The typed, versioned turn record (issue #13): measured fields, method stats and scores in
separate namespaces; decoded ids kept; schema-2 lines written, flat version-1 lines still read."""

import json
import shutil
import subprocess
import sys

import pytest

from lcbench.engine.runner import Engine
from lcbench.errors import UserError
from lcbench.methods.base import Stage
from lcbench.methods.chain import Chain
from lcbench.results import Measured, RunStore, TurnRecord, read_records
from tests.helpers import make_sample


class Boasting(Stage):
    """A cache stage whose stats and the task's scores try to take measured names."""

    name, family = "boasting_test", "kv_dropping"

    def compress_layer(self, layer, seen):
        return layer

    def sample_stats(self):
        return {"achieved_ratio": 0.99, "kv_bytes": 1, "boast_calls": 1.0}


def test_a_method_stat_cannot_overwrite_what_the_engine_measured(tiny):
    model, tok = tiny
    engine = Engine(model, tok, Chain([Boasting(0.0)], 0.0))
    (record,) = engine.run(make_sample(1, max_new_tokens=4), False)
    assert record.measured.achieved_ratio == pytest.approx(0.0, abs=1e-9)  # nothing was dropped
    assert record.measured.kv_bytes == record.measured.kv_bytes_full > 1
    assert record.method_stats == {"achieved_ratio": 0.99, "kv_bytes": 1, "boast_calls": 1.0}
    flat = record.scored({"score": 1.0, "kv_bytes": 7}).flat()
    assert flat["achieved_ratio"] == record.measured.achieved_ratio and flat["kv_bytes"] == record.measured.kv_bytes
    assert flat["method_stats.achieved_ratio"] == 0.99 and flat["method_stats.kv_bytes"] == 1
    assert flat["scores.kv_bytes"] == 7 and flat["score"] == 1.0 and flat["boast_calls"] == 1.0


def test_schema_two_round_trips_and_version_one_lines_are_read(tmp_path):
    record = TurnRecord(sample_id="s0", turn=1, prediction="Paris", answers=["Paris"], decoded_ids=[5, 6],
                        measured=Measured(kv_bytes=10, kv_bytes_full=40, achieved_ratio=0.75, timings={"x_s": 0.5}),
                        method_stats={"attention_density": 0.2}, scores={"score": 1.0}, run_id="r")
    line = json.loads(json.dumps(record.to_json()))
    assert line["schema"] == 2 and line["measured"]["kv_bytes"] == 10 and line["scores"] == {"score": 1.0}
    assert TurnRecord.from_json(line) == record
    old = {"sample_id": "a", "turn": 0, "prediction": "p", "kv_bytes": 5, "achieved_ratio": 0.5, "score": 0.25,
           "attention_density": 0.1, "prefill_s": 0.2, "meta": {"dataset": "d"}}
    read = TurnRecord.from_json(old)
    assert read.measured.kv_bytes == 5 and read.measured.prefill_s == 0.2 and read.decoded_ids is None
    assert read.scores == {"score": 0.25, "attention_density": 0.1}  # v1 did not separate stats from scores
    assert {k: read[k] for k in old} == old  # the flat view of a v1 line is the line


def test_a_newer_schema_is_refused_naming_the_line(tmp_path):
    store = RunStore(tmp_path / "run")
    store.open({"run_id": "x"})
    store.append(TurnRecord(sample_id="a", turn=0, prediction="x"))
    with open(tmp_path / "run" / "samples.jsonl", "a") as f:
        f.write(json.dumps({"schema": 3, "sample_id": "b", "turn": 0}) + "\n")
    with pytest.raises(UserError, match=r"line 2: record schema 3 is newer"):
        store.records()


def test_the_cli_writes_schema_two_with_decoded_ids(tmp_path):
    exe = shutil.which("lcbench")
    cmd = [exe] if exe else [sys.executable, "-m", "lcbench.cli"]
    proc = subprocess.run([*cmd, "run", "--model", "tiny-random-llama", "--method", "snapkv", "--method-args",
                           "window_size=8", "--ratio", "0.5", "--task", "niah", "--task-args",
                           "lengths=300,depths=50,haystack=filler,max_new_tokens=6", "--device", "cpu",
                           "--output-path", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (raw,) = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    assert raw["schema"] == 2 and set(raw["measured"]) >= {"kv_bytes", "achieved_ratio", "ttft_s"}
    assert "score" in raw["scores"] and "kv_bytes" not in raw and "score" not in raw
    (record,) = read_records(folder)
    assert len(record.decoded_ids) == record.measured.decode_tokens > 0
    from lcbench.models.tiny import tiny_tokenizer

    text = tiny_tokenizer().decode(record.decoded_ids, skip_special_tokens=True)
    assert text == record.prediction if record.stopped_by != "stop" else text.startswith(record.prediction)
