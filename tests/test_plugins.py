"""Third-party packages register methods and tasks through entry points, without touching
lcbench: a real package is built and installed (into a temporary folder) and used by the CLI."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

PLUGIN = '''
from lcbench.methods.base import Stage
from lcbench.methods.dropping.select import keep_top
from lcbench.params import Param
from lcbench.tasks.base import Task
from lcbench.tasks.sample import Sample, Turn


class KeepFirst(Stage):
    """Keeps the earliest tokens (a plugin method)."""
    name = "keep_first"
    family = "kv_dropping"
    paper = "plugin test"
    stages = ("cache",)
    params = (Param("bias", float, 0.0, "unused"),)

    def compress_layer(self, layer, seen):
        n = seen.context_length
        scores = -layer.positions[..., :n].float()
        return keep_top(layer, scores, self.ratio, seen)


class Echo(Task):
    """A plugin task: the answer is in the question."""
    name = "echo"
    suite = "plugin"
    version = "1"

    def samples(self, env):
        return [Sample(f"e{i}", "Some context. " * 20, [Turn("Say 7.", ["7"], 4, "exact")]) for i in range(2)]

    def score(self, sample, turn, prediction):
        return {"score": float(turn.answers[0] in prediction)}
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"
[project]
name = "lcbench-plugin-example"
version = "0.1"
[project.entry-points."lcbench.methods"]
keep_first = "lcb_plugin_example:KeepFirst"
[project.entry-points."lcbench.tasks"]
echo = "lcb_plugin_example:Echo"
[tool.setuptools]
py-modules = ["lcb_plugin_example"]
'''


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    src = tmp_path_factory.mktemp("plugin_src")
    (src / "lcb_plugin_example.py").write_text(textwrap.dedent(PLUGIN))
    (src / "pyproject.toml").write_text(PYPROJECT)
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(src)], check=True, capture_output=True)
    assert list(target.glob("lcbench_plugin_example-*.dist-info/entry_points.txt"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")])
    env["COLUMNS"] = "250"
    return env


def test_plugin_listed(plugin_env):
    out = subprocess.run([sys.executable, "-m", "lcbench.cli", "ls", "methods"], env=plugin_env,
                         capture_output=True, text=True, check=True).stdout
    assert "keep_first" in out and "plugin test" in out
    out = subprocess.run([sys.executable, "-m", "lcbench.cli", "ls", "tasks"], env=plugin_env,
                         capture_output=True, text=True, check=True).stdout
    assert "echo" in out


def test_plugin_runs_in_the_engine(plugin_env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lcbench.cli", "run", "--model", "tiny-random-llama",
                           "--method", "keep_first", "--ratio", "0.5", "--task", "echo",
                           "--output-path", str(tmp_path)], env=plugin_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(next(tmp_path.glob("*/summary.json")).read_text())
    assert summary["method"] == "keep_first" and summary["overall"]["n"] == 2
    assert abs(summary["overall"]["achieved_ratio"] - 0.5) < 0.05


def test_plugin_absent_without_install():
    from lcbench.methods.registry import METHODS

    assert "keep_first" not in METHODS.names()
