"""``--budget N`` (issue #17): tokens kept per layer and KV head, the convention of the SnapKV,
PyramidKV and AdaKV tables, as an alternative to ``--ratio``; recorded and checked like the ratio."""

import json
import shutil
import subprocess
import sys

import pytest

from helpers import make_sample
from lcbench.results import read_records

EXE = shutil.which("lcbench")
TASK = ["--model", "tiny-random-llama", "--task", "niah", "--task-args",
        "lengths=320,depths=50,haystack=filler,max_new_tokens=6", "--device", "cpu"]
METHODS = "snapkv,pyramidkv,streamingllm,h2o,kvmerge,random"
SAME = ("prediction", "decoded_ids", "kept_tokens", "kv_bytes", "kv_bytes_full", "achieved_ratio", "input_tokens")


def _lcbench(*args, out=None):
    cmd = [EXE] if EXE else [sys.executable, "-m", "lcbench.cli"]
    extra = ["--output-path", str(out)] if out is not None else []
    return subprocess.run([*cmd, *args, *extra], capture_output=True, text=True, timeout=600)


def _runs(out):
    return {folder.name: (read_records(folder), json.loads((folder / "spec.json").read_text()))
            for folder in sorted(out.iterdir()) if folder.is_dir()}


def test_budget_and_ratio_runs_of_the_same_kept_size_give_identical_records(tmp_path):
    budget = 100
    proc = _lcbench("run", *TASK, "--method", METHODS, "--budget", str(budget), out=tmp_path / "budget")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    by_budget = _runs(tmp_path / "budget")
    assert len(by_budget) == 6 and all("__b100__" in name for name in by_budget)
    (records, spec), *_ = by_budget.values()
    held = records[0]["context_tokens"]  # the context the cache holds (one sample, no text stage)
    assert held > budget
    ratio = 1 - budget / held
    proc = _lcbench("run", *TASK, "--method", METHODS, "--ratio", repr(ratio), out=tmp_path / "ratio")
    assert proc.returncode == 0, proc.stderr
    by_ratio = {name.split("__")[1]: value for name, value in _runs(tmp_path / "ratio").items()}
    for name, (records, spec) in by_budget.items():
        method = name.split("__")[1]
        assert spec["spec"]["budget"] == budget and spec["spec"]["method"][0]["budget"] == budget
        same_size = by_ratio[method][0]
        assert len(records) == len(same_size) == 1
        for field in SAME:
            assert records[0][field] == same_size[0][field], (method, field)
        assert records[0]["kept_tokens"] == budget  # every layer and head holds exactly the budget
        assert records[0]["budget"] == budget and same_size[0]["budget"] is None
        assert records[0]["requested_ratio"] == pytest.approx(ratio)  # recorded like the ratio it stands for
        assert records[0]["achieved_ratio"] == pytest.approx(records[0]["requested_ratio"])


def test_a_budget_the_context_fits_in_keeps_everything(tmp_path):
    proc = _lcbench("run", *TASK, "--method", "full,snapkv", "--budget", "5000", out=tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = _runs(tmp_path)
    assert sorted(n.split("__")[1:3] for n in runs) == [["full", "r0"], ["snapkv", "b5000"]]  # full: one run
    first = {name.split("__")[1]: records[0] for name, (records, _) in runs.items()}
    full, snap = first["full"], first["snapkv"]
    assert snap["kv_bytes"] == full["kv_bytes"] and snap["achieved_ratio"] == 0.0
    assert snap["decoded_ids"] == full["decoded_ids"] and snap["requested_ratio"] == 0.0


def test_budget_run_replays_from_its_spec_and_the_report_shows_the_budget(tmp_path):
    proc = _lcbench("run", *TASK, "--method", "snapkv", "--budget", "64", out=tmp_path / "a")
    assert proc.returncode == 0, proc.stderr
    assert "budget" in proc.stdout  # the run table has a budget column when a run has one
    (folder,) = (tmp_path / "a").iterdir()
    payload = json.loads((folder / "spec.json").read_text())
    payload["spec"]["output_path"] = str(tmp_path / "b")  # --spec replays everything, the folder included
    (tmp_path / "spec.json").write_text(json.dumps(payload))
    replay = _lcbench("run", "--spec", str(tmp_path / "spec.json"))
    assert replay.returncode == 0, replay.stderr
    (again,) = (tmp_path / "b").iterdir()
    assert again.name == folder.name
    assert [r["decoded_ids"] for r in read_records(again)] == [r["decoded_ids"] for r in read_records(folder)]
    from lcbench.report.reproduce import run_command

    spec = json.loads((folder / "spec.json").read_text())["spec"]
    command = run_command(spec).text
    assert "--budget 64" in command and "--ratio" not in command


@pytest.mark.parametrize("args,needle", [
    (["--method", "snapkv", "--budget", "64", "--ratio", "0.5"], "both set how much the cache keeps"),
    (["--method", "kivi", "--budget", "64"], "'kivi' (kv_quantization) keeps no whole tokens"),
    (["--method", "think", "--budget", "64"], "'think'"),
    (["--method", "snapkv+streamingllm", "--budget", "64"], "streamingllm.ratio=0.5"),
    (["--method", "snapkv", "--budget", "0"], "whole number of tokens ≥ 1"),
    (["--method", "snapkv", "--budget", "many"], "whole number of tokens ≥ 1"),
])
def test_bad_budgets_exit_2_naming_the_fix(tmp_path, args, needle):
    proc = _lcbench("run", *TASK, *args, out=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Fix:" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir()) if tmp_path.exists() else True  # nothing written


def _engine(model, tok, method: str, budget: int, method_args: str | None = None, **cfg):
    from lcbench.engine.runner import Engine, EngineConfig
    from lcbench.methods.chain import Chain, resolve_chain

    return Engine(model, tok, Chain.build(resolve_chain(method, method_args, 0.0, budget)), EngineConfig(**cfg))


def test_a_sliding_window_layer_keeps_the_budget_of_what_it_can_still_see():
    """Gemma-2's alternating layers (window 24): a global layer keeps the budget, a window layer the
    tokens it holds when that is fewer; the requested ratio is measured against both."""
    from lcbench.engine.attach import use_lcbench_attention
    from lcbench.models.families import FAMILIES, WINDOW, build
    from lcbench.models.tiny import tiny_tokenizer

    (fam,) = [f for f in FAMILIES if f.name == "gemma2"]
    model, tok = build(fam, "eager"), tiny_tokenizer()
    use_lcbench_attention(model, "eager")
    budget = 40
    engine = _engine(model, tok, "snapkv", budget, "window_size=8")
    p = engine.prepare(make_sample(repeat=12))
    assert len(p.prompt.context_ids) > budget > WINDOW
    cache = engine.prefill([p.prompt.context_ids]).cache
    held = [layer.seq_len() for layer in cache.layers]
    windowed = [t == "sliding_attention" for t in model.config.layer_types]
    assert held == [min(budget, WINDOW - 1) if w else budget for w in windowed]
    measured = engine.measure(cache, p.context_tokens_original, len(p.prompt.context_ids))
    assert measured["achieved_ratio"] == pytest.approx(measured["requested_ratio"])
    engine.check(measured, {})  # within tolerance


def test_query_aware_budget_counts_the_question(tiny):
    """Query-aware mode: the question is kept, and counts against the budget (SnapKV's window)."""
    model, tok = tiny
    budget = 50
    sample = make_sample(repeat=12)
    (record,) = _engine(model, tok, "snapkv", budget, "window_size=8", query_aware=True).run(sample, False)
    assert record.measured.kept_tokens == budget and record.measured.budget == budget


def test_batched_rows_each_keep_the_budget_of_their_own_context(tiny):
    """Samples of different lengths prefilled together: each row keeps the budget, as alone."""
    from lcbench.engine.batching import run_batched

    model, tok = tiny
    samples = [make_sample(repeat=r, sid=f"s{r}") for r in (8, 12)]
    alone = [_engine(model, tok, "snapkv", 30, "window_size=8").run(s, False)[0] for s in samples]
    together = [r for _, recs in run_batched(_engine(model, tok, "snapkv", 30, "window_size=8"), samples, {}, 4)
                for r in recs]
    assert {r.sample_id: r.decoded_ids for r in together} == {r.sample_id: r.decoded_ids for r in alone}
    assert {r.sample_id: r.measured.kv_bytes for r in together} == {r.sample_id: r.measured.kv_bytes for r in alone}
    assert [r.measured.kept_tokens for r in together] == [30, 30]
    assert [r.measured.batch_samples for r in together] == [2, 2]


def test_a_sweep_grid_takes_a_budget_axis_but_not_with_a_ratio_axis(tmp_path):
    from lcbench.errors import UserError
    from lcbench.sweep import expand, load_grid

    grid = tmp_path / "grid.toml"
    grid.write_text('[grid]\nmodel = ["tiny-random-llama"]\nmethod = ["full", "snapkv"]\nbudget = [32, 64]\n'
                    'task = ["niah"]\n[run]\ndevice = "cpu"\n')
    specs = expand(load_grid(grid), str(tmp_path / "out"))
    assert sorted((s.method_name, s.budget) for s in specs) == [("full", None), ("snapkv", 32), ("snapkv", 64)]
    grid.write_text('[grid]\nmethod = ["snapkv"]\nbudget = [32]\nratio = [0.5]\n')
    with pytest.raises(UserError, match="both ratio and budget"):
        load_grid(grid)
    grid.write_text('[grid]\nmethod = ["snapkv"]\nbudget = [0.5]\n')
    with pytest.raises(UserError, match="whole numbers of tokens"):
        load_grid(grid)
