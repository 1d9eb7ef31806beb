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


def test_discovering_methods_and_tasks_leaves_transformers_model_code_unimported():
    """`lcbench ls` and every refusal of a bad `--method`/`--task`/argument discover the registries and
    build the spec; none of that may import transformers' modeling code (about 5 s of the CLI's 8 before
    lcbench's attention functions registered on first use): only loading a model needs it."""
    import sys

    code = ("import sys; from lcbench.methods.registry import METHODS; from lcbench.tasks.registry import TASKS; "
            "METHODS.names(); TASKS.names(); import lcbench.evaluate, lcbench.cli; "
            "from lcbench.evaluate import build_spec; build_spec(method='snapkv', task='niah', device='cpu'); "
            "print([m for m in ('transformers.modeling_utils', 'transformers.models.llama.modeling_llama') "
            "if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_a_model_attached_after_that_runs_through_lcbench_attention(tiny):
    """The registration that moved out of the import still happens: an attached model's layers call
    lcbench's attention (the probe would refuse the model otherwise)."""
    from transformers import AttentionInterface

    model, _ = tiny
    assert model.config._attn_implementation == "lcbench" and "lcbench" in AttentionInterface._global_mapping
