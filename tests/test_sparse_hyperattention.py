"""HyperAttention: the output is the weighted softmax over exactly the pairs it reports (checked
against a dense reference rebuilt from its hashes and samples), its density meets the target,
ratio 0 is ``full``, and sortLSH puts a query's near-duplicate key in its block."""

from __future__ import annotations

import math

import pytest
import torch

from lcbench.methods.sparse.hyperattention import gray_order, lsh_order
from helpers import make_sample
from test_sparse import MODULE, qkv, run, stage

ARGS = "leaf_blocks=2"


def dense_weights(plan, B: int, H: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, L, L) weight of each pair in the output's softmax (0: not computed), and how many
    times each pair is computed (a key sampled twice is computed twice)."""
    W = torch.zeros(B, H, L, L, dtype=torch.float64)
    C = torch.zeros(B, H, L, L)
    for a, b in plan.leaves:
        W[..., a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.float64).tril()
        C[..., a:b, a:b] = torch.ones(b - a, b - a).tril()
    for q0, nq, k0, nk in plan.rects:
        W[..., q0:q0 + nq, k0:k0 + nk] = 1.0
        C[..., q0:q0 + nq, k0:k0 + nk] = 1.0
    for p in plan.pieces:
        nq, nk = p.q_order.shape[-1], p.k_order.shape[-1]
        nb = math.ceil(nk / p.block)
        bq = math.ceil(nq / nb)
        m = p.samples.shape[-1]
        for b in range(B):
            for h in range(H):
                qi = p.q0 + p.q_order[b, h]
                ki = p.k0 + p.k_order[b, h]
                for r in range(nq):
                    blk = r // bq
                    W[b, h, qi[r], ki[blk * p.block: (blk + 1) * p.block]] = 1.0
                    C[b, h, qi[r], ki[blk * p.block: (blk + 1) * p.block]] = 1.0
                    for t in p.samples[b, h].tolist():
                        if t // p.block != blk:
                            W[b, h, qi[r], ki[t]] += nk / m
                            C[b, h, qi[r], ki[t]] += 1
    return W, C


@pytest.mark.parametrize("target", [0.75, 0.5, 0.25])
def test_output_is_the_weighted_softmax_over_its_pairs_and_meets_density(target):
    q, k, v = qkv(L=300)
    s = stage("hyperattention", 1 - target, ARGS)
    s.begin_sample()
    out = s.prefill_attention(MODULE, q, k, v, None, 0.25, 0)
    density = s.sample_stats()["attention_density"]
    assert target - s.tolerance <= density <= target + 1e-9
    _, plan = s.run(q, k, v, 0.25, 0)  # the same seed: the same plan
    W, C = dense_weights(plan, 1, 4, 300)
    assert float(C.sum()) / (4 * 300 * 301 / 2) == pytest.approx(density, abs=1e-9)
    scores = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.25 + W.log()
    ref = scores.softmax(-1) @ v.double().repeat_interleave(2, 1)
    assert torch.allclose(out.double(), ref.transpose(1, 2), atol=1e-5)


def test_gray_order_ranks_neighbouring_buckets_one_bit_apart():
    rank = gray_order(4)
    order = rank.argsort()  # bucket ids in sort order
    assert sorted(rank.tolist()) == list(range(16))
    assert all(bin(int(a) ^ int(b)).count("1") == 1 for a, b in zip(order[:-1], order[1:]))


def test_sort_lsh_puts_a_near_duplicate_key_in_the_query_block():
    """The paper's premise: the large entries of the attention are found by sorting queries and
    keys by LSH bucket. Each query is a scaled near-copy of one key, so the two hash alike and
    land in the same block after sorting (far more often than the block's share of keys)."""
    gen = torch.Generator().manual_seed(0)
    n, D, block = 512, 16, 32
    k = torch.randn(1, 1, n, D, generator=gen)
    partner = torch.randperm(n, generator=gen)
    q = 3.0 * k[:, :, partner] + 0.05 * torch.randn(1, 1, n, D, generator=gen)
    proj, rank = torch.randn(D, 7, generator=gen), gray_order(7)
    q_rank = lsh_order(q, proj, rank)[0, 0].argsort()  # sorted position of each query
    k_rank = lsh_order(k, proj, rank)[0, 0].argsort()
    same = (q_rank // block == k_rank[partner] // block).float().mean()
    assert float(same) > 0.7  # vs block / n = 0.0625 by chance


def test_ratio_zero_is_token_identical_and_engine_reports_density(tiny):
    sample = make_sample(n_turns=2, max_new_tokens=8)
    full = run(tiny, sample, "full", 0.0)
    zero = run(tiny, sample, "hyperattention", 0.0, ARGS)
    assert [r["_ids"] for r in zero] == [r["_ids"] for r in full]
    rec = run(tiny, sample, "hyperattention", 0.5, ARGS)[0]
    assert 0.45 <= rec["attention_density"] <= 0.5 + 1e-9 and rec["kv_bytes"] == full[0]["kv_bytes"]
