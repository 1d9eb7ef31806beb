"""Provenance written beside every spec: enough to tie a latency to its hardware and a score to
the exact code (a dirty checkout says so)."""

import subprocess

import lcbench
from lcbench.spec import provenance


def test_provenance_names_hardware_and_exact_code():
    p = provenance()
    hw = p["hardware"]
    assert hw["cpu_threads"] >= 1 and hw["memory_gb"] > 0 and hw["cpu_model"]
    assert {"torch", "transformers", "kvpress"} <= set(p["versions"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=lcbench.REPO_ROOT, capture_output=True, text=True)
    if head.returncode != 0:  # not a git checkout (an installed wheel): nothing to pin
        assert p["git_revision"] is None
        return
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=lcbench.REPO_ROOT,
                           capture_output=True, text=True).stdout.strip()
    assert p["git_revision"] == head.stdout.strip() + ("-dirty" if dirty else "")
