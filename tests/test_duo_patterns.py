"""DuoAttention's trained patterns from the official repository (pattern=official), fetched through
a loopback stand-in for raw.githubusercontent.com (``LCBENCH_MIRROR``), cached, then read offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lcbench.errors import UserError
from lcbench.methods.dropping import duo_patterns
from lcbench.methods.dropping.duoattention import DuoAttention
from lcbench.models.tiny import tiny_llama, tiny_tokenizer
from tests.hubserver import StandIn

LLAMA31 = duo_patterns.PATTERNS["meta-llama/Llama-3.1-8B-Instruct"]
# a pattern shaped for the tiny model (2 layers × 2 KV heads); scores outside [0, 1] are clipped
SCORES = np.array([[0.9, -0.2], [0.4, 1.7]])
CONFIG = {"sink_size": 4, "recent_size": 12}


def _mirror(name: str) -> dict[tuple[str, str], bytes]:
    out = {}
    for file, body in [("config.json", json.dumps(CONFIG).encode()),
                       ("full_attention_heads.tsv", "\n".join("\t".join(str(v) for v in row) for row in SCORES).encode())]:
        host, _, path = duo_patterns.url(name, file).split("://", 1)[1].partition("/")
        out[host, path] = body
    return out


@pytest.fixture
def served(tmp_path, monkeypatch):
    server = StandIn(mirror=_mirror(LLAMA31), hub_like=False).start()
    monkeypatch.setenv("LCBENCH_MIRROR", server.endpoint)
    monkeypatch.setenv("LCBENCH_CACHE", str(tmp_path / "cache"))
    for name in ("LCBENCH_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    yield server
    if server.thread.is_alive():
        server.stop()


def test_official_pattern_by_the_checkpoints_hub_id_fetched_once_then_offline(served):
    """pattern=official on a checkpoint loaded as meta-llama/Llama-3.1-8B-Instruct fetches that
    checkpoint's trained gates at the pinned commit; the lowest-scoring head streams first and the
    run's sink/recent come from the pattern's config. With the server gone, the cache serves."""
    model = tiny_llama()
    model.config._name_or_path = "meta-llama/Llama-3.1-8B-Instruct"
    stage = DuoAttention(0.5, pattern="official")
    stage.calibration = stage.calibrate(model, tiny_tokenizer())
    assert np.allclose(stage.calibration["scores"].numpy(), np.clip(SCORES, 0, 1))
    assert stage.window() == (4, 12) and stage.streaming_order()[0] == (0, 1)
    assert stage.calibration["source"].endswith(f"/{duo_patterns.COMMIT}/attn_patterns/{LLAMA31}/")
    fetched = [path for _, path in served.log]
    assert len(fetched) == 2 and all(duo_patterns.COMMIT in p for p in fetched)
    served.stop()
    again = DuoAttention(0.5, pattern=f"official:{LLAMA31}").calibrate(model, tiny_tokenizer())
    assert np.allclose(again["scores"].numpy(), stage.calibration["scores"].numpy())


def test_official_pattern_errors_name_the_fix(served, monkeypatch):
    model = tiny_llama()
    model.config._name_or_path = "someone/unknown-model"
    with pytest.raises(UserError, match="no trained pattern for 'someone/unknown-model'.*Fix"):
        DuoAttention(0.5, pattern="official").calibrate(model, tiny_tokenizer())
    with pytest.raises(UserError, match="must name attn_patterns/<model>/<run>"):
        DuoAttention(0.5, pattern="official:Meta-Llama-3.1-8B-Instruct").calibrate(model, tiny_tokenizer())
    with pytest.raises(UserError, match="could not fetch .*404"):
        DuoAttention(0.5, pattern="official:Nope/run").calibrate(model, tiny_tokenizer())
    monkeypatch.setenv("LCBENCH_OFFLINE", "1")
    with pytest.raises(UserError, match="LCBENCH_OFFLINE forbids downloads"):
        DuoAttention(0.5, pattern=f"official:{LLAMA31}").calibrate(model, tiny_tokenizer())


def test_cli_runs_an_official_pattern_and_refuses_with_exit_2_when_it_cannot_be_fetched(served, tmp_path):
    exe = shutil.which("lcbench")
    cmd = [exe] if exe else [sys.executable, "-m", "lcbench.cli"]

    def run(out: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd + ["run", "--model", "tiny-random-llama", "--method", "duoattention", "--ratio", "0.5",
                                     "--method-args", f"pattern=official:{LLAMA31}", "--task", "niah", "--task-args",
                                     "lengths=400,depths=50,max_new_tokens=4", "--output-path", str(tmp_path / out)],
                              env=dict(os.environ), capture_output=True, text=True, timeout=300)

    ok = run("out")
    assert ok.returncode == 0, ok.stderr[-2000:]
    record = json.loads(next((tmp_path / "out").rglob("samples.jsonl")).read_text().splitlines()[0])
    assert record["measured"]["achieved_ratio"] >= 0.45
    served.stop()
    shutil.rmtree(tmp_path / "cache")
    down = run("down")
    assert down.returncode == 2 and "Traceback" not in down.stderr
    assert "could not fetch" in " ".join(down.stderr.split())
