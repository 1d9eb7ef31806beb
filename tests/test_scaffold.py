"""`lcbench new method|task NAME` writes a working one-file plugin package: installed (nothing in
lcbench edited) it is listed, its generated tests pass against the real `lcbench`, its baselines
pass `lcbench check`, and a change that makes the method compress less fails the check (exit 1)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

LCBENCH = shutil.which("lcbench")
pytestmark = pytest.mark.skipif(LCBENCH is None, reason="the lcbench console script is not installed")


def lcbench(*args, env=None, cwd=None):
    return subprocess.run([LCBENCH, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    """Both plugins written by the real CLI and installed into one folder on PYTHONPATH."""
    root = tmp_path_factory.mktemp("plugins")
    site = root / "site"
    for kind, name in (("method", "keep_vnorm"), ("task", "kv_lookup")):
        proc = lcbench("new", kind, name, "--output", root / name)
        assert proc.returncode == 0, proc.stderr
        assert (root / name / f"lcbench_{name}.py").exists()
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(site), str(root / name)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "200"}
    return root, site, env


def test_listed(plugins):
    _, _, env = plugins
    assert "keep_vnorm" in lcbench("ls", "methods", env=env).stdout
    assert "kv_lookup" in lcbench("ls", "tasks", env=env).stdout


@pytest.mark.parametrize("name", ["keep_vnorm", "kv_lookup"])
def test_generated_tests_pass(plugins, name):
    root, _, env = plugins
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=root / name, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout


def test_baselines_pass_check_and_a_regression_fails_it(plugins, tmp_path):
    root, site, env = plugins
    base = tmp_path / "baselines"
    proc = lcbench("run", "--model", "tiny-random-llama", "--method", "full,keep_vnorm", "--ratio", "0.5",
                   "--task", "kv_lookup", "--device", "cpu", "--output-path", base, env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(list(base.glob("*/samples.jsonl"))) == 2
    proc = lcbench("check", "--baseline", base, "--output-path", tmp_path / "same", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the method now removes half of what it should: its check must fail
    module = site / "lcbench_keep_vnorm.py"
    module.write_text(module.read_text().replace("self.scores(layer, seen), self.ratio, seen",
                                                 "self.scores(layer, seen), self.ratio / 2, seen"))
    proc = lcbench("check", "--baseline", base, "--output-path", tmp_path / "worse", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["new", "method", "Bad-Name"], "cannot name a method"),
    (["new", "method", "snapkv"], "already a registered method"),
    (["new", "widget", "x"], "choose one of method, task"),
])
def test_bad_names_are_user_errors(args, message, tmp_path):
    proc = lcbench(*args, "--output", tmp_path / "out")
    assert proc.returncode == 2 and message in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_never_overwrites(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    proc = lcbench("new", "method", "fresh_method", "--output", target)
    assert proc.returncode == 2 and "never overwrites" in proc.stderr
    assert (target / "keep.txt").read_text() == "mine" and len(list(target.iterdir())) == 1
