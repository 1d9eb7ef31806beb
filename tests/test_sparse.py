"""Sparse attention: the kernel computes exactly the pattern it reports, the methods meet their
density targets, ratio 0 is token-identical to ``full``, and chains with cache stages run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lcbench.cache.layer import DenseLayer
from lcbench.engine import runner
from lcbench.engine.runner import Engine, EngineConfig
from lcbench.methods.chain import Chain, resolve_chain
from lcbench.methods.registry import METHODS
from lcbench.methods.sparse.kernel import BlockPattern, block_sparse_attention, causal_block_pairs
from lcbench.methods.sparse.quest import page_bounds
from lcbench.methods.sparse.vertical_slash import slash_blocks
from helpers import make_sample

torch.set_num_threads(1)  # steadier than 2 on a shared 2-core machine

PREFILL_METHODS = {
    "ashape": "block_size=16,sink_tokens=16",
    "trishape": "block_size=16,sink_tokens=16,last_queries=16",
    "vertical_slash": "block_size=16,sink_columns=4,local_slashes=8,last_queries=16",
    "block_topk": "block_size=16",
}
ALL_METHODS = {**PREFILL_METHODS, "quest": "page_size=8,dense_layers=0"}
MODULE = SimpleNamespace(num_key_value_groups=2, config=SimpleNamespace(num_hidden_layers=2))


def reference(query, key, value, mask, scaling):
    """Dense fp32 attention restricted to ``mask`` (B, Hkv, L, L), as (B, L, Hq, D)."""
    g = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(query, key.repeat_interleave(g, 1), value.repeat_interleave(g, 1),
                                         attn_mask=mask.repeat_interleave(g, 1), scale=scaling)
    return out.transpose(1, 2)


def qkv(L=150, B=1, Hq=4, Hkv=2, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, L, D, generator=gen), torch.randn(B, Hkv, L, D, generator=gen),
            torch.randn(B, Hkv, L, D, generator=gen))


def stage(name: str, ratio: float, args: str | None = None):
    spec = resolve_chain(name, args if args is not None else ALL_METHODS[name], ratio)
    return METHODS.get(name)(ratio=spec[0]["ratio"], **spec[0]["args"])


# --- the kernel ------------------------------------------------------------------------------
def test_causal_block_pairs_sum_to_all_causal_pairs():
    pairs = causal_block_pairs(70, 16)
    assert pairs.shape == (5, 5)
    assert int(pairs.sum()) == 70 * 71 // 2
    assert int(pairs[4, 4]) == 6 * 7 // 2 and int(pairs[4, 0]) == 6 * 16 and int(pairs[0, 4]) == 0


@pytest.mark.parametrize("with_columns", [False, True])
def test_kernel_equals_dense_attention_on_its_mask(with_columns):
    q, k, v = qkv(L=70, B=2)
    gen = torch.Generator().manual_seed(1)
    blocks = torch.rand(2, 2, 5, 5, generator=gen) < 0.4
    cols = torch.stack([torch.randperm(70, generator=gen)[:6].sort().values for _ in range(4)]).view(2, 2, 6)
    pattern = BlockPattern(blocks, 16, 70, cols if with_columns else None)
    out = block_sparse_attention(q, k, v, pattern, 0.3)
    mask = pattern.dense_mask()
    assert torch.allclose(out, reference(q, k, v, mask, 0.3), atol=1e-5)
    assert pattern.density() == pytest.approx(mask.sum().item() / (4 * 70 * 71 / 2))
    assert bool(pattern.blocks.diagonal(dim1=2, dim2=3).all())  # every query sees itself


def test_kernel_with_every_block_is_dense_attention():
    q, k, v = qkv(L=100)
    pattern = BlockPattern(torch.ones(1, 2, 4, 4, dtype=torch.bool), 32, 100)
    assert pattern.density() == 1.0
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                           is_causal=True, scale=0.25).transpose(1, 2)
    assert torch.allclose(block_sparse_attention(q, k, v, pattern, 0.25), dense, atol=1e-5)


# --- each method's pattern ---------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PREFILL_METHODS))
@pytest.mark.parametrize("target", [0.5, 0.25])
def test_method_output_equals_dense_on_its_pattern_and_meets_density(name, target):
    q, k, v = qkv(L=1024)
    s = stage(name, 1 - target)
    s.begin_sample()
    pattern = s.pattern(q, k, 2, 0.25)
    assert target - 0.1 <= pattern.density() <= target + 1e-9
    out = s.prefill_attention(MODULE, q, k, v, None, 0.25, 0)
    assert torch.allclose(out, reference(q, k, v, pattern.dense_mask(), 0.25), atol=1e-5)
    assert s.sample_stats()["attention_density"] == pytest.approx(pattern.density())


def test_ashape_pattern_is_sinks_plus_local_window():
    q, k, _ = qkv(L=128)
    pattern = stage("ashape", 0.5).pattern(q, k, 2, 0.25)
    blocks = pattern.blocks[0, 0].int()
    local = int(blocks[7].sum()) - 1  # row 7 attends the sink block and its local window
    assert blocks[:, 0].all() and blocks.diagonal().all()
    assert blocks[7, 8 - local:].all() and not blocks[7, 1: 8 - local].any()
    tri = stage("trishape", 0.5).pattern(q, k, 2, 0.25).blocks[0, 0]
    assert bool(tri[-1].all())  # the last queries attend densely


def test_slash_blocks_cover_their_diagonals():
    offsets = torch.tensor([[[0, 5, 16, 37]]])
    blocks = slash_blocks(offsets, nb=6, block_size=16)
    element = BlockPattern(blocks, 16, 96).dense_mask()[0, 0]
    r, c = torch.meshgrid(torch.arange(96), torch.arange(96), indexing="ij")
    for o in offsets.flatten().tolist():
        assert bool(element[(r - c) == o].all()), o


def test_vertical_slash_keeps_sink_columns_and_local_diagonals():
    q, k, _ = qkv(L=256)
    pattern = stage("vertical_slash", 0.6).pattern(q, k, 2, 0.25)
    mask = pattern.dense_mask()
    assert bool(mask[..., 16:, :4].all())  # the 4 sink columns, for every later query
    r, c = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    assert bool(mask[..., ((r - c) >= 0) & ((r - c) < 8)].all())  # the 8 nearest diagonals


def test_block_topk_finds_a_planted_block():
    q, k, v = qkv(L=256)
    u = 4.0 * F.normalize(torch.randn(16, generator=torch.Generator().manual_seed(7)), dim=0)
    q += u  # every query shares a direction that only key block 5 has
    k[:, :, 80:96] += u
    pattern = stage("block_topk", 0.6).pattern(q, k, 2, 0.25)
    assert bool(pattern.blocks[..., 6:, 5].all())


# --- Quest ------------------------------------------------------------------------------------
def make_layer(L=100, B=1, Hkv=2, D=16, seed=0, valid=None):
    _, k, v = qkv(L=L, B=B, Hkv=Hkv, D=D, seed=seed)
    layer = DenseLayer()
    layer.append(k, v, torch.arange(L)[None].expand(B, L), valid)
    return layer


def test_page_bounds_bound_every_key():
    layer = make_layer(L=37)
    kmin, kmax = page_bounds(layer.keys, None, 8)
    assert kmin.shape == (1, 2, 5, 16)
    pages = torch.arange(37) // 8
    assert bool((layer.keys >= kmin[:, :, pages]).all() and (layer.keys <= kmax[:, :, pages]).all())


def test_quest_equals_dense_attention_on_the_pages_it_selects():
    layer = make_layer(L=100)
    q = torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(3))
    s = stage("quest", 0.5)
    s.begin_sample()
    out = s.decode_attention(MODULE, q, layer, 0.25, 1)
    # the selection, recomputed independently: 12 whole pages of 8 + the partial page (4 tokens)
    keys = layer.keys[:, :, :96].reshape(1, 2, 12, 8, 16)
    qg = q.reshape(1, 2, 2, 1, 1, 16)
    bound = torch.maximum(qg * keys.amin(3)[:, :, None, :, None], qg * keys.amax(3)[:, :, None, :, None]).sum(-1)
    bound = bound.amax(2)[..., 0]  # (1, 2, 12): best bound in the group
    keep = int(13 * 0.5) - 1  # 13 pages, one of them the partial newest page (always kept)
    mask = torch.zeros(1, 2, 1, 100, dtype=torch.bool)
    for h in range(2):
        for p in bound[0, h].topk(keep).indices.tolist():
            mask[0, h, 0, p * 8:(p + 1) * 8] = True
    mask[..., 96:] = True
    ref = F.scaled_dot_product_attention(q, layer.keys.repeat_interleave(2, 1), layer.values.repeat_interleave(2, 1),
                                         attn_mask=mask.repeat_interleave(2, 1), scale=0.25).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-6)
    assert s.sample_stats()["decode_attention_density"] == pytest.approx((keep * 8 + 4) / 100)


def test_quest_page_bounds_are_updated_incrementally():
    layer = make_layer(L=64)
    s = stage("quest", 0.5)
    s.begin_sample()
    q = torch.randn(1, 4, 1, 16)
    s.decode_attention(MODULE, q, layer, 0.25, 1)
    extra = make_layer(L=20, seed=5)
    layer.append(extra.keys, extra.values, torch.arange(64, 84)[None], None)
    kmin, kmax = s._page_bounds(1, layer, layer.keys, 8)
    ref_min, ref_max = page_bounds(layer.keys[:, :, :80], None, 8)
    assert torch.equal(kmin, ref_min) and torch.equal(kmax, ref_max)


def test_quest_ignores_padding_slots():
    valid = torch.ones(2, 60, dtype=torch.bool)
    valid[1, :20] = False  # row 1 is left-padded
    layer = make_layer(L=60, B=2, valid=valid)
    s = stage("quest", 0.5)
    s.begin_sample()
    out = s.decode_attention(MODULE, torch.randn(2, 4, 1, 16), layer, 0.25, 1)
    assert torch.isfinite(out).all()
    assert s.sample_stats()["decode_attention_density"] <= 0.6


# --- through the engine ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample():
    return make_sample(n_turns=2, max_new_tokens=8)


def run(tiny, sample, method: str, ratio: float, args: str | None = None, spec=None, query_aware=False):
    """The engine's records, each with the token ids it decoded under ``_ids``."""
    model, tok = tiny
    chain = Chain.build(spec, ratio) if spec else Chain.build(resolve_chain(method, args, ratio), ratio)
    decoded, real = [], runner.greedy_decode
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "greedy_decode", lambda *a, **k: decoded.extend(real(*a, **k)) or decoded[-len(a[3]):])
        recs = Engine(model, tok, chain, EngineConfig(query_aware=query_aware)).run(sample, multi_turn=False)
    return [{**rec, "_ids": row.tokens} for rec, row in zip(recs, decoded)]


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_ratio_zero_is_token_identical_to_full(tiny, sample, name):
    full = run(tiny, sample, "full", 0.0)
    recs = run(tiny, sample, name, 0.0, ALL_METHODS[name])
    assert [r["_ids"] for r in recs] == [r["_ids"] for r in full]
    assert recs[0]["attention_density"] == 1.0


def test_density_near_one_runs_the_kernel_and_stays_token_identical(tiny, sample):
    full = run(tiny, sample, "full", 0.0)
    recs = run(tiny, sample, "ashape", 0.001, "block_size=16,sink_tokens=4096")  # sinks cover everything
    assert recs[0]["attention_density"] == 1.0  # every block, computed block by block by the kernel
    assert [r["_ids"] for r in recs] == [r["_ids"] for r in full]


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_records_report_density_next_to_the_full_cache(tiny, sample, name):
    full = run(tiny, sample, "full", 0.0)
    recs = run(tiny, sample, name, 0.5, ALL_METHODS[name])
    rec = recs[0]
    assert 0.4 <= rec["attention_density"] <= 0.5 + 1e-9
    assert rec["kv_bytes"] == full[0]["kv_bytes"]  # sparse attention keeps the whole cache
    key = "decode_attention_density" if name == "quest" else "prefill_attention_density"
    assert rec[key] == rec["attention_density"]


def test_query_aware_sparse_prefill_covers_context_and_question(tiny, sample):
    recs = run(tiny, sample, "trishape", 0.5, ALL_METHODS["trishape"], query_aware=True)
    assert len(recs) == 2 and all(0.3 <= r["attention_density"] <= 0.5 for r in recs)


@pytest.mark.parametrize("cache_stage,args", [("snapkv", {"window_size": 16}), ("kivi", {})])
def test_sparse_prefill_composes_with_a_cache_stage(tiny, sample, cache_stage, args):
    """ashape's ratio is a density and the cache stage's a KV share, so each is given its own
    (the requested ratio of the chain is the KV one, which the engine checks)."""
    spec = [{"name": "ashape", "ratio": 0.5, "args": METHODS.get("ashape")(block_size=16, sink_tokens=16).args},
            {"name": cache_stage, "ratio": 0.5, "args": METHODS.get(cache_stage)(**args).args}]
    full = run(tiny, sample, "full", 0.0)
    recs = run(tiny, sample, "", 0.5, spec=spec)
    assert recs[0]["attention_density"] <= 0.5
    assert recs[0]["kv_bytes"] <= 0.55 * full[0]["kv_bytes"]
    assert recs[0]["achieved_ratio"] >= 0.45
