"""``--prefill-chunk``: the context prefilled in chunks gives the same answers as one pass, and
the compressing pass (the last chunk) still sees what the cache stages need."""

import pytest
import torch

from lcbench.engine.chunked import prefill_spans
from lcbench.errors import UserError
from tests.conftest import engine_for
from tests.helpers import make_sample


def test_spans_cut_every_n_tokens_and_merge_a_last_span_shorter_than_the_window():
    assert prefill_spans(10, None) == [(0, 10)]
    assert prefill_spans(10, 16) == [(0, 10)]
    assert prefill_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert prefill_spans(10, 4, window=2) == [(0, 4), (4, 8), (8, 10)]
    assert prefill_spans(10, 4, window=3) == [(0, 4), (4, 10)]


@pytest.mark.parametrize("chunk", [16, 37])
def test_full_cache_chunked_prefill_gives_identical_answers(tiny, chunk):
    model, tok = tiny
    sample = make_sample(3, max_new_tokens=12)
    whole = engine_for(model, tok).run(sample, False)
    chunked_engine = engine_for(model, tok, prefill_chunk=chunk)
    chunked = chunked_engine.run(sample, False)
    assert len(chunked_engine.tokenizer(sample.context)["input_ids"]) > 2 * chunk  # really several chunks
    assert [r["prediction"] for r in chunked] == [r["prediction"] for r in whole]
    assert [r["kv_bytes"] for r in chunked] == [r["kv_bytes"] for r in whole]


def _kept_positions(engine, sample):
    prompt = engine.prepare(sample, False).prompt
    cache = engine.prefill([prompt.context_ids]).cache
    return [layer.positions.clone() for layer in cache.layers]


@pytest.mark.parametrize("method,args", [("snapkv", "window_size=8"), ("streamingllm", None), ("kivi", None)])
def test_compression_keeps_the_same_tokens_when_chunked(tiny, method, args):
    model, tok = tiny
    sample = make_sample(2, max_new_tokens=8)
    whole = engine_for(model, tok, method, 0.5, method_args=args)
    chunked = engine_for(model, tok, method, 0.5, method_args=args, prefill_chunk=24)
    for a, b in zip(_kept_positions(whole, sample), _kept_positions(chunked, sample)):
        assert torch.equal(a, b)
    r_whole, r_chunked = whole.run(sample, False), chunked.run(sample, False)
    assert [r["prediction"] for r in r_chunked] == [r["prediction"] for r in r_whole]
    assert r_chunked[0]["kv_bytes"] == r_whole[0]["kv_bytes"] < r_whole[0]["kv_bytes_full"]


def test_window_longer_than_the_last_chunk_is_still_observed_whole(tiny):
    """window 20 > a last chunk of a few tokens: the last span is merged, SnapKV keeps the same tokens."""
    model, tok = tiny
    sample = make_sample(1)
    n = len(engine_for(model, tok).prepare(sample, False).prompt.context_ids)
    chunk = n - 5  # a 5-token last chunk, shorter than the window
    whole = engine_for(model, tok, "snapkv", 0.5, method_args="window_size=20")
    chunked = engine_for(model, tok, "snapkv", 0.5, method_args="window_size=20", prefill_chunk=chunk)
    for a, b in zip(_kept_positions(whole, sample), _kept_positions(chunked, sample)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["h2o", "qfilters"])
def test_methods_that_need_every_prefill_query_refuse_chunking(tiny, method):
    model, tok = tiny
    with pytest.raises(UserError, match="--prefill-chunk cannot be used with method"):
        engine_for(model, tok, method, 0.5, prefill_chunk=32)


def test_chunk_and_batch_size_change_how_a_run_executes_not_its_id():
    from lcbench.evaluate import build_spec, parse_batch_size

    args = dict(model="tiny-random-llama", method="snapkv", ratio=0.5, task="niah", device="cpu")
    plain = build_spec(**args)
    chunked = build_spec(**args, prefill_chunk=256, batch_size="auto")
    assert chunked.prefill_chunk == 256 and chunked.batch_size == "auto"
    assert chunked.run_id == plain.run_id and build_spec(**args, prefill_chunk=0).prefill_chunk is None
    assert parse_batch_size("16") == 16 and parse_batch_size("AUTO") == "auto"
    for bad in ("0", "many", -2):
        with pytest.raises(UserError, match="--batch-size"):
            parse_batch_size(bad)
