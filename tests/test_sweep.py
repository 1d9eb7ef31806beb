"""``lcbench sweep``: a grid file becomes independent resumable runs, executed locally or as Ray
tasks (a local Ray instance), with a combined report at the end."""

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lcbench import run_together as together_mod
from lcbench.cli import app
from lcbench.errors import CompressionShortfall, UserError
from lcbench.sweep import expand, load_grid, run_local, run_ray

GRID = """
[grid]
model = ["tiny-random-llama"]
method = ["full", "snapkv"]
ratio = [0.25, 0.5]
task = ["niah"]

[run]
limit = 2
device = "cpu"
batch_size = 4

[method_args]
snapkv = "window_size=8"

[task_args]
niah = "lengths=320,depths=0;100,max_new_tokens=6"
"""


def _grid(tmp_path: Path, text: str = GRID) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return path


def _predictions(folder: Path) -> dict:
    lines = (Path(folder) / "samples.jsonl").read_text().splitlines()
    return {(r["sample_id"], r["turn"]): r["prediction"] for r in map(json.loads, lines)}


def test_grid_expands_to_distinct_resolved_runs(tmp_path):
    specs = expand(load_grid(_grid(tmp_path)), str(tmp_path / "out"))
    # full resolves to ratio 0 at both ratios: one run; snapkv: two
    assert sorted((s.method_name, s.ratio) for s in specs) == [("full", 0.0), ("snapkv", 0.25), ("snapkv", 0.5)]
    snap = next(s for s in specs if s.method_name == "snapkv")
    assert snap.method[0]["args"]["window_size"] == 8 and snap.limit == 2 and snap.batch_size == 4
    assert snap.task_args["lengths"] == "320" and snap.task_args["max_new_tokens"] == 6
    assert all(s.output_path == str((tmp_path / "out").resolve()) for s in specs)


@pytest.mark.parametrize("text,needle", [
    ("[grid]\nmethods = ['full']\n", "unknown axis ['methods']"),
    ("[grid]\nmethod = ['full']\n[run]\nlimitt = 2\n", "unknown key(s) ['limitt']"),
    ("[grid]\nmodel = ['x']\n", "names no method"),
    ("[grids]\n", "unknown section"),
    ("[grid\n", "not valid TOML"),
])
def test_bad_grid_files_name_the_fix(tmp_path, text, needle):
    with pytest.raises(UserError) as err:
        load_grid(_grid(tmp_path, text))
    assert needle in str(err.value)


def test_local_sweep_cli_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["sweep", str(_grid(tmp_path)), "--output-path", str(out)])
    assert result.exit_code == 0, result.output
    folders = sorted(p.parent for p in out.glob("*/summary.json"))
    assert len(folders) == 3
    csv = (out / "sweep-grid.csv").read_text().splitlines()
    assert len(csv) == 4 and csv[0].startswith("task,method,ratio")
    assert "lcbench sweep grid" in result.output
    assert (out / "sweep-grid" / "by_dataset.md").exists() and list((out / "sweep-grid" / "plots").glob("*.svg"))
    before = {f: (f / "samples.jsonl").read_text() for f in folders}
    again = runner.invoke(app, ["sweep", str(_grid(tmp_path)), "--output-path", str(out)])
    assert again.exit_code == 0
    assert {f: (f / "samples.jsonl").read_text() for f in folders} == before  # resumed: nothing re-run


def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path, monkeypatch):
    specs = expand(load_grid(_grid(tmp_path)), str(tmp_path / "out"))
    real = together_mod.evaluate  # (batch size 4: the runs do not run together, each goes through evaluate)

    def failing(spec, pool, progress=None):
        if spec.ratio == 0.5:
            raise CompressionShortfall("achieved 0.1 but 0.5 was requested")
        if spec.ratio == 0.0:
            raise RuntimeError("out of memory")  # not a user error: still reported, the others still run
        return real(spec, pool, progress=progress)

    monkeypatch.setattr(together_mod, "evaluate", failing)
    seen = []
    finished = run_local(specs, seen.append)
    assert len(seen) == 3 and [f.error is None for f in finished].count(True) == 1
    assert "0.5 was requested" in next(f.error for f in finished if f.spec.ratio == 0.5)
    assert next(f.error for f in finished if f.spec.ratio == 0.0) == "RuntimeError: out of memory"


def test_ray_executor_runs_each_spec_as_a_task(tmp_path):
    ray = pytest.importorskip("ray")
    # one sample at a time (a batched prefill of several samples shares nothing across runs)
    specs = [dataclasses.replace(s, batch_size="turns") for s in expand(load_grid(_grid(tmp_path)), str(tmp_path / "ray"))
             if s.ratio != 0.25]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        seen = []
        finished = run_ray(specs, seen.append, cpus_per_run=1)
    finally:
        ray.shutdown()
    assert len(seen) == 2 and all(f.error is None for f in finished), [f.error for f in finished]
    local = run_local([dataclasses.replace(s, output_path=str(tmp_path / "local")) for s in specs], lambda f: None)
    by_id = {f.spec.run_id: f.folder for f in local}
    for f in finished:
        assert (f.folder / "summary.json").exists()
        assert _predictions(f.folder) == _predictions(by_id[f.spec.run_id])  # same spec, same answers
        # grouped before dispatch: the two runs went to one task, which prefilled each context once
        records = [json.loads(line) for line in (f.folder / "samples.jsonl").read_text().splitlines()]
        assert all(r["measured"]["shared_prefill"] for r in records)


def test_runs_sharing_prefills_are_grouped_before_dispatch(tmp_path):
    from lcbench.evaluate import share_groups

    specs = expand(load_grid(_grid(tmp_path)), str(tmp_path / "out"))
    assert [len(g) for g in share_groups(specs)] == [3]  # full and snapkv at both ratios: one model, one task
    alone = [dataclasses.replace(s, share_prefill="off") for s in specs]
    assert [len(g) for g in share_groups(alone)] == [1, 1, 1]
    other = [specs[0], dataclasses.replace(specs[1], seed=1), specs[2]]  # other samples: another group
    assert sorted(len(g) for g in share_groups(other)) == [1, 2]
