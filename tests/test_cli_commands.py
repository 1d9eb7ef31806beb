"""report, leaderboard, check and sweep as a CI job runs them (the installed console script):
their exit codes, their bad input (exit 2, nothing written), and output that a crafted name in the
results cannot turn against its reader (HTML in Markdown, formulas in CSV, escape sequences in the
terminal, rich markup in printed paths)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli_errors import TINY, assert_user_error, flat, lcbench, snapshot
from test_report_fixtures import write_run

EVIL_MODEL = '"><img src=x onerror=alert(1)>'
EVIL_METHOD = "=HYPERLINK(\"http://x\")"
EVIL_TASK = "niah\x1b]0;pwned\x07\x1b[31m"
EVIL_TAG = "<script>alert(1)</script>"


@pytest.fixture()
def evil(tmp_path) -> Path:
    """Runs whose model, method and task names are attacks on the reader of a report."""
    root = tmp_path / "evil"
    write_run(root, [1.0, 0.0, 1.0], method="full", ratio=0.0, model=EVIL_MODEL, task=EVIL_TASK)
    write_run(root, [1.0, 0.0, 0.0], method=EVIL_METHOD, ratio=0.5, model=EVIL_MODEL, task=EVIL_TASK)
    write_run(root, [0.0, 0.0, 1.0], method=EVIL_TAG, ratio=0.25, model=EVIL_MODEL, task=EVIL_TASK)
    return root


def test_report_output_cannot_be_turned_against_its_reader(evil, tmp_path):
    out = tmp_path / "out[/x]"  # rich markup in a printed path
    proc = lcbench("report", str(evil), "-o", str(out), "--no-plots")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout  # control characters shown, never sent
    assert "\\x1b]0;pwned" in proc.stdout
    assert f"files under {out}" in flat(proc.stdout)
    md = (out / "by_dataset.md").read_text()
    assert "<img" not in md and "&lt;img src=x onerror=alert(1)&gt;" in md and "\x1b" not in md
    assert "<script>" not in md and "&lt;script&gt;" in md
    for csv in out.glob("*.csv"):
        for line in csv.read_text().splitlines()[1:]:
            for cell in line.split(","):
                assert not cell.lstrip('"').startswith(("=", "+", "@")), (csv.name, cell)
    assert "'=HYPERLINK" in (out / "records.csv").read_text()


def test_check_markdown_escapes_html_and_terminal_strips_controls(evil, tmp_path):
    md = tmp_path / "check.md"
    proc = lcbench("check", "--baseline", str(evil), "--new", str(evil), "--markdown", str(md))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "\x1b" not in proc.stdout and "passed" in proc.stdout
    text = md.read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "\x1b" not in text and "\\x1b]0;pwned" in text


def test_leaderboard_pages_escape_names(evil, tmp_path):
    proc = lcbench("leaderboard", str(evil), "-o", str(tmp_path / "site[/b]"))
    assert proc.returncode == 0, proc.stderr
    index = (tmp_path / "site[" / "b]" / "index.html").read_text()
    assert "<img src=x" not in index and "\x1b" not in proc.stdout


# --- check: exit 1 on a regression, 0 when nothing changed, 2 on bad input ---------------------------
@pytest.fixture()
def baseline(tmp_path) -> Path:
    base = tmp_path / "base"
    write_run(base, [1, 1, 1, 1, 0, 1], method="snapkv", ratio=0.5)
    write_run(base, [1, 1, 1, 1, 1, 1], method="full", ratio=0.0)
    return base


def test_check_exit_codes_for_same_worse_and_incomplete_runs(baseline, tmp_path):
    same = tmp_path / "same"
    write_run(same, [1, 1, 1, 1, 0, 1], method="snapkv", ratio=0.5)
    write_run(same, [1, 1, 1, 1, 1, 1], method="full", ratio=0.0)
    ok = lcbench("check", "--baseline", str(baseline), "--new", str(same))
    assert ok.returncode == 0 and "passed" in ok.stdout
    worse = tmp_path / "worse"
    write_run(worse, [0, 0, 0, 1, 0, 0], method="snapkv", ratio=0.5)
    write_run(worse, [1, 1, 1, 1, 1, 1], method="full", ratio=0.0)
    md = tmp_path / "check.md"
    bad = lcbench("check", "--baseline", str(baseline), "--new", str(worse), "--markdown", str(md))
    assert bad.returncode == 1 and "REGRESSED" in bad.stdout and "FAILED: 1 of 2 runs regressed" in flat(bad.stdout)
    assert md.read_text().startswith("## lcbench check: FAILED")
    partial = tmp_path / "partial"
    write_run(partial, [1, 1, 1, 1, 0, 1], method="snapkv", ratio=0.5)  # the full run is missing
    missing = lcbench("check", "--baseline", str(baseline), "--new", str(partial))
    assert missing.returncode == 1 and "INCOMPLETE" in missing.stdout


@pytest.mark.parametrize("argv, expected", [
    (["--confidence", "1.5"], "--confidence 1.5: must be in [0.5, 1)"),
    (["--tolerance", "-0.1"], "must be ≥ 0"),
    (["--max-drop", "-1"], "must be ≥ 0"),
])
def test_check_bad_options(baseline, argv, expected):
    assert_user_error(lcbench("check", "--baseline", str(baseline), "--new", str(baseline), *argv), expected)


def test_check_bad_paths(baseline, tmp_path):
    assert_user_error(lcbench("check", "--baseline", str(tmp_path / "nope"), "--new", str(baseline)),
                      "does not exist")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(lcbench("check", "--baseline", str(baseline), "--new", str(baseline), "--markdown",
                              str(blocker / "check.md")), "cannot write --markdown")


def test_check_reruns_a_real_baseline_and_fails_when_it_scored_better(tmp_path):
    """The CI loop end to end: a tiny run as the baseline; re-running it passes (exit 0); a baseline
    that claims every turn was right fails against the same code (exit 1)."""
    base = tmp_path / "base"
    made = lcbench("run", *TINY[:2], "--task-args", "lengths=320,depths=0;50;100,max_new_tokens=2",
                   "--output-path", str(base))
    assert made.returncode == 0, made.stderr
    again = lcbench("check", "--baseline", str(base), "--output-path", str(tmp_path / "again"))
    assert again.returncode == 0, again.stdout + again.stderr
    folder = next(base.glob("*/samples.jsonl"))
    records = [json.loads(line) for line in folder.read_text().splitlines()]
    assert all(r["schema"] == 2 for r in records)  # the task's scores live in their own namespace
    folder.write_text("".join(json.dumps({**r, "scores": {**r["scores"], "score": 1.0}}) + "\n" for r in records))
    worse = lcbench("check", "--baseline", str(base), "--output-path", str(tmp_path / "worse"), "--max-drop", "0.1")
    assert worse.returncode == 1 and "REGRESSED" in worse.stdout, worse.stdout + worse.stderr


# --- report and leaderboard: bad input is exit 2 and writes nothing ----------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["--group-by", "colour"], "--group-by colour"),
    (["--group-by", ""], "--group-by '' names nothing"),
    (["--format", "pdf"], "--format pdf"),
])
def test_report_bad_options(baseline, tmp_path, argv, expected):
    assert_user_error(lcbench("report", str(baseline), "-o", str(tmp_path / "out"), *argv), expected)
    assert not (tmp_path / "out").exists()


def test_report_bad_folders(tmp_path):
    assert_user_error(lcbench("report", str(tmp_path / "nope")), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_user_error(lcbench("report", str(tmp_path / "empty")), "no lcbench runs found")


def test_report_into_a_file_is_refused(baseline, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(lcbench("report", str(baseline), "-o", str(blocker / "out"), "--no-plots"),
                      "cannot write the report")
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("argv, expected", [
    (["--ratios", "abc"], "--ratios 'abc' is not a number"),
    (["--ratios", ""], "names no ratio"),
    (["--ratios", "1.5"], "each ratio must be in [0, 1)"),
])
def test_leaderboard_bad_ratios(baseline, tmp_path, argv, expected):
    assert_user_error(lcbench("leaderboard", str(baseline), "-o", str(tmp_path / "site"), *argv), expected)
    assert not (tmp_path / "site").exists()


def test_leaderboard_never_writes_into_a_foreign_folder(baseline, tmp_path):
    foreign = tmp_path / "docs"
    foreign.mkdir()
    (foreign / "index.html").write_text("mine")
    assert_user_error(lcbench("leaderboard", str(baseline), "-o", str(foreign)), "was not written by")
    assert snapshot(foreign) == {"index.html": b"mine"}


# --- sweep: exit 1 when a run failed, 2 on a bad grid (before any run starts) --------------------------
GRID = """
[grid]
model = ["tiny-random-llama"]
method = {methods}
ratio = {ratios}
task = ["niah"]
[run]
{run}
[task_args]
niah = "lengths=320,depths=50,max_new_tokens=2"
"""


def _grid(tmp_path: Path, methods='["full", "ashape"]', ratios="[0.95]", run='limit = 1\ndevice = "cpu"',
          extra="") -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(GRID.format(methods=methods, ratios=ratios, run=run) + extra)
    return path


def test_sweep_with_a_failed_run_exits_1_and_keeps_the_others(tmp_path):
    out = tmp_path / "out"
    proc = lcbench("sweep", str(_grid(tmp_path)), "--output-path", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 of 2 runs failed" in flat(proc.stderr) and "Traceback" not in proc.stderr
    assert (next(out.glob("niah__full__*")) / "summary.json").exists()
    failed = next(out.glob("niah__ashape__*"))
    assert json.loads((failed / "status.json").read_text())["state"] == "failed"


@pytest.mark.parametrize("kw, expected", [
    ({"methods": '["full", "snapvk"]'}, "Unknown method 'snapvk'"),
    ({"ratios": '["half"]'}, "ratio: ['half'] are not numbers"),
    ({"ratios": "[]"}, "ratio = []: an empty axis"),
    ({"ratios": "[1.5]"}, "outside [0, 1)"),
    ({"run": "limit = 0"}, "--limit 0"),
    ({"run": 'limit = "ten"'}, "--limit 'ten'"),
    ({"run": 'device = "quantum"'}, "is not a device torch knows"),
    ({"extra": '[method_args]\nsnapvk = "window_size=8"\n'}, "names ['snapvk']"),
    ({"extra": '[method_args]\nashape = "block_size=0"\n'}, "'block_size' must be ≥ 1"),
])
def test_bad_grids_are_refused_before_the_first_run(tmp_path, kw, expected):
    out = tmp_path / "out"
    assert_user_error(lcbench("sweep", str(_grid(tmp_path, **kw)), "--output-path", str(out)), expected)
    assert not out.exists()  # not even the valid combinations ran


def test_sweep_bad_invocations(tmp_path):
    assert_user_error(lcbench("sweep", str(tmp_path / "none.toml")), "cannot read the grid file")
    assert_user_error(lcbench("sweep", str(_grid(tmp_path)), "--executor", "slurm"), "choose local or ray")
    dry = lcbench("sweep", str(_grid(tmp_path)), "--output-path", str(tmp_path / "out"), "--dry-run")
    assert dry.returncode == 0 and "2 runs" in dry.stdout and not (tmp_path / "out").exists()


# --- examples/ci relies on the exit codes ------------------------------------------------------------
CI = Path(__file__).resolve().parents[1] / "examples" / "ci"


def test_the_ci_example_fails_the_job_on_a_regression_and_on_bad_input(baseline, tmp_path):
    import subprocess

    def check_sh(*argv):
        return subprocess.run(["bash", str(CI / "check.sh"), *argv], capture_output=True, text=True, timeout=300)

    worse = tmp_path / "worse"
    write_run(worse, [0, 0, 0, 1, 0, 0], method="snapkv", ratio=0.5)
    write_run(worse, [1, 1, 1, 1, 1, 1], method="full", ratio=0.0)
    failed = check_sh("--baseline", str(baseline), "--new", str(worse))
    assert failed.returncode == 1 and "lcbench check FAILED: a run regressed" in failed.stderr
    bad = check_sh("--baseline", str(tmp_path / "missing"), "--new", str(worse))
    assert bad.returncode == 2 and "could not run: bad input" in bad.stderr
    ok = check_sh("--baseline", str(baseline), "--new", str(baseline))
    assert ok.returncode == 0 and "lcbench check passed" in ok.stdout
    workflow = (CI / "lcbench-check.yml").read_text()
    assert "bash check.sh --baseline results/baselines" in workflow and "continue-on-error" not in workflow


def test_check_rerun_that_misses_its_ratio_fails_the_check(tmp_path):
    """A re-run whose method now falls short of its ratio is a failed run: verdict FAILED, exit 1."""
    base = tmp_path / "base"
    folder = write_run(base, [1.0, 1.0], method="ashape", ratio=0.95, model="tiny-random-llama")
    payload = json.loads((folder / "spec.json").read_text())
    payload["spec"]["task_args"] = {"lengths": "320", "depths": "50", "max_new_tokens": 2}  # too short for 0.95
    (folder / "spec.json").write_text(json.dumps(payload))
    proc = lcbench("check", "--baseline", str(base), "--output-path", str(tmp_path / "again"))
    out = flat(proc.stdout)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED" in out and "the new run failed" in out and "compression ratio" in out
    folder = next((tmp_path / "again").glob("niah__ashape__*"))
    assert json.loads((folder / "status.json").read_text())["state"] == "failed"
