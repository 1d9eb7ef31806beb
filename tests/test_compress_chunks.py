"""Compress as you go (``--prefill-chunk N --compress-chunks``, engine/chunked.py): every chunk is a
compressing pass, so the cache never holds the whole context; the last pass keeps exactly what a
one-pass prefill keeps in count (the requested ratio is achieved), and a rule that never revisits a
choice (StreamingLLM) keeps the very same tokens; in query-aware mode the question observes every
chunk and only the last pass keeps it."""

from __future__ import annotations

import json

import pytest
import torch

from lcbench.engine.chunked import prefill_spans
from lcbench.errors import UserError
from lcbench.evaluate import build_spec
from lcbench.methods.base import keep_count
from lcbench.methods.registry import METHODS
from tests.conftest import engine_for
from tests.helpers import make_sample
from tests.test_cli_errors import SMALL_NIAH, TINY, flat, lcbench

torch.set_num_threads(1)


def kept(engine, sample, query_aware=False):
    p = engine.prepare(sample, False)
    ids = p.prompt.context_ids + (p.prompt.turn_ids[0] if query_aware else [])
    cache = engine.prefill([ids], protected=len(p.prompt.turn_ids[0]) if query_aware else 0).cache
    return [layer.positions.clone() for layer in cache.layers], len(p.prompt.context_ids)


def test_streamingllm_as_you_go_keeps_the_tokens_of_one_pass(tiny):
    model, tok = tiny
    sample = make_sample(2, max_new_tokens=8)
    whole = engine_for(model, tok, "streamingllm", 0.5)
    going = engine_for(model, tok, "streamingllm", 0.5, prefill_chunk=24, compress_chunks=True)
    (a, n), (b, _) = kept(whole, sample), kept(going, sample)
    assert n > 3 * 24  # several compressing chunks
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # (the answers may differ: a later chunk's hidden states attended only the kept earlier tokens,
    # so its keys and values are not those of the one-pass prefill — that is what compressing as you go means)
    ra, rb = whole.run(sample, False), going.run(sample, False)
    assert rb[0]["kv_bytes"] == ra[0]["kv_bytes"] and rb[0]["achieved_ratio"] == ra[0]["achieved_ratio"]


class HeldProbe:
    """Records how many tokens each layer held whenever the cache stage ran."""

    def __init__(self, stage):
        self.stage, self.held = stage, []
        self.compress = stage.compress_layer
        stage.compress_layer = self

    def __call__(self, layer, seen):
        self.held.append((seen.layer_idx, layer.seq_len(), seen.protected))
        return self.compress(layer, seen)


@pytest.mark.parametrize("method", ["snapkv", "h2o"])
def test_the_cache_never_holds_the_whole_context_and_the_ratio_is_met(tiny, method):
    model, tok = tiny
    sample = make_sample(1, max_new_tokens=4)
    chunk, ratio = 24, 0.75
    args = "window_size=8" if method == "snapkv" else None
    engine = engine_for(model, tok, method, ratio, method_args=args, prefill_chunk=chunk, compress_chunks=True)
    probe = HeldProbe(engine.chain.stages[0])
    (record,) = engine.run(sample, False)
    n = record["context_tokens"]
    passes = [held for layer, held, _ in probe.held if layer == 0]
    assert len(passes) == len(prefill_spans(n, chunk, engine.chain.needs.window)) > 5  # one compression per chunk
    assert max(passes) <= round(n * (1 - ratio)) + chunk  # kept so far plus one chunk, never the context
    assert max(passes) < n
    assert abs(record["achieved_ratio"] - ratio) < 0.02


def test_query_aware_the_question_observes_every_chunk_and_is_kept_once(tiny):
    model, tok = tiny
    sample = make_sample(1, max_new_tokens=4)
    engine = engine_for(model, tok, "snapkv", 0.5, method_args="window_size=8", prefill_chunk=24,
                        compress_chunks=True, query_aware=True)
    probe = HeldProbe(engine.chain.stages[0])
    positions, n = kept(engine, sample, query_aware=True)
    q = len(engine.prepare(sample, False).prompt.turn_ids[0])
    assert all(protected == q for _, _, protected in probe.held)  # every pass protected the question
    for layer in positions:
        pos = layer[0, 0]
        assert pos[-q:].tolist() == list(range(n, n + q))  # the question once, at its true positions
        assert int((pos < n).sum()) == keep_count(n + q, 0.5) - q  # what one pass keeps (ratio over both)
    (record,) = engine.run(sample, False)
    assert record["prediction"] is not None


def test_refusals_name_the_fix(tiny):
    model, tok = tiny
    with pytest.raises(UserError, match="no --prefill-chunk"):
        engine_for(model, tok, "snapkv", 0.5, compress_chunks=True)
    with pytest.raises(UserError, match="keeps no whole tokens"):
        engine_for(model, tok, "kivi", 0.5, prefill_chunk=24, compress_chunks=True)
    with pytest.raises(UserError, match="2 cache stages"):
        engine_for(model, tok, "snapkv+kivi", 0.5, prefill_chunk=64, compress_chunks=True)
    with pytest.raises(UserError, match="observation window"):
        engine_for(model, tok, "snapkv", 0.5, method_args="window_size=32", prefill_chunk=16, compress_chunks=True)
    assert METHODS.get("snapkv")  # registry intact


def test_cli_run_records_the_setting_and_refuses_without_a_chunk(tmp_path):
    out = tmp_path / "results"
    bad = lcbench("run", *TINY, "--method", "snapkv", "--task-args", SMALL_NIAH, "--compress-chunks",
                  "--output-path", str(out))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--prefill-chunk" in flat(bad.stdout + bad.stderr)
    assert not out.exists()
    ok = lcbench("run", *TINY, "--method", "streamingllm", "--task-args", SMALL_NIAH, "--prefill-chunk", "64",
                 "--compress-chunks", "--output-path", str(out))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (spec_file,) = out.glob("*/spec.json")
    spec = json.loads(spec_file.read_text())["spec"]
    assert spec["compress_chunks"] is True and spec["prefill_chunk"] == 64
    # a run of its own, not a resume of the same run without --compress-chunks (the setting is hashed)
    args = dict(model="tiny-random-llama", method="streamingllm", task_args=SMALL_NIAH, limit=1, prefill_chunk=64)
    assert build_spec(**args, compress_chunks=True).run_id == spec_file.parent.name != build_spec(**args).run_id
