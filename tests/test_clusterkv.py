"""ClusterKV (issue #15): at each decoding step whole key clusters are recalled in the order of
their centroids' scores until the budget is met; sinks and the tokens after the context stay."""

from types import SimpleNamespace

import torch

from conftest import engine_for
from helpers import make_sample
from lcbench.cache.layer import DenseLayer
from lcbench.engine.attention import dense_attention
from lcbench.methods.sparse.clusterkv import ClusterKV

ARGS = "sink=4,tokens_per_cluster=16,dense_layers=0"


def test_ratio_zero_is_full_and_decode_density_follows_the_ratio(tiny):
    model, tok = tiny
    sample = make_sample(2, repeat=30)
    full = engine_for(model, tok).run(sample, False)
    assert [r.decoded_ids for r in engine_for(model, tok, "clusterkv", 0.0, ARGS).run(sample, False)] == \
        [r.decoded_ids for r in full]
    for ratio in (0.25, 0.5, 0.75):
        record = engine_for(model, tok, "clusterkv", ratio, ARGS).run(sample, False)[0]
        assert ratio - 0.05 <= 1 - record["attention_density"] <= ratio + 0.05, (ratio, record)
        assert record["kv_bytes"] == full[0]["kv_bytes"]  # recallable: nothing is evicted


def test_the_cluster_the_query_points_at_is_recalled_first_and_the_budget_is_exact():
    gen = torch.Generator().manual_seed(4)
    d, context = 8, 64
    stage = ClusterKV(ratio=0.75, sink=4, tokens_per_cluster=10, dense_layers=0)
    stage.begin_sample()
    dirs = torch.eye(d)[:6] * 3
    keys = torch.cat([torch.randn(4, d, generator=gen)] + [dirs[i % 6] + 0.1 * torch.randn(1, d, generator=gen)
                                                           for i in range(context - 4)])[None, None]
    values = torch.randn(1, 1, context + 1, d, generator=gen)
    module = SimpleNamespace(num_key_value_groups=1, config=SimpleNamespace())
    assert stage.prefill_attention(module, torch.randn(1, 1, context, d, generator=gen), keys, values[:, :, :context],
                                   None, 0.35, 0) is None
    labels, _, sink, recall, _ = stage._learned[0]
    assert sink == 4 and recall == 16 - 4  # budget = a quarter of 64 tokens, less the sinks
    layer = DenseLayer()
    new_key = torch.randn(1, 1, 1, d, generator=gen)
    layer.append(torch.cat([keys, new_key], dim=2), values, torch.arange(context + 1)[None], None)
    query = (dirs[2] * 2)[None, None, None]  # points at the keys along direction 2 (every 6th key)
    out = stage.decode_attention(module, query, layer, 0.35, 0)
    keep = stage.keep(stage._learned[0], query, layer.keys, torch.ones(1, 1, dtype=torch.bool), 0.35)[0, 0, 0]
    along = [4 + i for i in range(context - 4) if i % 6 == 2]
    assert bool(keep[along].all()) and bool(keep[:4].all()) and bool(keep[-1])
    assert int(keep[4:context].sum()) == recall
    want = dense_attention(module, query, layer.keys, layer.values, keep[None, None, None], 0.35)
    assert torch.allclose(out, want, atol=1e-6)
