"""Squeezed Attention (issue #15): k-means clusters of the context's keys, per-key attention
estimated from the centroids, queries attending only the keys whose estimate clears the cut."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import engine_for
from helpers import make_sample
from lcbench.engine.attention import dense_attention
from lcbench.methods.sparse.squeezed import Squeezed, estimated_attention, kmeans_clusters


def test_ratio_zero_is_full_and_density_follows_the_ratio(tiny):
    model, tok = tiny
    sample = make_sample(2, repeat=30)
    full = engine_for(model, tok).run(sample, False)
    args = "observation_window=16,percent_clusters=5"
    assert [r.decoded_ids for r in engine_for(model, tok, "squeezed", 0.0, args).run(sample, False)] == \
        [r.decoded_ids for r in full]
    for ratio in (0.25, 0.5, 0.75):
        record = engine_for(model, tok, "squeezed", ratio, args).run(sample, False)[0]
        assert ratio - Squeezed.tolerance <= 1 - record["attention_density"] <= ratio + 0.05, (ratio, record)
        assert record["kv_bytes"] == full[0]["kv_bytes"]


def test_kmeans_groups_keys_by_direction_and_centroids_are_their_means():
    gen = torch.Generator().manual_seed(0)
    dirs = torch.eye(4)[:3] * 5
    keys = torch.cat([d + 0.1 * torch.randn(6, 4, generator=gen) for d in dirs])[None]  # (1, 18, 4)
    labels, centroids = kmeans_clusters(keys, 3)
    groups = [set(labels[0, 6 * i: 6 * i + 6].tolist()) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set().union(*groups)) == 3
    for i in range(3):
        assert torch.allclose(centroids[0, labels[0, 6 * i]], keys[0, 6 * i: 6 * i + 6].mean(0), atol=1e-6)


def test_estimate_is_the_softmax_with_each_key_replaced_by_its_centroid():
    gen = torch.Generator().manual_seed(2)
    q, cent = torch.randn(3, 8, generator=gen), torch.randn(4, 8, generator=gen)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    counts = torch.bincount(labels, minlength=4).float()
    est = estimated_attention(q, cent, counts, 0.5)
    brute = (q @ cent[labels].T * 0.5).softmax(-1)  # (3, 7) over keys, each its centroid
    assert torch.allclose(est[:, labels], brute, atol=1e-6)


@pytest.mark.parametrize("threshold", ["per_query", "global"])
def test_the_cluster_the_question_points_at_is_attended(threshold):
    gen = torch.Generator().manual_seed(3)
    d, context, q_len = 8, 80, 2
    stage = Squeezed(ratio=0.75, percent_clusters=10, observation_window=8, threshold=threshold)
    stage.begin_sample()
    keys = torch.randn(1, 1, context + q_len, d, generator=gen) * 0.2
    direction = torch.zeros(d)
    direction[0] = 1.0
    keys[0, 0, 30:38] += 4 * direction
    values = torch.randn(1, 1, context + q_len, d, generator=gen)
    ctx_q = torch.randn(1, 1, context, d, generator=gen) * 0.2
    ctx_q[0, 0, -8:] += 2 * direction  # the observation window looks the same way (calibration)
    module = SimpleNamespace(num_key_value_groups=1, config=SimpleNamespace())
    assert stage.prefill_attention(module, ctx_q, keys[:, :, :context], values[:, :, :context], None, 0.35, 0) is None
    labels = stage._learned[0][0]
    question = (2 * direction + 0.05 * torch.randn(q_len, d, generator=gen))[None, None]
    out = stage.prefill_attention(module, question, keys, values, None, 0.35, 0)
    if threshold == "global":
        assert stage._threshold == pytest.approx(float(np.quantile(np.concatenate(stage._calibration), 0.75)))
    # what the question kept, rebuilt: the planted keys' cluster is in it
    reps = stage._learned[0]
    est = estimated_attention(question[0].float(), reps[1], reps[2], 0.35)[0][:, labels[0]]
    cut = (est.topk(round(0.25 * 72), dim=-1).values[:, -1:] if threshold == "per_query"
           else torch.tensor(stage._threshold))
    keep = torch.cat([est >= cut, torch.ones(q_len, context + q_len - 72, dtype=torch.bool)], dim=-1)
    assert bool(keep[:, 30:38].all())
    causal = torch.arange(context + q_len)[None, :] <= torch.arange(context, context + q_len)[:, None]
    want = dense_attention(module, question, keys, values, (causal & keep)[None, None], 0.35)
    assert torch.allclose(out, want, atol=1e-6)
