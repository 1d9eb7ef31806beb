"""Results are never lost, duplicated or misreported, whatever happens to the process writing them:
Ctrl-C and SIGTERM sent to a real ``lcbench run`` mid-run, a second writer, a writer killed with
SIGKILL, a corrupt line in the middle of samples.jsonl, a full disk (a file-size limit: the same
OSError path as ENOSPC), a run that crashes, corrupt spec.json and records without their keys."""

from __future__ import annotations

import json
import os
import pty
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli_errors import EXE, TINY, assert_user_error, flat, lcbench, snapshot

from lcbench.results import read_records

NIAH_10 = "lengths=400;600,depths=0;25;50;75;100,max_new_tokens=24"  # 10 samples, ~0.5 s each
NIAH_3 = "lengths=320,depths=0;50;100,max_new_tokens=2"
RUN_10 = ["run", "--model", "tiny-random-llama", "--method", "snapkv", "--task-args", NIAH_10]
RUN_3 = ["run", "--model", "tiny-random-llama", "--task-args", NIAH_3]
ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _default_sigint() -> None:
    """In the child before exec: Ctrl-C as a terminal delivers it. A shell that started the tests in
    the background (`&` without job control) passes SIGINT on as ignored, and Python then installs
    no KeyboardInterrupt handler, so the signal tests would test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cmd(*args: str) -> list[str]:
    return [EXE, *args] if EXE else [sys.executable, "-m", "lcbench.cli", *args]


def _records(folder: Path) -> list[dict]:
    return read_records(folder)


def _wait_for_records(out: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        for f in out.glob("*/samples.jsonl"):
            if len(f.read_text().splitlines()) >= n:
                return f.parent
        time.sleep(0.05)
    raise AssertionError(f"no {n} records in {out} before the deadline (exit {proc.poll()})")


def _state(folder: Path) -> dict:
    return json.loads((folder / "status.json").read_text())


# --- signals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_run_exits_with_its_code_says_what_was_kept_and_resumes(tmp_path, sig, code):
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(*RUN_10, "--output-path", str(out)), env=ENV, preexec_fn=_default_sigint,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    folder = _wait_for_records(out, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    kept = len(_records(folder))
    assert 2 <= kept < 10
    assert f"aborted: {kept} records written to {folder}; re-run the same command to resume" in flat(err)
    assert _state(folder)["state"] == "aborted" and not (folder / ".lock").exists()
    again = lcbench(*RUN_10, "--output-path", str(out))
    assert again.returncode == 0, again.stderr
    keys = [(r["sample_id"], r["turn"]) for r in _records(folder)]
    assert len(keys) == 10 == len(set(keys)) and _state(folder)["state"] == "complete"


def test_ctrl_c_in_a_terminal_restores_the_cursor(tmp_path):
    """On a terminal the progress bar hides the cursor; after Ctrl-C it is shown again."""
    out = tmp_path / "out"
    master, slave = pty.openpty()
    # 60 samples (NIAH_10 × 6 repeats): the signal lands mid-run even on a fast machine (a signal
    # after the run finished is ignored by the console script: the results are complete)
    run_60 = [*RUN_10[:-1], NIAH_10 + ",repeats=6"]
    proc = subprocess.Popen(_cmd(*run_60, "--output-path", str(out)), env={**ENV, "TERM": "xterm"}, preexec_fn=_default_sigint,
                            stdout=subprocess.DEVNULL, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []

    def drain(until: float) -> None:
        while time.time() < until:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    return
                if not data:
                    return
                chunks.append(data)
            elif proc.poll() is not None:
                return

    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("*/samples.jsonl")):
        drain(time.time() + 0.2)
    proc.send_signal(signal.SIGINT)
    drain(time.time() + 60)
    proc.wait(timeout=60)
    os.close(master)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 130
    hide, show = text.find("\x1b[?25l"), text.rfind("\x1b[?25h")
    assert hide != -1 and show > hide, repr(text[-500:])
    assert "aborted:" in text and "Traceback" not in text


# --- one writer per run folder --------------------------------------------------------------------
def test_a_second_writer_is_refused_with_the_holders_pid_and_a_killed_writers_lock_is_recovered(tmp_path):
    out = tmp_path / "out"
    run = RUN_10
    first = subprocess.Popen(_cmd(*run, "--output-path", str(out)), env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        folder = _wait_for_records(out, 1, first)
        first.send_signal(signal.SIGSTOP)  # alive and holding the lock while the second writer starts
        second = lcbench(*run, "--output-path", str(out))
        assert_user_error(second, f"pid {first.pid}", "being written by another lcbench process")
    finally:
        first.kill()  # SIGKILL: no cleanup, the lock stays behind
        first.wait()
    assert json.loads((folder / ".lock").read_text())["pid"] == first.pid
    third = lcbench(*run, "--output-path", str(out))
    assert third.returncode == 0, third.stderr
    keys = [(r["sample_id"], r["turn"]) for r in _records(folder)]
    assert len(keys) == 10 == len(set(keys))  # no record written twice
    assert json.loads((folder / "summary.json").read_text())["overall"]["n"] == 10
    assert not (folder / ".lock").exists()


# --- corrupt records ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_written(tmp_path_factory) -> Path:
    """One complete 3-record run written by the real CLI (once per module: each test damages a copy)."""
    out = tmp_path_factory.mktemp("three") / "out"
    proc = lcbench(*RUN_3, "--output-path", str(out))
    assert proc.returncode == 0, proc.stderr
    return next(out.glob("*/summary.json")).parent


@pytest.fixture()
def three(three_written, tmp_path) -> Path:
    """A fresh copy of that run, under its own output folder (a moved results folder resumes the same)."""
    folder = tmp_path / "out" / three_written.name
    shutil.copytree(three_written, folder)
    return folder


def test_a_corrupt_middle_line_is_quarantined_and_every_other_record_kept(three):
    lines = (three / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3
    (three / "samples.jsonl").write_text("\n".join([lines[0], '{"sample_id": "x", "tu', lines[2]]) + "\n")
    report = lcbench("report", str(three))  # a reader says what it skipped and changes nothing
    assert report.returncode == 0 and "1 corrupt line(s) skipped" in flat(report.stdout)
    proc = lcbench(*RUN_3, "--output-path", str(three.parent))
    assert proc.returncode == 0, proc.stderr
    assert "moved to" in flat(proc.stderr) and "samples.quarantine.jsonl" in flat(proc.stderr)
    now = (three / "samples.jsonl").read_text().splitlines()
    assert now[:2] == [lines[0], lines[2]] and len(now) == 3  # both good records kept as they were
    assert json.loads(now[2])["sample_id"] == json.loads(lines[1])["sample_id"]  # the lost turn recomputed
    quarantined = json.loads((three / "samples.quarantine.jsonl").read_text())
    assert quarantined == {"line": 2, "text": '{"sample_id": "x", "tu'}


def test_a_torn_last_line_is_dropped_and_recomputed(three):
    lines = (three / "samples.jsonl").read_text().splitlines()
    (three / "samples.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    assert lcbench(*RUN_3, "--output-path", str(three.parent)).returncode == 0
    now = (three / "samples.jsonl").read_text().splitlines()
    assert now[:2] == lines[:2] and len(now) == 3 and not (three / "samples.quarantine.jsonl").exists()


def test_records_without_their_keys_are_an_error_naming_the_file(three):
    path = three / "samples.jsonl"
    path.write_text(path.read_text() + json.dumps({"prediction": "stray"}) + "\n")
    before = snapshot(three)
    assert_user_error(lcbench(*RUN_3, "--output-path", str(three.parent)), f"{path} line 4", "'sample_id'")
    assert_user_error(lcbench("report", str(three)), f"{path} line 4")
    assert snapshot(three) == before


@pytest.mark.parametrize("text", ['{"run_id": ', "[1, 2]", '{"run_id": "x"}'])
def test_a_corrupt_spec_json_is_an_error_naming_the_file(three, text):
    (three / "spec.json").write_text(text)
    before = snapshot(three)
    for argv in (RUN_3 + ["--output-path", str(three.parent)], ["report", str(three)],
                 ["leaderboard", str(three), "-o", str(three.parent / "site")]):
        assert_user_error(lcbench(*argv), str(three))
    assert snapshot(three) == before and not (three.parent / "site").exists()


def test_a_folder_that_cannot_be_resumed_is_refused_before_the_model_loads(three, tmp_path):
    """The folder checks run before loading the model (minutes for a large one): a run of a model
    folder that does not exist, whose results folder holds a corrupt spec.json, a live writer's lock or
    records without their keys, is refused for the folder, never for the model, and changes nothing."""
    from lcbench.evaluate import build_spec

    model = str(tmp_path / "no-such-model")
    out = tmp_path / "results"
    run = ["run", "--model", model, "--task-args", NIAH_3, "--output-path", str(out)]
    folder = out / build_spec(model=model, task_args=NIAH_3, output_path=str(out), device="cpu").run_id
    shutil.copytree(three, folder)
    (folder / "spec.json").write_text('{"run_id": ')
    before = snapshot(folder)
    err = assert_user_error(lcbench(*run), f"{folder / 'spec.json'} is corrupt")
    assert "no-such-model" not in err.replace(str(folder), "") and snapshot(folder) == before

    shutil.copy2(three / "spec.json", folder / "spec.json")
    spec = json.loads((folder / "spec.json").read_text())
    (folder / "spec.json").write_text(json.dumps({**spec, "run_id": folder.name}))
    (folder / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename, "since": 0}))
    assert_user_error(lcbench(*run), f"pid {os.getppid()}", "being written by another lcbench process")
    (folder / ".lock").unlink()
    with (folder / "samples.jsonl").open("a") as f:
        f.write(json.dumps({"prediction": "stray"}) + "\n")
    before = snapshot(folder)
    assert_user_error(lcbench(*run), "line 4", "'sample_id'")
    assert snapshot(folder) == before
    (folder / "samples.jsonl").write_text("")
    assert_user_error(lcbench(*run), "could not load model")  # a resumable folder: the model is what fails


# --- runs that end in an error are marked failed, and shown as failed -------------------------------
def _file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it: OSError EFBIG
    return apply


def test_a_full_disk_is_a_clear_error_and_resuming_after_freeing_space_completes(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(_cmd(*RUN_3, "--output-path", str(out)), env=ENV, capture_output=True, text=True,
                          preexec_fn=_file_size_limit(2500), timeout=300)
    err = flat(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "the disk is full" in err and "free space, then re-run the same command to resume" in err
    folder = next(out.glob("*/spec.json")).parent
    assert _state(folder)["state"] == "failed" and not (folder / ".lock").exists()
    report = lcbench("report", str(out))
    assert report.returncode == 2 and "FAILED" in report.stdout and "every run given failed" in flat(report.stderr)
    again = lcbench(*RUN_3, "--output-path", str(out))
    assert again.returncode == 0, again.stderr
    keys = [(r["sample_id"], r["turn"]) for r in _records(folder)]
    assert len(keys) == 3 == len(set(keys)) and _state(folder)["state"] == "complete"


def test_running_out_of_memory_exits_1_saying_what_is_kept_and_how_to_resume(tmp_path):
    """A sample that needs more memory than the process may have (here a 4 GB address-space limit:
    eager attention's mask over the 80000-token sample alone is 6.4 GB; on a GPU, torch's
    OutOfMemoryError) ended in a traceback. Now exit 1 naming the memory, the records kept and the fixes; status failed."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))

    out = tmp_path / "out"
    run = ["run", "--model", "tiny-random-llama", "--model-args", "attn_implementation=eager", "--task", "niah",
           "--task-args", "lengths=300;80000,depths=50,haystack=filler,max_new_tokens=4", "--output-path", str(out)]
    proc = subprocess.run(_cmd(*run), env=ENV, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    err = flat(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "out of memory on cpu" in err and "1 records are kept" in err and "--prefill-chunk 4096" in err
    folder = next(out.glob("*/spec.json")).parent
    assert _state(folder)["state"] == "failed" and "out of memory" in _state(folder)["error"]
    assert [r["sample_id"] for r in _records(folder)] == ["niah-L300-D50"]


def test_what_counts_as_out_of_memory():
    """The errors torch raises when memory runs out, on each device, and one that is a plain crash
    (which keeps its traceback). Loading a model that does not fit is exit 2 (checked by hand: the
    default model under a 2.2 GB address-space limit, "does not fit in the memory of cpu")."""
    import torch

    from lcbench.errors import out_of_memory

    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert out_of_memory(RuntimeError("unable to mmap 538090408 bytes from file <x>: Cannot allocate memory (12)"))
    assert out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)")) and out_of_memory(MemoryError())
    assert not out_of_memory(RuntimeError("shape mismatch")) and not out_of_memory(ValueError("out of memory"))


def test_a_crashed_run_exits_1_and_is_marked_failed(tmp_path):
    """A fault injected into the engine (a real process, the real entry point): exit 1, status failed."""
    out = tmp_path / "out"
    code = ("import sys; from lcbench.engine import runner\n"
            "def boom(self, *a, **k): raise RuntimeError('injected fault')\n"
            "runner.Engine.run = boom\n"
            "from lcbench.cli import main\n"
            f"sys.argv = ['lcbench', *{RUN_3 + ['--output-path', str(out)]!r}]\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "injected fault" in proc.stderr
    folder = next(out.glob("*/spec.json")).parent
    state = _state(folder)
    assert state["state"] == "failed" and "RuntimeError: injected fault" in state["error"]
    board = lcbench("leaderboard", str(out), "-o", str(tmp_path / "site"))
    assert board.returncode == 2 and "1 failed" in flat(board.stderr)


def test_failed_runs_are_shown_as_failed_by_report_leaderboard_and_check(tmp_path):
    """A run whose method misses its ratio (ashape at 0.95 on a 320-token context) beside a good one."""
    out = tmp_path / "out"
    proc = lcbench("run", *TINY, "--task-args", "lengths=320,depths=50,max_new_tokens=2",
                   "--method", "ashape,full", "--ratio", "0.95", "--output-path", str(out))
    assert proc.returncode == 2
    failed = next(out.glob("niah__ashape__*"))
    assert _state(failed)["state"] == "failed" and "compression ratio" in _state(failed)["error"]
    report = lcbench("report", str(out), "-o", str(tmp_path / "rep"))
    text = flat(report.stdout)
    assert report.returncode == 0 and "FAILED" in text and "1 failed run(s) left out of the grouped tables" in text
    assert "ashape" not in (tmp_path / "rep" / "by_dataset.md").read_text()
    board = lcbench("leaderboard", str(out), "-o", str(tmp_path / "site"))
    assert board.returncode == 0, board.stderr
    index = (tmp_path / "site" / "index.html").read_text()
    assert "Failed runs" in index and failed.name in index
    # check: the failed run as the new run of a baseline made with a method that passed
    base = tmp_path / "base"
    shutil.copytree(failed, base / failed.name)
    status = base / failed.name / "status.json"
    status.write_text(json.dumps({"state": "complete", "error": None}))
    (base / failed.name / "samples.jsonl").write_text(json.dumps(
        {"sample_id": "x", "turn": 0, "score": 1.0, "achieved_ratio": 0.95}) + "\n")
    check = lcbench("check", "--baseline", str(base), "--new", str(failed))
    assert check.returncode == 1 and "FAILED" in check.stdout and "the new run failed" in flat(check.stdout)
    status.write_text(json.dumps({"state": "failed", "error": "boom"}))  # a failed baseline is no reference
    assert_user_error(lcbench("check", "--baseline", str(base), "--new", str(failed)), "did not complete")
