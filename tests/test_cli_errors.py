"""Exit codes and bad input, as a user and a CI system see them: the installed ``lcbench`` console
script is spawned for every case (never CliRunner, which hides exit codes and tracebacks).

Every case pins the exit status, that no traceback is printed, that the message names the fix
(typer's usage text for usage errors, "Fix:" for lcbench's own errors), and that nothing is
written: the output folder is left exactly as it was (created by no bad command).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXE = shutil.which("lcbench")
TINY = ["--model", "tiny-random-llama", "--limit", "1"]
SMALL_NIAH = "lengths=320,depths=50,max_new_tokens=2"


def lcbench(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """The console script (``python -m lcbench.cli`` only where it is not installed), wide output."""
    cmd = [EXE, *args] if EXE else [sys.executable, "-m", "lcbench.cli", *args]
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1", **kw.pop("env", {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, **kw)


def flat(text: str) -> str:
    """Output with rich's line wrapping and box characters undone, for substring checks."""
    return " ".join(text.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} \
        if folder.exists() else {}


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, one paragraph that names the problem and the fix."""
    err = flat(proc.stderr)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert "Fix" in err or "--help" in err or "Did you mean" in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# --- usage errors: typer's own handling, exit 2, usage text, no traceback (no model is loaded) -------
@pytest.mark.parametrize("argv, needle", [
    ([], "Usage: lcbench"),                                     # bare lcbench: help, exit 2
    (["nosuchcommand"], "No such command"),
    (["run", "--nosuchflag"], "No such option: --nosuchflag"),
    (["run", "--limit", "abc"], "--limit"),
    (["run", "--seed", "1.5"], "--seed"),
    (["run", "--prefill-chunk", "x"], "--prefill-chunk"),
    (["run", "--ratio"], "--ratio"),                            # an option without its value
    (["report"], "Missing argument"),
    (["report", "--nosuch", "x"], "No such option"),
    (["leaderboard"], "Missing argument"),
    (["sweep"], "Missing argument"),
    (["sweep", "g.toml", "--gpus-per-run", "many"], "--gpus-per-run"),
    (["check", "--tolerance", "x"], "--tolerance"),
    (["check", "--confidence", "high"], "--confidence"),
    (["ls"], "Missing argument"),
    (["ls", "methods", "snapkv", "EXTRA"], "unexpected extra argument"),
])
def test_usage_errors_exit_2_with_usage_text(argv, needle, tmp_path):
    proc = lcbench(*argv, cwd=tmp_path)
    out = flat(proc.stdout + proc.stderr)
    assert proc.returncode == 2, (proc.returncode, out)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert needle in out and ("Usage: lcbench" in out or "Error" in out), out  # typer's usage text / error box
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["ls", "tasks"]])
def test_help_and_listing_exit_0(argv, tmp_path):
    proc = lcbench(*argv, cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and proc.stdout.strip()


def test_usage_errors_spawn_fast(tmp_path):
    """The CLI module imports no torch before a command body runs, so usage errors come quickly."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import lcbench.cli"], capture_output=True,
                          text=True)
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "transformers" not in imported and "lcbench.cli" in imported


# --- bad input to run: exit 2, one paragraph naming the fix, nothing written ---------------------------
@pytest.mark.parametrize("argv, expected", [
    (["--method", "snapvk"], "Unknown method 'snapvk'. Did you mean 'snapkv'"),
    (["--task", "naih"], "Unknown task 'naih'. Did you mean 'niah'"),
    (["--method", "snapkv", "--method-args", "window_sise=8"], "Did you mean 'window_size'"),
    (["--method", "snapkv", "--method-args", "window_size=big"], "parameter 'window_size' expects int, got 'big'"),
    (["--method", "snapkv", "--method-args", "window_size=-4"], "'window_size' must be ≥ 1, got -4"),
    (["--method", "snapkv", "--method-args", "kernel_size=0"], "'kernel_size' must be ≥ 1, got 0"),
    (["--method", "streamingllm", "--method-args", "n_sink=-1"], "'n_sink' must be ≥ 0"),
    (["--method-args", "oops"], "is not of the form key=value"),
    (["--ratio", "1.5"], "--ratio 1.5 is outside [0, 1)"),
    (["--ratio", "half"], "is not a number"),
    (["--ratio", ""], "names no ratio"),
    (["--ratio", "nan"], "is not a number"),
    (["--method", ""], "--method '' names nothing"),
    (["--method", ","], "--method ',' names nothing"),
    (["--task", ""], "--task '' names nothing"),
    (["--limit", "0"], "--limit 0: must be a positive number"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--prefill-chunk", "-1"], "--prefill-chunk -1"),
    (["--device", "quantum"], "--device 'quantum' is not a device torch knows"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--dtype", "float8"], "dtype 'float8' is not known"),
    (["--task-args", "depths=deep"], "'depths' must be numbers separated by ';'"),
    (["--task-args", "depths=150"], "'depths' must be ≤ 100, got 150"),
    (["--task-args", "depths="], "'depths' is empty"),
    (["--task-args", "lengths=100"], "'lengths' must be ≥ 221"),
    (["--task-args", "linspace=1000;2000"], "'linspace' needs exactly 3 values"),
    (["--task-args", "linspace=1000;2000;0"], "'linspace' must be ≥ 1, got 0"),
    (["--task-args", "repeats=0"], "'repeats' must be ≥ 1, got 0"),
    (["--task-args", "max_new_tokens=0"], "'max_new_tokens' must be ≥ 1, got 0"),
    (["--task-args", "needle=haystack"], "'needle' must be one of"),
    (["--data-dir", "/tmp"], "task 'niah' reads no released data"),
    (["--method", "ashape", "--prefill-chunk", "64"], "--prefill-chunk cannot be used with method 'ashape'"),
    (["--model", "/no/such/model/folder"], "could not load model"),
])
def test_bad_run_input_exit_2_and_writes_nothing(argv, expected, tmp_path):
    out = tmp_path / "results"
    proc = lcbench("run", *TINY, "--output-path", str(out), *argv)
    err = assert_user_error(proc, expected)
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) <= 6, err  # one paragraph
    assert not out.exists(), sorted(snapshot(out))  # no run folder for a run that cannot be valid


def test_unwritable_output_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_user_error(lcbench("run", *TINY, "--output-path", str(blocker / "sub")), "cannot write results",
                      "--output-path")
    assert blocker.read_text() == "not a folder"


# --- a replayed --spec is validated exactly like the flags ------------------------------------------
@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good")
    proc = lcbench("run", *TINY, "--method", "snapkv", "--ratio", "0.5", "--task-args", SMALL_NIAH,
                   "--output-path", str(out))
    assert proc.returncode == 0, proc.stderr
    return next(out.glob("*/spec.json")).parent


def _edited_spec(good_run: Path, tmp_path: Path, edit) -> Path:
    payload = json.loads((good_run / "spec.json").read_text())
    payload["spec"]["output_path"] = str(tmp_path / "replay")
    edit(payload)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(payload) if not isinstance(payload, str) else payload)
    return path


@pytest.mark.parametrize("edit, expected", [
    (lambda p: p["spec"].update(ratio=0.9), "labelled ratio=0.9 but its method chain requests 0.5"),
    (lambda p: p["spec"]["method"][0].update(ratio=1.5), "ratio 1.5, outside [0, 1)"),
    (lambda p: p["spec"]["method"][0]["args"].update(window_size=-3), "'window_size' must be ≥ 1"),
    (lambda p: p["spec"]["method"][0]["args"].update(window_sise=8), "Did you mean 'window_size'"),
    (lambda p: p["spec"].update(limit=0), "--limit 0"),
    (lambda p: p["spec"].update(limit="ten"), "--limit 'ten'"),
    (lambda p: p["spec"].update(bogus=1), "unknown key(s) ['bogus']"),
    (lambda p: p["spec"].pop("task"), "missing key(s) ['task']"),
    (lambda p: p["spec"]["task_args"].update(depths="200"), "'depths' must be ≤ 100"),
    (lambda p: p["spec"].update(device="tpu9"), "is not a device torch knows"),
    (lambda p: p["spec"].update(task_version="0.0-old"), "was version 0.0-old"),
    (lambda p: p.pop("spec"), "no 'spec' object"),
])
def test_replayed_spec_is_validated_like_the_flags(good_run, tmp_path, edit, expected):
    path = _edited_spec(good_run, tmp_path, edit)
    assert_user_error(lcbench("run", "--spec", str(path)), expected)
    assert not (tmp_path / "replay").exists()


def test_unreadable_spec_files(tmp_path):
    assert_user_error(lcbench("run", "--spec", str(tmp_path / "missing.json")), "not a readable lcbench spec.json")
    (tmp_path / "torn.json").write_text('{"run_id": "x", "spec": {')
    assert_user_error(lcbench("run", "--spec", str(tmp_path / "torn.json")), "not a readable lcbench spec.json")


def test_replayed_spec_reproduces_the_run(good_run, tmp_path):
    path = _edited_spec(good_run, tmp_path, lambda p: None)
    proc = lcbench("run", "--spec", str(path))
    assert proc.returncode == 0, proc.stderr
    again = tmp_path / "replay" / good_run.name  # same spec, same run id
    assert [json.loads(line)["prediction"] for line in (again / "samples.jsonl").read_text().splitlines()] == \
        [json.loads(line)["prediction"] for line in (good_run / "samples.jsonl").read_text().splitlines()]


def test_existing_results_survive_bad_commands(good_run):
    """Later bad commands into the same folder never touch what a good one wrote."""
    before = snapshot(good_run.parent)
    for argv in (["--ratio", "2"], ["--method", "snapkv", "--method-args", "window_size=0"], ["--device", "gpu"]):
        assert_user_error(lcbench("run", *TINY, "--output-path", str(good_run.parent), *argv))
    assert snapshot(good_run.parent) == before


def test_context_longer_than_the_model_window_warns_naming_max_length(tmp_path):
    """tiny-random-llama has 4096 positions; a 4300-token haystack is beyond them."""
    proc = lcbench("run", *TINY, "--task-args", "lengths=4300,depths=50,max_new_tokens=2",
                   "--output-path", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "max_length 4096" in flat(proc.stderr) and "Traceback" not in proc.stderr


def test_a_run_that_misses_its_ratio_fails_alone(tmp_path):
    """Several runs in one command: the one whose method cannot reach the ratio is reported at the
    end (exit 2: the ratio asked for is out of the method's reach), marked failed in its folder,
    and the runs after it still run and keep their records."""
    proc = lcbench("run", *TINY, "--task-args", SMALL_NIAH, "--method", "ashape,random", "--ratio", "0.95",
                   "--output-path", str(tmp_path))
    assert_user_error(proc, "1 of 2 runs failed", "ashape")
    random_run = next(tmp_path.glob("niah__random__*"))
    assert len((random_run / "samples.jsonl").read_text().splitlines()) == 1
    failed = next(tmp_path.glob("niah__ashape__*"))
    assert json.loads((failed / "status.json").read_text())["state"] == "failed"
    assert not (failed / ".lock").exists()
