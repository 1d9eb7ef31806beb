"""`lcbench ls` lists the registries; `lcbench ls methods|tasks NAME` shows one entry in full
(real process: exit codes and output)."""

import os
import shutil
import subprocess

import pytest

LCBENCH = shutil.which("lcbench")
pytestmark = pytest.mark.skipif(LCBENCH is None, reason="the lcbench console script is not installed")


def ls(*args):
    proc = subprocess.run([LCBENCH, "ls", *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "220"})
    return proc.returncode, proc.stdout, " ".join(proc.stderr.split())


def test_one_method_in_full():
    code, out, _ = ls("methods", "snapkv")
    assert code == 0
    for needle in ("kv_dropping", "arXiv:2404.14469", "window_size", "kernel_size", "avg|max", "stages", "cache"):
        assert needle in out


def test_one_task_in_full_with_its_sub_tasks():
    code, out, _ = ls("tasks", "longbench")
    assert code == 0 and "21 sub-tasks" in out
    for dataset in ("narrativeqa", "hotpotqa", "lcc", "passage_retrieval_zh"):
        assert dataset in out


def test_task_list_counts_sub_tasks():
    code, out, _ = ls("tasks")
    assert code == 0 and "21: narrativeqa" in out and "13: niah_single_1" in out


@pytest.mark.parametrize("args, code, message", [
    (["methods", "snapvk"], 2, "Unknown method 'snapvk'. Did you mean 'snapkv'"),
    (["tasks", "rular"], 2, "Unknown task 'rular'. Did you mean 'ruler'"),
    (["models", "x"], 2, "one entry is shown for methods or tasks"),
    (["widgets"], 2, "choose methods, tasks or models"),
])
def test_bad_names(args, code, message):
    got, _, err = ls(*args)
    assert got == code and message in err and "Traceback" not in err
