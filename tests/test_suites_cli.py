"""Every suite end to end through the `lcbench run` command with the tiny model: samples built,
decoded, scored, summarized with the suite's own headline score, and shown in the table."""

import json
import sys
from pathlib import Path

import pytest

from lcbench import cli
from lcbench.results import read_records

TESTS = Path(__file__).resolve().parent
SHARED = TESTS.parents[1] / "shared" / "data"

SUITES = [
    ("longbench", "datasets=trec;samsum;passage_retrieval_zh,n_per_dataset=2,max_length=300", TESTS / "fixtures" / "longbench"),
    ("longbench_e", "datasets=trec;hotpotqa,n_per_dataset=2,max_length=300", TESTS / "fixtures" / "longbench"),
    ("minilongbench", "datasets=trec;lcc,n_per_dataset=1,max_length=300", SHARED / "minilongbench"),
    ("ruler", f"tasks=niah_single_1;fwe;qa_1,lengths=600,num_samples=1,haystack={SHARED / 'ruler' / 'PaulGrahamEssays.json'},"
              f"squad={TESTS / 'fixtures' / 'ruler' / 'squad_dev_tiny.json'}", None),
    ("niah", "lengths=300,depths=0;100,max_new_tokens=4", None),
    ("scbench", "tasks=kv;qa_eng,max_turns=2,max_seq_length=600,num_samples=1", TESTS / "fixtures" / "scbench"),
    ("scbench_vt_synth", "length=700,num_samples=1,num_turns=2,mode=multi_request", None),
]


@pytest.mark.parametrize("task,task_args,data_dir", SUITES, ids=[s[0] for s in SUITES])
def test_suite_runs_through_the_cli(task, task_args, data_dir, tmp_path, monkeypatch, capsys):
    if not SHARED.exists() or (data_dir is not None and not data_dir.exists()):
        pytest.skip("../shared/data is not beside the repository")
    argv = ["lcbench", "run", "--model", "tiny-random-llama", "--device", "cpu", "--method", "snapkv",
            "--method-args", "window_size=8", "--ratio", "0.5", "--task", task, "--task-args", task_args,
            "--output-path", str(tmp_path)]
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("COLUMNS", "250")
    cli.main()
    out = capsys.readouterr().out
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    records = read_records(folder)
    summary = json.loads((folder / "summary.json").read_text())
    spec = json.loads((folder / "spec.json").read_text())["spec"]
    assert records and all(r["score"] is not None for r in records)
    assert all(abs(r["achieved_ratio"] - 0.5) < 0.06 for r in records)
    assert spec["task_version"] and spec["task_template_hash"]
    suite = summary["suite"]
    assert suite["score"] == pytest.approx(summary["aggregate"]["score"])
    assert suite["ci"][0] <= suite["score"] <= suite["ci"][1]
    assert f"{suite['score']:.2f} [" in out  # the table shows the suite's own number
