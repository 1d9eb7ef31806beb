"""RetrievalAttention (issue #15): each decoding step attends the initial and recent tokens and the
context keys with the highest query·key products (an exact vector search)."""

from types import SimpleNamespace

import torch

from conftest import engine_for
from helpers import make_sample
from lcbench.cache.layer import DenseLayer
from lcbench.engine.attention import dense_attention
from lcbench.methods.sparse.retr_attn import RetrievalAttention


def test_ratio_zero_is_full_and_decode_density_follows_the_ratio(tiny):
    model, tok = tiny
    sample = make_sample(2, repeat=30)
    full = engine_for(model, tok).run(sample, False)
    assert [r.decoded_ids for r in engine_for(model, tok, "retr_attn", 0.0).run(sample, False)] == \
        [r.decoded_ids for r in full]
    for ratio in (0.25, 0.5, 0.75):
        record = engine_for(model, tok, "retr_attn", ratio).run(sample, False)[0]
        assert ratio - 0.05 <= 1 - record["attention_density"] <= ratio + 0.05, (ratio, record)


def test_the_keys_retrieved_are_the_query_s_top_products_plus_the_static_tokens():
    gen = torch.Generator().manual_seed(5)
    d, context = 8, 200
    stage = RetrievalAttention(ratio=0.75)
    stage.begin_sample()
    keys = torch.randn(1, 1, context, d, generator=gen)
    values = torch.randn(1, 1, context + 1, d, generator=gen)
    module = SimpleNamespace(num_key_value_groups=1, config=SimpleNamespace())
    stage.prefill_attention(module, torch.randn(1, 1, context, d, generator=gen), keys, values[:, :, :context],
                            None, 0.35, 0)
    start, recent, top_k, _ = stage._learned[0]
    assert start + recent + top_k == 50 and top_k > 0  # a quarter of 200, upstream's shares
    layer = DenseLayer()
    layer.append(torch.cat([keys, torch.randn(1, 1, 1, d, generator=gen)], dim=2), values,
                 torch.arange(context + 1)[None], None)
    query = torch.randn(1, 1, 1, d, generator=gen)
    out = stage.decode_attention(module, query, layer, 0.35, 0)
    products = (query[0, 0, 0] @ keys[0, 0, start:context - recent].T)
    want_keep = torch.zeros(context + 1, dtype=torch.bool)
    want_keep[:start] = True
    want_keep[context - recent:] = True
    want_keep[start + products.topk(top_k).indices] = True
    want = dense_attention(module, query, layer.keys, layer.values, want_keep[None, None, None], 0.35)
    assert torch.allclose(out, want, atol=1e-6)
    assert stage.sample_stats()["attention_density"] == float(want_keep.sum()) / (context + 1)
