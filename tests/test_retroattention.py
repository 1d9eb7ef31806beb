"""RetroAttention: the log-sum-exp revision of a past query's output is dense attention over the
union of the pages it attended and the pages a later step loaded; the current token attends
exactly Quest's pages; ratio 0 is token-identical to full, and the attended density is Quest's."""

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
from lcbench.methods.sparse.retroattention import masked_attention, merge
from helpers import make_sample

torch.set_num_threads(1)

MODULE = SimpleNamespace(num_key_value_groups=1, config=SimpleNamespace(num_hidden_layers=1))
PS, D = 4, 8


def dense(q, keys, values, mask, scaling):
    """Reference: SDPA of q (B, Hq, D) over the slots of ``mask`` (B, Hkv, L)."""
    g = q.shape[1] // keys.shape[1]
    out = F.scaled_dot_product_attention(q[:, :, None].double(), keys.repeat_interleave(g, 1).double(),
                                         values.repeat_interleave(g, 1).double(),
                                         attn_mask=mask.repeat_interleave(g, 1)[:, :, None], scale=scaling)
    return out[:, :, 0].float()


def test_lse_merge_of_two_disjoint_parts_is_attention_over_their_union():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 16, generator=gen)
    k, v = torch.randn(2, 2, 40, 16, generator=gen), torch.randn(2, 2, 40, 16, generator=gen)
    a = torch.rand(2, 2, 40, generator=gen) < 0.3
    b = (torch.rand(2, 2, 40, generator=gen) < 0.3) & ~a
    b[1, 1] = False  # a head the later step adds nothing to: its output must stay as it was
    oa, la = masked_attention(q, k, v, a, 0.25)
    ob, lb = masked_attention(q, k, v, b, 0.25)
    out, lse = merge(oa, la, ob, lb)
    assert torch.allclose(out, dense(q, k, v, a | b, 0.25), atol=1e-5)
    assert torch.allclose(out[1, 2:], oa[1, 2:]) and torch.equal(lse[1, 2:], la[1, 2:])
    assert torch.isinf(lb[1, 2:]).all() and (lb[1, 2:] < 0).all()


def planted_layer(L=33, seed=0):
    """Keys of whole page p (slots 4p..4p+3) point along axis p (8 pages); the rest is small noise."""
    gen = torch.Generator().manual_seed(seed)
    keys = 0.1 * torch.randn(1, 1, L, D, generator=gen)
    for p in range(min(L // PS, D)):
        keys[0, 0, p * PS:(p + 1) * PS, p] += 5.0
    layer = DenseLayer()
    layer.append(keys, torch.randn(1, 1, L, D, generator=gen), torch.arange(L)[None], None)
    return layer


def step(stage, layer, axis, seed, also=None):
    """Append one token, then decode a query along ``axis`` (and less along ``also``) on ``layer``;
    Quest's output."""
    gen = torch.Generator().manual_seed(seed)
    k, v = 0.1 * torch.randn(1, 1, 1, D, generator=gen), torch.randn(1, 1, 1, D, generator=gen)
    L = layer.seq_len()
    layer.append(k, v, torch.tensor([[L]]), None)
    q = torch.zeros(1, 1, 1, D)
    q[..., axis] = 3.0
    if also is not None:
        q[..., also] = 2.0
    return q, stage.decode_attention(MODULE, q, layer, 0.5, 0)


def stage(ratio=0.75, **args):
    s = METHODS.get("retroattention")(ratio=ratio, page_size=PS, dense_layers=0, **args)
    s.begin_sample()
    return s


def slots(*ranges):
    m = torch.zeros(1, 1, 34, dtype=torch.bool)
    for a, b in ranges:
        m[..., a:b] = True
    return m


def test_a_past_query_is_revised_to_attention_over_its_pages_and_the_new_ones():
    """9 pages, budget 2 (one whole page + the partial newest): the first query (along axis 1,
    less along 5) attends page 1 and its own tail (slot 32); the next query (axis 5) loads page 5. The revised
    first output is dense attention over pages 1 and 5 and slot 32 — not slot 33, after it."""
    s, layer = stage(), planted_layer(L=32)
    q0, out0 = step(s, layer, 1, seed=1, also=5)
    entry = s.output_cache(0)[0]
    keys, values = layer.dense()
    own = slots((4, 8), (32, 33))[..., :33]
    assert torch.allclose(out0[:, 0], dense(q0[:, :, 0], keys, values, own, 0.5), atol=1e-5)  # Quest's pages
    assert torch.allclose(entry["out"], out0[:, 0], atol=1e-5)  # the cache holds what Quest computed
    q1, out1 = step(s, layer, 5, seed=2)
    keys, values = layer.dense()
    assert torch.allclose(out1[:, 0], dense(q1[:, :, 0], keys, values, slots((20, 24), (32, 34)), 0.5), atol=1e-5)
    past, now = s.output_cache(0)
    union = slots((4, 8), (20, 24), (32, 33))
    assert torch.allclose(past["out"], dense(q0[:, :, 0], keys[..., :33, :], values[..., :33, :], union[..., :33], 0.5),
                          atol=1e-5)
    assert not torch.allclose(past["out"], out0[:, 0], atol=1e-3)  # the revision changed it
    assert past["added"] == 4 and now["added"] == 0
    stats = s.sample_stats()
    assert stats["decode_attention_density"] == pytest.approx((5 + 6) / (33 + 34))  # Quest's count
    assert stats["retro_kv_exposure"] == pytest.approx((5 + 6 + 4) / (5 + 6))
    assert stats["retro_attention_density"] == pytest.approx((5 + 6 + 4) / (33 + 34))


def test_a_page_the_past_query_already_attended_is_not_added_again():
    s, layer = stage(), planted_layer(L=32)
    q0, out0 = step(s, layer, 1, seed=1)
    step(s, layer, 1, seed=2)  # the same page again
    past = s.output_cache(0)[0]
    assert past["added"] == 0 and torch.allclose(past["out"], out0[:, 0], atol=1e-5)


def test_the_window_bounds_the_output_cache_and_window_one_revises_nothing():
    s, layer = stage(retro_window=3), planted_layer(L=32)
    for i, axis in enumerate([0, 1, 2, 3, 4]):
        step(s, layer, axis, seed=i)
    assert len(s.output_cache(0)) == 2
    s1, layer = stage(retro_window=1), planted_layer(L=32)
    for i, axis in enumerate([0, 1, 2]):
        step(s1, layer, axis, seed=i)
    assert s1.output_cache(0) == [] and s1.sample_stats()["retro_kv_exposure"] == 1.0


def test_bad_window_is_refused():
    from lcbench.errors import UserError
    with pytest.raises(UserError):
        METHODS.get("retroattention")(ratio=0.5, retro_window=0)


# --- through the engine ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample():
    return make_sample(n_turns=1, max_new_tokens=12)


def run(tiny, sample, method: str, ratio: float, args: str | None = None):
    model, tok = tiny
    chain = Chain.build(resolve_chain(method, args, ratio), ratio)
    decoded, real = [], runner.greedy_decode
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "greedy_decode", lambda *a, **k: decoded.extend(real(*a, **k)) or decoded[-len(a[3]):])
        recs = Engine(model, tok, chain, EngineConfig()).run(sample, multi_turn=False)
    return [{**rec, "_ids": row.tokens} for rec, row in zip(recs, decoded)]


ARGS = "page_size=8,dense_layers=0"


def test_ratio_zero_is_token_identical_to_full(tiny, sample):
    full = run(tiny, sample, "full", 0.0)
    recs = run(tiny, sample, "retroattention", 0.0, ARGS)
    assert [r["_ids"] for r in recs] == [r["_ids"] for r in full]
    assert recs[0]["attention_density"] == 1.0


def test_tokens_and_density_are_quests_and_the_revision_adds_exposure(tiny, sample):
    quest = run(tiny, sample, "quest", 0.5, ARGS)
    recs = run(tiny, sample, "retroattention", 0.5, ARGS)
    assert [r["_ids"] for r in recs] == [r["_ids"] for r in quest]
    rec = recs[0]
    assert rec["attention_density"] == quest[0]["attention_density"] == rec["decode_attention_density"]
    assert 0.4 <= rec["attention_density"] <= 0.5 + 1e-9
    assert rec["retro_kv_exposure"] > 1.0
    assert rec["attention_density"] < rec["retro_attention_density"] <= 1.0


def test_the_revision_brings_past_outputs_closer_to_dense_attention():
    """Random keys and queries, 12 steps: with the revisions, cached outputs are nearer their dense
    attention than Quest's own outputs were (measure_error)."""
    gen = torch.Generator().manual_seed(4)
    layer = DenseLayer()
    layer.append(torch.randn(1, 1, 64, D, generator=gen), torch.randn(1, 1, 64, D, generator=gen),
                 torch.arange(64)[None], None)
    s = stage(ratio=0.5, measure_error=True)
    for i in range(12):
        layer.append(torch.randn(1, 1, 1, D, generator=gen), torch.randn(1, 1, 1, D, generator=gen),
                     torch.tensor([[64 + i]]), None)
        s.decode_attention(MODULE, 2 * torch.randn(1, 1, 1, D, generator=gen), layer, 0.5, 0)
    stats = s.sample_stats()
    assert stats["retro_kv_exposure"] > 1.2
    assert stats["retro_error_after"] < 0.8 * stats["retro_error_before"]
