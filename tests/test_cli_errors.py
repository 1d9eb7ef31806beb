"""Bad input gives a one-paragraph error naming the fix, exit code 2, and no traceback."""

import os
import subprocess
import sys

import pytest

from lcbench import cli

TINY = ["run", "--model", "tiny-random-llama", "--task", "niah", "--limit", "1"]


def _run(argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lcbench", *argv])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    return exc.value.code, " ".join(err.split())


@pytest.mark.parametrize("argv, expected", [
    (["--method", "snapvk"], "Unknown method 'snapvk'. Did you mean 'snapkv'"),
    (["--task", "naih"], "Unknown task 'naih'. Did you mean 'niah'"),
    (["--method", "snapkv", "--method-args", "window_sise=8"], "has no parameter 'window_sise'. Did you mean 'window_size'"),
    (["--method", "snapkv", "--method-args", "window_size=big"], "parameter 'window_size' expects int, got 'big'"),
    (["--ratio", "1.5"], "--ratio 1.5 is outside [0, 1)"),
    (["--ratio", "half"], "is not a number"),
    (["--task-args", "depths=deep"], "depths must be numbers"),
    (["--method-args", "oops"], "is not of the form key=value"),
])
def test_bad_input_exit_2(argv, expected, monkeypatch, capsys, tmp_path):
    code, err = _run([*TINY, "--output-path", str(tmp_path), *argv], monkeypatch, capsys)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err


def test_unknown_model(monkeypatch, capsys, tmp_path):
    code, err = _run(["run", "--model", str(tmp_path / "no-such-model"), "--limit", "1",
                      "--output-path", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and "could not load model" in err and "Fix:" in err


def test_unwritable_output_path(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = _run([*TINY, "--output-path", str(blocker / "sub")], monkeypatch, capsys)
    assert code == 2 and "cannot write results" in err and "--output-path" in err


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lcbench.cli", *TINY, "--method", "snapkv",
                           "--method-args", "kernel_size=x", "--output-path", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "kernel_size" in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) <= 3  # one paragraph


def test_existing_results_survive_an_error(monkeypatch, capsys, tmp_path):
    """A later bad command never touches what a good one wrote."""
    monkeypatch.setattr(sys, "argv", ["lcbench", *TINY, "--output-path", str(tmp_path)])
    cli.main()
    written = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, _ = _run([*TINY, "--output-path", str(tmp_path), "--ratio", "2"], monkeypatch, capsys)
    assert code == 2
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == written


def test_data_dir_is_the_tasks_data_dir_argument(monkeypatch, capsys, tmp_path):
    from lcbench.evaluate import build_spec

    spec = build_spec(model="tiny-random-llama", task="longbench", data_dir="/data/longbench", device="cpu")
    assert spec.task_args["data_dir"] == "/data/longbench"
    code, err = _run([*TINY, "--output-path", str(tmp_path), "--data-dir", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and "task 'niah' reads no released data" in err and "Traceback" not in err


def test_a_run_that_misses_its_ratio_fails_alone(monkeypatch, capsys, tmp_path):
    """Several runs in one command: the one whose method cannot reach the ratio is reported at the
    end (exit 2), and the runs after it still run and keep their records."""
    code, err = _run(["run", "--model", "tiny-random-llama", "--task", "niah", "--limit", "1",
                      "--task-args", "lengths=320,depths=50,max_new_tokens=2", "--method", "ashape,random",
                      "--ratio", "0.95", "--output-path", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and "1 of 2 runs failed" in err and "ashape" in err and "Traceback" not in err
    random_run = next(tmp_path.glob("niah__random__*"))
    assert len((random_run / "samples.jsonl").read_text().splitlines()) == 1
