"""`lcbench check`: identical re-runs pass, a deliberately worse method fails, the table reads well."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from test_report_fixtures import tiny_runs, write_run
from typer.testing import CliRunner

from lcbench.check import CheckOptions, run_check
from lcbench.cli import app
from lcbench.errors import UserError
from lcbench.results.compare import IMPROVED, INCOMPLETE, OK, REGRESSED, SAME, compare_records, paired_bootstrap

REPO = Path(__file__).resolve().parents[1]
BASELINES = REPO / "results" / "baselines"


def _records(scores, achieved=0.5):
    return [{"sample_id": f"s{i}", "turn": 0, "score": float(s), "achieved_ratio": achieved} for i, s in enumerate(scores)]


def test_paired_bootstrap_pins_values():
    assert paired_bootstrap(np.ones(6), np.ones(6)) == (0.0, 0.0, 0.0)
    delta, lo, hi = paired_bootstrap(np.ones(6), np.zeros(6))
    assert (delta, lo, hi) == (-1.0, -1.0, -1.0)
    delta, lo, hi = paired_bootstrap(np.array([1, 1, 1, 1, 0, 0]), np.array([0, 0, 0, 1, 0, 0]))
    assert delta == pytest.approx(-0.5) and lo < -0.5 < hi < 0  # three of six turns lost: a real drop
    assert paired_bootstrap(np.array([1.0, 0.0]), np.array([0.0, 1.0]), seed=3) == paired_bootstrap(
        np.array([1.0, 0.0]), np.array([0.0, 1.0]), seed=3)


@pytest.mark.parametrize("before, after, tolerance, verdict", [
    ([1, 0, 1, 1, 0, 1], [1, 0, 1, 1, 0, 1], 0.0, SAME),         # identical: no false alarm
    ([1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], 0.0, OK),           # one turn lost: within the interval
    ([1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], 0.0, REGRESSED),    # three lost: beyond it
    ([1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], 0.6, OK),           # ... but inside a declared tolerance
    ([0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], 0.0, IMPROVED),
    ([1] * 3 + [0] * 9, [0] * 12, 0.0, REGRESSED),               # all 3 hits of 12 lost: P(no loss drawn) = 3.2% < 5%
    ([1] * 2 + [0] * 10, [0] * 12, 0.0, OK),                     # 2 of 12: P = 11%, not significant ...
])
def test_verdicts(before, after, tolerance, verdict):
    comp = compare_records("r", "a", "b", _records(before), _records(after), tolerance=tolerance)
    assert comp.verdict == verdict
    assert comp.failed == (verdict == REGRESSED)
    assert comp.changed == sum(x != y for x, y in zip(before, after))


def test_declared_max_drop_fails_whatever_the_interval():
    before, after = _records([1] * 2 + [0] * 10), _records([0] * 12)  # ... unless a maximum drop is declared
    comp = compare_records("r", "a", "b", before, after, max_drop=0.1)
    assert comp.verdict == REGRESSED and "more than the declared maximum drop 0.1" in comp.reasons[0]
    assert compare_records("r", "a", "b", before, _records([0] + [1] + [0] * 10), max_drop=0.1).verdict == OK


def test_less_compression_and_missing_turns_fail():
    worse = compare_records("r", "a", "b", _records([1] * 4, 0.5), _records([1] * 4, 0.45))
    assert worse.verdict == REGRESSED and "achieved compression fell from 0.500 to 0.450" in worse.reasons[0]
    assert compare_records("r", "a", "b", _records([1] * 4, 0.5), _records([1] * 4, 0.49)).verdict == SAME
    missing = compare_records("r", "a", "b", _records([1] * 4), _records([1] * 3))
    assert missing.verdict == INCOMPLETE and missing.failed and missing.n_paired == 3


def test_cli_with_new_runs_prints_before_after_and_sets_exit_code(tmp_path):
    base = tmp_path / "base"
    write_run(base, [1, 1, 1, 1, 0, 1], method="snapkv", ratio=0.5)
    write_run(base, [1, 1, 1, 1, 1, 1], method="full", ratio=0.0)
    same = tmp_path / "same"
    write_run(same, [1, 1, 1, 1, 0, 1], method="snapkv", ratio=0.5)
    write_run(same, [1, 1, 1, 1, 1, 1], method="full", ratio=0.0)
    runner = CliRunner()
    ok = runner.invoke(app, ["check", "--baseline", str(base), "--new", str(same)], terminal_width=160)
    assert ok.exit_code == 0, ok.output
    assert "niah · snapkv · r=0.5" in ok.output and "+0.00 [+0.00,+0.00]" in ok.output and "passed" in ok.output

    worse = tmp_path / "worse"
    write_run(worse, [0, 0, 0, 1, 0, 0], method="snapkv", ratio=0.5)
    write_run(worse, [1, 1, 1, 1, 1, 1], method="full", ratio=0.0)
    md = tmp_path / "check.md"
    bad = runner.invoke(app, ["check", "--baseline", str(base), "--new", str(worse), "--markdown", str(md)],
                        terminal_width=160)
    assert bad.exit_code == 1
    assert "REGRESSED" in bad.output and "0.833" in bad.output and "0.167" in bad.output
    assert "score dropped by 0.667" in bad.output and "FAILED" in bad.output
    text = md.read_text()
    assert text.startswith("## lcbench check: FAILED") and "| niah · snapkv · r=0.5 | 6/6 | 0.833 | 0.167 |" in text
    lenient = runner.invoke(app, ["check", "--baseline", str(base), "--new", str(worse), "--tolerance", "0.7"])
    assert lenient.exit_code == 0


def test_runs_pair_by_measurement_when_code_changed_the_run_id(tmp_path):
    base = write_run(tmp_path / "base", [1, 1], method="snapkv", ratio=0.5)
    new = write_run(tmp_path / "new", [1, 1], method="snapkv", ratio=0.5, achieved=0.5)
    renamed = new.parent / "renamed"
    new.rename(renamed)  # the folder name is not what pairs runs
    assert run_check(base.parent, Console(), [renamed.parent]) == 0
    other = write_run(tmp_path / "other", [1, 1], method="streamingllm", ratio=0.5)
    assert run_check(base.parent, Console(), [other.parent]) == 1  # no partner: incomplete


def test_rerun_of_a_tiny_baseline_passes_and_compressing_less_fails(tmp_path, monkeypatch):
    """Real re-runs through evaluate(): identical code passes; snapkv made to keep 4% more tokens fails."""
    baseline = tmp_path / "baseline"
    for folder in tiny_runs():
        shutil.copytree(folder, baseline / folder.name)
    assert run_check(baseline, Console(), output=tmp_path / "again") == 0
    with pytest.raises(UserError, match="must not resume"):
        run_check(baseline, Console(), output=tmp_path / "again")

    from lcbench.methods.dropping.select import context_budget
    from lcbench.methods.dropping.snapkv import SnapKV

    def lax_budget(self, layer, seen):
        return context_budget(layer, seen, self.ratio) + int(0.04 * seen.context_length)

    monkeypatch.setattr(SnapKV, "budget", lax_budget)
    console = Console(record=True, width=160)
    assert run_check(baseline, console, output=tmp_path / "worse") == 1
    out = console.export_text()
    assert "achieved compression fell" in out and "REGRESSED" in out


def test_check_options_are_validated(tmp_path):
    base = write_run(tmp_path, [1.0])
    with pytest.raises(UserError, match="--confidence"):
        run_check(base, Console(), [base], opts=CheckOptions(confidence=1.5))
    with pytest.raises(UserError, match="must be ≥ 0"):
        run_check(base, Console(), [base], opts=CheckOptions(tolerance=-0.1))


@pytest.mark.slow
def test_committed_baseline_reruns_pass(tmp_path):
    """SmolLM2-135M: re-running a committed baseline (streamingllm r=0.75, 6 NIAH samples) passes."""
    runs = sorted(BASELINES.glob("niah__streamingllm__r0.75__*"))
    if not runs:
        pytest.skip("results/baselines has no streamingllm r=0.75 run")
    baseline = tmp_path / "baseline"
    shutil.copytree(runs[0], baseline / runs[0].name)
    console = Console(record=True, width=160)
    assert run_check(baseline, console, output=tmp_path / "again") == 0, console.export_text()


@pytest.mark.slow
def test_a_deliberately_worse_method_fails_on_the_default_model(tmp_path, monkeypatch):
    """SmolLM2-135M, NIAH with the needle in the recent half: streamingllm r=0.5 finds all 3 needles.
    Re-running passes; the same method with its scores negated (it keeps the oldest tokens instead of
    the sinks and the recent window) loses them and the check fails."""
    from lcbench.evaluate import ModelPool, build_spec, evaluate
    from lcbench.methods.dropping.streamingllm import StreamingLLM

    spec = build_spec(method="streamingllm", ratio=0.5, task="niah", device="cpu", output_path=str(tmp_path / "base"),
                      task_args="lengths=500,depths=70;85;100,max_new_tokens=16,haystack=filler")
    outcome = evaluate(spec, ModelPool())
    assert outcome.summary["overall"]["score"] == 1.0
    assert run_check(outcome.folder.parent, Console(), output=tmp_path / "again") == 0

    original = StreamingLLM.scores
    monkeypatch.setattr(StreamingLLM, "scores", lambda self, layer, seen: -original(self, layer, seen))
    console = Console(record=True, width=160)
    assert run_check(outcome.folder.parent, console, output=tmp_path / "worse") == 1
    out = console.export_text()
    assert "REGRESSED" in out and "score dropped by" in out
