"""Multi-request mode: turns sharing a compressed context decode as one batch, and each answer
equals answering that question alone from the same compressed cache."""

from tests.conftest import engine_for
from tests.helpers import make_sample


def test_batched_turns_equal_single_turns_on_a_compressed_cache(tiny):
    model, tok = tiny
    sample = make_sample(5, max_new_tokens=12)
    batched = engine_for(model, tok, "snapkv", 0.5, method_args="window_size=8", decode_rows=8).run(sample, False)
    alone = engine_for(model, tok, "snapkv", 0.5, method_args="window_size=8", decode_rows=1).run(sample, False)
    assert [r["batch_rows"] for r in batched] == [5] * 5 and [r["batch_rows"] for r in alone] == [1] * 5
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in alone]
    # the compressed context is shared: same kept bytes per turn, about half the full cache
    assert len({r["kv_bytes"] for r in batched}) == 1
    assert abs(batched[0]["achieved_ratio"] - 0.5) < 0.02


def test_skipped_turns_are_not_recomputed(tiny):
    model, tok = tiny
    sample = make_sample(3, max_new_tokens=6)
    records = engine_for(model, tok).run(sample, False, skip_turns={0, 2})
    assert [r["turn"] for r in records] == [1]


def test_query_aware_compresses_each_turn_after_its_question(tiny):
    model, tok = tiny
    sample = make_sample(2, max_new_tokens=6)
    records = engine_for(model, tok, "snapkv", 0.5, method_args="window_size=8", query_aware=True).run(sample, False)
    assert [r["turn"] for r in records] == [0, 1]
    for r in records:
        assert r["question_prefill_s"] == 0.0  # the question was part of the compressing prefill
        assert abs(r["achieved_ratio"] - 0.5) < 0.05
