"""A perplexity (a log-likelihood task's score) is better when lower: the run table says so, the
leaderboard ranks the lowest mean first, the equal-memory frontier flips, and the 95 % retention
view leaves such tasks out rather than claim a retention it cannot define."""

import io

from rich.console import Console

from lcbench.evaluate import ModelPool, build_spec, evaluate
from lcbench.report import leaderboard
from lcbench.report.equal_memory import equal_memory_points
from lcbench.report.frame import load_runs, records_frame
from lcbench.report.retention import retention_table
from lcbench.report.table import render_table, run_rows


def _runs(tmp_path, shared_data):
    pool = ModelPool()
    folders = []
    for method, ratio in (("full", 0.0), ("snapkv", 0.5), ("streamingllm", 0.5), ("random", 0.5)):
        spec = build_spec(model="tiny-random-llama", method=method, ratio=ratio, task="perplexity",
                          task_args=f"length=300,prefix=150,bucket=150,data_dir={shared_data}", limit=1,
                          device="cpu", output_path=str(tmp_path))
        folders.append(evaluate(spec, pool).folder)
    return folders


def test_perplexity_runs_are_ranked_and_framed_lower_is_better(tmp_path, shared_data):
    folders = _runs(tmp_path, shared_data)
    runs = load_runs(folders)
    assert all(r.lower_is_better for r in runs)
    out = io.StringIO()
    render_table(run_rows(folders), Console(file=out, width=300))
    assert "the score is a perplexity — lower is better" in out.getvalue()

    views = leaderboard._views(runs)
    (section,) = leaderboard.rankings(views, None)
    means = [row["mean"] for row in section["rows"]]
    assert section["lower_is_better"] and means == sorted(means)  # the lowest perplexity ranks first
    assert section["rows"][0]["rank"] == 1

    df = records_frame(runs)
    assert retention_table(df) == []  # no "keeps 95 % of full's score" for a perplexity
    (points,) = equal_memory_points(df).values()
    full = next(p for p in points if p.method == "full")
    for p in points:  # no compressed run at fewer bytes and a lower perplexity dominates another
        if p.frontier:
            assert not any(q.kv_bytes <= p.kv_bytes and q.score < p.score for q in points if q is not p)
    best_small = min((p for p in points if p.method != "full"), key=lambda p: (p.score, p.kv_bytes))
    assert best_small.frontier  # the lowest perplexity among the compressed runs is on the frontier
    assert full.frontier == all(full.score < p.score for p in points if p is not full)
