"""Ltri-LLM (issue #15): spans found from the local triangular attention pattern by triangle score
and NMS, indexed by static/dynamic vectors, and the top spans retrieved for the question prefill
and every decoding step, with the initial tokens and a local window."""

from types import SimpleNamespace

import pytest
import torch

from conftest import engine_for
from helpers import make_sample
from lcbench.cache.layer import DenseLayer
from lcbench.engine.attention import dense_attention
from lcbench.methods.sparse.ltri import Ltri, local_band, nms_spans, triangle_scores

ARGS = "max_span=16"


def test_ratio_zero_is_full_and_density_follows_the_ratio(tiny):
    model, tok = tiny
    sample = make_sample(2, repeat=30)
    full = engine_for(model, tok).run(sample, False)
    same = engine_for(model, tok, "ltri", 0.0, ARGS).run(sample, False)
    assert [r.decoded_ids for r in same] == [r.decoded_ids for r in full]
    for ratio in (0.25, 0.5, 0.75):
        records = engine_for(model, tok, "ltri", ratio, ARGS).run(sample, False)  # checked by the engine
        density = records[0]["attention_density"]
        assert ratio - 0.05 <= 1 - density <= ratio + 0.05, (ratio, density)
        assert records[0]["kv_bytes"] == full[0]["kv_bytes"]  # the whole cache is kept


def test_band_and_triangle_scores_equal_their_definitions():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 12, 8, generator=gen), torch.randn(1, 2, 12, 8, generator=gen)
    width, theta = 4, 0.7
    band = local_band(q, k, 2, 0.3, width)
    dense = torch.zeros(12, 12)
    for h in range(4):
        for i in range(12):
            cols = list(range(max(0, i - width + 1), i + 1))
            dense[i, cols] += (q[0, h, i] @ k[0, h // 2, cols].T * 0.3).softmax(-1)
    for i in range(12):
        for d in range(width):
            assert abs(float(band[i, d]) - (float(dense[i, i - d]) if i - d >= 0 else 0.0)) < 1e-5
    scores = triangle_scores(band, theta, 4)
    for x in range(12):
        for length in range(1, width + 1):
            y = x + length - 1
            if y >= 12:
                assert scores[x, length - 1] == float("-inf")
                continue
            want = sum(float(dense[i, j]) - theta * 4 / min(i + 1, width) for i in range(x, y + 1) for j in range(x, i + 1))
            assert abs(float(scores[x, length - 1]) - want) < 1e-4, (x, length)


def test_nms_takes_the_best_span_and_no_overlaps_and_covers_the_range():
    scores = torch.full((10, 4), -1.0)
    scores[2, 3] = 5.0  # [2, 6)
    scores[3, 1] = 4.0  # [3, 5): overlaps the best, suppressed
    scores[6, 1] = 1.0  # [6, 8)
    spans = nms_spans(scores, 1, 10)
    assert spans == [(1, 2), (2, 6), (6, 8), (8, 10)]


def _planted(seed=1):
    """A 100-token context whose tokens 40..49 attend each other strongly (keys and queries along
    one direction), the rest near-uniform noise."""
    gen = torch.Generator().manual_seed(seed)
    d, context = 16, 100
    direction = torch.zeros(d)
    direction[0] = 1.0
    keys = torch.randn(1, 1, context, d, generator=gen) * 0.1
    queries = torch.randn(1, 1, context, d, generator=gen) * 0.1
    keys[0, 0, 40:50] += 3 * direction
    queries[0, 0, 40:50] += 3 * direction
    return gen, d, context, direction, keys, queries


def test_a_planted_span_is_found_as_one_span_retrieved_and_only_it_attended():
    gen, d, context, direction, ctx_keys, ctx_queries = _planted()
    q_len = 3
    # budget 25 of 100: 3 initial, 12 local, 10 retrieved — exactly the planted span
    stage = Ltri(ratio=0.75, max_span=16, threshold=1.5, index="both", init_share=0.12, local_share=0.48)
    stage.begin_sample()
    assert stage._plan(context) == (3, 12, 10)
    keys = torch.cat([ctx_keys, torch.randn(1, 1, q_len, d, generator=gen) * 0.1], dim=2)
    values = torch.randn(1, 1, context + q_len, d, generator=gen)
    module = SimpleNamespace(num_key_value_groups=1, config=SimpleNamespace())
    assert stage.prefill_attention(module, ctx_queries, ctx_keys, values[:, :, :context], None, 0.25, 0) is None
    bounds = stage._learned[0][0].tolist()
    assert [40, 50] in bounds  # one span, exactly the planted tokens
    assert all(a >= 3 and b <= 88 for a, b in bounds)  # between the initial tokens and the window
    question = (direction * 2 + 0.05 * torch.randn(q_len, d, generator=gen))[None, None]
    out = stage.prefill_attention(module, question, keys, values, None, 0.25, 0)
    slots = torch.arange(context + q_len)
    keep = (slots < 3) | (slots >= 88) | ((slots >= 40) & (slots < 50))
    causal = slots[None, :] <= torch.arange(context, context + q_len)[:, None]
    want = dense_attention(module, question, keys, values, (causal & keep[None])[None, None], 0.25)
    assert torch.allclose(out, want, atol=1e-6)
    # a decoding step pointing elsewhere retrieves other spans, still exactly 10 span tokens
    layer = DenseLayer()
    layer.append(keys, values, torch.arange(context + q_len)[None], None)
    other = -direction[None, None, None] * 2
    got = stage.keep(stage._learned[0], other, layer.keys, torch.ones(1, 1, dtype=torch.bool), 0.25)[0, 0, 0]
    assert int(got[3:88].sum()) == 10 and not bool(got[40:50].all())
    stage.decode_attention(module, other, layer, 0.25, 0)
    assert 0 < stage.sample_stats()["attention_density"] < 0.5


@pytest.mark.parametrize("index", ["static", "dynamic"])
def test_either_index_alone_retrieves_the_planted_span(index):
    gen, d, context, direction, keys, queries = _planted(seed=2)
    stage = Ltri(ratio=0.75, max_span=16, index=index, init_share=0.12, local_share=0.48)
    learned = stage.learn(queries, keys, 0.25, 1, 0)
    bounds = learned[0].tolist()
    best = stage.ranked_spans(learned, direction[None, None, None] * 2, torch.ones(1, 1, dtype=torch.bool))[0, 0]
    assert bounds[int(best)] == [40, 50]


@pytest.mark.parametrize("voting", [True, False])
def test_heads_vote_for_spans_and_the_winner_is_kept(voting):
    """Head 0 points hard at span 0, heads 1 and 2 mildly at span 1: the summed score ranks span 0
    first, the heads' votes (one span fits the budget) rank span 1 first."""
    e = torch.eye(4)
    bounds = torch.tensor([[0, 4], [4, 8], [8, 12]])
    index = torch.stack([e[0], e[1], e[2]])[None]  # (Hkv=1, S=3, D)
    label = torch.arange(12) // 4
    learned = (bounds, index, index, 0, 12, 4, label)
    stage = Ltri(ratio=0.5, voting=voting)
    query = torch.stack([10 * e[0], e[1] + 0.5 * e[2], e[1] + 0.5 * e[2]])[None, :, None]  # (1, 3, 1, 4)
    valid = torch.ones(1, 1, dtype=torch.bool)
    order = stage.ranked_spans(learned, query, valid)[0].tolist()
    assert order == ([1, 0, 2] if voting else [0, 1, 2])
    keep = stage.keep(learned, query, torch.zeros(1, 1, 13, 4), valid, 1.0)[0, 0, 0]
    kept_span = (4, 8) if voting else (0, 4)
    want = torch.zeros(13, dtype=torch.bool)
    want[kept_span[0]:kept_span[1]] = True
    want[12] = True  # after the context
    assert keep.tolist() == want.tolist()
