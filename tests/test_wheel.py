"""lcbench as users install it: a wheel built from this working tree, installed into a fresh venv
outside the checkout, must carry its protocol data (``tasks/``) and templates and
run the CLI, a tiny run and a third-party plugin without the source tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_plugins import PLUGIN, PYPROJECT

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "results", ".pytest_cache",
                                "leaderboard", "benchmarks", "examples", "tests")


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """(venv bin folder, env): the wheel built from a copy of the tree, installed with --no-deps into
    a ``--system-site-packages`` venv (torch etc. come from the system, lcbench from the wheel)."""
    src = tmp_path_factory.mktemp("src") / "lcbench-src"
    shutil.copytree(REPO, src, ignore=IGNORE)
    dist = tmp_path_factory.mktemp("dist")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(dist), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next(dist.glob("lcbench-*.whl"))
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                          "--force-reinstall", str(wheel)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(COLUMNS="250", HF_HUB_OFFLINE="1", LCBENCH_DATA=str(tmp_path_factory.mktemp("no_data")),
               LCBENCH_CACHE=str(tmp_path_factory.mktemp("cache")))
    return venv / "bin", env, wheel


def _run(args, env, cwd, **kw):
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300, **kw)


def test_wheel_carries_the_protocol_data(wheel_venv):
    import zipfile

    _, _, wheel = wheel_venv
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in (REPO / "tasks").iterdir():
        if f.suffix in (".toml", ".json", ".txt"):
            assert f"lcbench/_protocol/tasks/{f.name}" in names, f
    assert "lcbench/report/templates/index.html" in names


def test_installed_wheel_lists_and_runs(wheel_venv, tmp_path):
    bin_dir, env, _ = wheel_venv
    where = _run([str(bin_dir / "python"), "-c", "import lcbench, sys; print(lcbench.__file__); "
                  "print(lcbench.protocol_file('tasks', 'niah.toml'))"], env, tmp_path)
    assert where.returncode == 0, where.stderr
    module, protocol = where.stdout.split()
    assert str(bin_dir.parent) in module and str(REPO) not in module  # the wheel, not the checkout
    assert "_protocol" in protocol and str(REPO) not in protocol
    lcbench = str(bin_dir / "lcbench")
    methods = _run([lcbench, "ls", "methods"], env, tmp_path)
    assert methods.returncode == 0 and "snapkv" in methods.stdout and "Traceback" not in methods.stderr
    tasks = _run([lcbench, "ls", "tasks"], env, tmp_path)
    assert tasks.returncode == 0 and "longbench" in tasks.stdout and "ruler" in tasks.stdout, tasks.stderr
    run = _run([lcbench, "run", "--model", "tiny-random-llama", "--method", "snapkv", "--ratio", "0.5",
                "--task", "niah", "--limit", "1", "--output-path", str(tmp_path / "out")], env, tmp_path)
    assert run.returncode == 0, run.stderr
    summary = json.loads(next((tmp_path / "out").glob("*/summary.json")).read_text())
    assert summary["overall"]["n"] == 1
    # offline with no essays anywhere: NIAH's filler fallback, warned and labelled in the table
    assert "filler haystack" in run.stderr and "niah[filler]" in run.stdout


def test_plugin_against_the_installed_wheel(wheel_venv, tmp_path):
    bin_dir, env, _ = wheel_venv
    src = tmp_path / "plugin"
    src.mkdir()
    (src / "lcb_plugin_example.py").write_text(textwrap.dedent(PLUGIN))
    (src / "pyproject.toml").write_text(PYPROJECT)
    # built here (the venv's own bundled setuptools may be too old to build wheels), installed there
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("lcbench_plugin_example-*.whl"))
    pip = _run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
               env, tmp_path)
    assert pip.returncode == 0, pip.stderr
    lcbench = str(bin_dir / "lcbench")
    listed = _run([lcbench, "ls", "methods"], env, tmp_path)
    assert "keep_first" in listed.stdout, listed.stderr
    run = _run([lcbench, "run", "--model", "tiny-random-llama", "--method", "keep_first", "--ratio", "0.5",
                "--task", "echo", "--output-path", str(tmp_path / "out")], env, tmp_path)
    assert run.returncode == 0, run.stderr
    summary = json.loads(next((tmp_path / "out").glob("*/summary.json")).read_text())
    assert summary["method"] == "keep_first" and summary["overall"]["n"] == 2


def test_requires_python_admits_no_python_its_transformers_cannot_install():
    """pyproject's requires-python said >=3.10, but every transformers the pin admits (>=5.21)
    requires 3.11: on 3.10 pip ended in "No matching distribution found for transformers" instead
    of naming the Python. Each Python minor lcbench admits must be one the installed transformers
    (which CI resolves within the pin) admits too; so must the scaffolded plugins' requirement."""
    import tomllib
    from importlib.metadata import metadata

    from packaging.specifiers import SpecifierSet

    repo = Path(__file__).resolve().parents[1]
    ours = SpecifierSet(tomllib.loads((repo / "pyproject.toml").read_text())["project"]["requires-python"])
    theirs = SpecifierSet(metadata("transformers")["Requires-Python"] or "")
    minors = [f"3.{m}" for m in range(8, 20)]
    assert [v for v in minors if v in ours and v not in theirs] == []
    for kind in ("method", "task"):
        template = (repo / "lcbench" / "scaffold" / "templates" / kind / "pyproject.toml.j2").read_text()
        line = next(x for x in template.splitlines() if x.startswith("requires-python"))
        assert SpecifierSet(line.split("=", 1)[1].strip().strip('"')) == ours
