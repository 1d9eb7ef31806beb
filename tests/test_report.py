"""`lcbench report`: grouped tables with bootstrap CIs, CSV/Markdown/LaTeX files, plots."""

from __future__ import annotations

import pandas as pd
import pytest
from rich.console import Console
from test_report_fixtures import KV_BYTES_FULL, tiny_runs, write_run
from typer.testing import CliRunner

from lcbench.cli import app
from lcbench.errors import UserError
from lcbench.report.export import to_latex, to_markdown
from lcbench.report.frame import load_runs, records_frame
from lcbench.report.grouped import grouped_table, report_tables
from lcbench.report.plots import needle_grid, score_vs_ratio
from lcbench.results.summary import bootstrap_ci


@pytest.fixture()
def runs(tmp_path):
    """full (r=0) and snapkv at 0.5 and 0.75 on two datasets of one task, lengths 500 and 1000."""
    metas = [{"dataset": "qa", "length": 500, "length_bucket": 500, "depth": 0.0},
             {"dataset": "qa", "length": 1000, "length_bucket": 1000, "depth": 50.0},
             {"dataset": "sum", "length": 500, "length_bucket": 500, "depth": 100.0},
             {"dataset": "sum", "length": 1000, "length_bucket": 1000, "depth": 0.0}]
    write_run(tmp_path, [1, 1, 1, 0], method="full", ratio=0.0, task="lb", metas=metas)
    write_run(tmp_path, [1, 0, 0, 0], method="snapkv", ratio=0.5, task="lb", metas=metas)
    write_run(tmp_path, [0, 0, 1, 1], method="snapkv", ratio=0.75, achieved=0.74, task="lb", metas=metas)
    return tmp_path


def test_dataset_table_rows_method_by_ratio_with_exact_means_and_cis(runs):
    df = records_frame(load_runs([runs]))
    table = grouped_table(df, "dataset")
    num = table.numeric.set_index(["method", "ratio"])
    assert list(num.index) == [("full", 0.0), ("snapkv", 0.5), ("snapkv", 0.75)]  # full first, ratios ascending
    assert num.loc[("full", 0.0), "qa score"] == 1.0 and num.loc[("full", 0.0), "sum score"] == 0.5
    assert num.loc[("snapkv", 0.5), "qa score"] == 0.5 and num.loc[("snapkv", 0.75), "sum score"] == 1.0
    lo, hi = bootstrap_ci([1, 0])
    assert (num.loc[("snapkv", 0.5), "qa ci_lo"], num.loc[("snapkv", 0.5), "qa ci_hi"]) == (lo, hi)
    assert num.loc[("snapkv", 0.5), "qa n"] == 2
    assert num.loc[("snapkv", 0.75), "achieved_ratio"] == pytest.approx(0.74)
    assert num.loc[("snapkv", 0.5), "kv_mb"] == pytest.approx(KV_BYTES_FULL * 0.5 / 2**20)
    disp = table.display.set_index(["method", "ratio"])
    assert disp.loc[("snapkv", "0.5"), "qa"] == f"0.50 [{lo:.2f}, {hi:.2f}]"
    assert "peak RSS MB (CPU)" in table.display.columns  # memory kind labelled


def test_length_columns_in_natural_order_and_turn_table_for_multi_turn(tmp_path):
    metas = [{"length_bucket": b} for b in (1000, 500, 1000, 500)]
    write_run(tmp_path, [1, 0, 0, 1], turns=[0, 0, 1, 1], sample_ids=["a", "b", "a", "b"], metas=metas)
    df = records_frame(load_runs([tmp_path]))
    by_len = grouped_table(df, "length")
    assert [c for c in by_len.display.columns if c.endswith("tok")] == ["500 tok", "1000 tok"]
    assert by_len.numeric.loc[0, "500 tok score"] == 0.5
    by_turn = grouped_table(df, "turn")
    assert by_turn.numeric.loc[0, "turn 0 score"] == 0.5 and by_turn.numeric.loc[0, "turn 1 score"] == 0.5
    assert [t.name for t in report_tables(df)] == ["by_dataset", "by_length", "by_turn"]
    single = records_frame(load_runs([write_run(tmp_path / "one", [1.0])]))
    assert [t.name for t in report_tables(single)] == ["by_dataset", "by_length"]  # one turn: no turn table


def test_markdown_and_latex_escape_cells():
    df = pd.DataFrame({"method": ["a|b", "x_y & 50%"], "score": ["1", "2"]})
    md = to_markdown(df)
    assert "a\\|b" in md and md.splitlines()[1] == "|---|---:|"
    tex = to_latex(df, "scores_% table")
    assert r"x\_y \& 50\%" in tex and r"\caption{scores\_\% table}" in tex and r"\toprule" in tex


def test_report_cli_writes_tables_and_plots(runs, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(runs), "-o", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "score per task/dataset" in result.output and "snapkv" in result.output
    for name in ("by_dataset", "by_length"):
        for ext in ("csv", "md", "tex"):
            assert (out / f"{name}.{ext}").stat().st_size > 0
    csv = pd.read_csv(out / "by_dataset.csv")
    assert csv.loc[csv["ratio"] == 0.5, "qa score"].item() == 0.5
    pngs, svgs = sorted((out / "plots").glob("*.png")), sorted((out / "plots").glob("*.svg"))
    assert len(pngs) == len(svgs) == 1 + 3 + 1 + 1  # score vs ratio, a heatmap per run, latency/memory, equal memory
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert len(pd.read_csv(out / "records.csv")) == 12


def test_plots_are_reproducible_and_heatmap_grid_is_depth_by_length(runs, tmp_path):
    df = records_frame(load_runs([runs]))
    first, second = score_vs_ratio(df, tmp_path / "a"), score_vs_ratio(df, tmp_path / "b")
    assert [p.methods for p in first] == [("full", "snapkv")]
    svg = (tmp_path / "a" / first[0].path("svg")).read_bytes()
    assert svg == (tmp_path / "b" / second[0].path("svg")).read_bytes() and b"snapkv" in svg
    grid = needle_grid(df[df["ratio"] == 0.5])
    assert list(grid.index) == [0.0, 50.0, 100.0] and list(grid.columns) == [500, 1000]
    assert grid.loc[0.0, 500] == 1.0 and grid.loc[0.0, 1000] == 0.0 and grid.loc[50.0, 1000] == 0.0


def test_report_reads_real_runs_of_the_tiny_model():
    full, snapkv = tiny_runs()
    df = records_frame(load_runs([full, snapkv]))
    table = grouped_table(df, "length").numeric.set_index("method")
    assert table.loc["full", "300 tok n"] == 2 and table.loc["snapkv", "300 tok n"] == 2
    assert table.loc["full", "achieved_ratio"] == 0.0
    assert 0.45 <= table.loc["snapkv", "achieved_ratio"] <= 0.55
    assert table.loc["snapkv", "kv_mb"] < 0.6 * table.loc["full", "kv_mb"]


def test_bad_grouping_and_format_are_user_errors(runs):
    from lcbench.report.build import build_report

    with pytest.raises(UserError, match="--group-by"):
        build_report([runs], Console(), groupings=("bucket",))
    with pytest.raises(UserError, match="--format"):
        build_report([runs], Console(), formats=("pdf",))


def test_plot_labels_are_not_read_as_mathtext(tmp_path):
    """'$' starts matplotlib mathtext: unescaped, this method name makes savefig raise ValueError."""
    write_run(tmp_path / "runs", [1, 0], method="price$\\frac$", ratio=0.5)
    df = records_frame(load_runs([tmp_path / "runs"]))
    (plot,) = score_vs_ratio(df, tmp_path / "plots")
    assert plot.methods == ("price$\\frac$",)
    assert (tmp_path / "plots" / plot.path("png")).stat().st_size > 0


def test_suite_score_is_the_suites_headline_with_a_sample_bootstrap():
    """LongBench's headline is the mean of dataset means, not the mean over rows: a 3-row dataset
    and a 1-row dataset weigh the same. The interval resamples samples within each dataset."""
    from lcbench.results.summary import suite_score
    from lcbench.tasks.registry import TASKS

    records = [{"sample_id": f"a{i}", "turn": 0, "meta": {"dataset": "trec"}, "score": s} for i, s in enumerate([100, 100, 40])]
    records.append({"sample_id": "b0", "turn": 0, "meta": {"dataset": "lcc"}, "score": 10.0})
    task = TASKS.get("longbench")()
    out = suite_score(records, task.suite_score)
    assert out["score"] == pytest.approx((80.0 + 10.0) / 2)  # the row mean would be 62.5
    lo, hi = out["ci"]
    # lcc has one sample (fixed at 10); trec's mean ranges over resamples of {100, 100, 40}
    assert (40 + 10) / 2 <= lo <= out["score"] <= hi <= (100 + 10) / 2


def test_run_table_shows_the_suite_score_and_escapes_markup(tmp_path):
    from lcbench.report.table import render_table, run_rows
    from lcbench.results.store import RunStore

    folder = write_run(tmp_path, [1.0, 0.0, 0.0, 0.0], method="[red]evil[/red]", model="[bold]m[/bold]")
    summary = RunStore(folder).summary()
    summary["suite"] = {"score": 0.9, "ci": [0.8, 0.95]}
    RunStore(folder).write_json(RunStore.SUMMARY, summary)
    console = Console(record=True, width=200)
    render_table(run_rows([tmp_path]), console)
    text = console.export_text()
    assert "0.90 [0.80,0.95]" in text and "0.25" not in text
    assert "[red]evil[/red]" in text and "[bold]m[/bold]" in text


def test_runs_on_different_samples_are_never_pooled(tmp_path):
    """Two runs of one task and method that differ in their task arguments are separate columns,
    separate plots and separate rankings, named by what differs."""
    from lcbench.report.frame import task_labels
    from lcbench.report.leaderboard import build_leaderboard

    a = write_run(tmp_path / "a", [1.0, 1.0])
    b = write_run(tmp_path / "b", [0.0, 0.0])
    spec_path = b / "spec.json"
    spec_path.write_text(spec_path.read_text().replace('"lengths": "500;1000"', '"lengths": "4000"'))
    runs = load_runs([a, b])
    labels = task_labels(runs)
    assert sorted(labels.values()) == ["niah [lengths=4000]", "niah [lengths=500;1000]"]
    table = grouped_table(records_frame(runs), "dataset")
    row = table.numeric.iloc[0]
    assert row["niah [lengths=500;1000] score"] == 1.0 and row["niah [lengths=4000] score"] == 0.0
    assert len(score_vs_ratio(records_frame(runs), tmp_path / "plots")) == 2
    index = build_leaderboard([a, b], tmp_path / "site").read_text()
    assert "niah [lengths=4000] — tiny-random-llama" in index and "niah [lengths=500;1000] — tiny-random-llama" in index
