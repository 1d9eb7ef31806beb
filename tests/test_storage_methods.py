"""Methods that change how the cache is stored (issue #15): the per-slot attention bias of a layer
(merge compensation) and zeromerge, which uses it."""

import math
import types

import pytest
import torch

from lcbench.cache.layer import DenseLayer
from lcbench.cache.shared import SharedContextLayer
from lcbench.engine.attention import AttentionCall, dense_attention, shared_context_attention, slot_bias, storage_mask
from lcbench.engine.row_stack import row_layers, stack_rows, take_rows
from lcbench.errors import UserError
from lcbench.methods.base import LayerObservation
from lcbench.methods.dropping.zeromerge import ZeroMerge, merge_chunks
from tests.conftest import engine_for
from tests.helpers import decoded_ids, make_sample

torch.set_num_threads(1)


def _module(groups: int, eager: bool = False):
    config = types.SimpleNamespace(lcbench_dense_attention="eager" if eager else "sdpa")
    return types.SimpleNamespace(num_key_value_groups=groups, config=config, is_causal=True, training=False)


def _layer(keys, values, bias=None) -> DenseLayer:
    layer = DenseLayer()
    layer.append(keys, values, torch.arange(keys.shape[2])[None].expand(keys.shape[0], -1), None)
    layer.bias = bias
    return layer


# --- the bias ---------------------------------------------------------------------------------
@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("eager", [False, True])
def test_zero_bias_is_exactly_no_bias(q_len, eager):
    torch.manual_seed(0)
    b, hkv, g, n, d = 2, 2, 2, 10, 8
    query = torch.randn(b, hkv * g, q_len, d)
    keys, values = torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    layer = _layer(keys, values)
    mask = storage_mask(layer, q_len)
    plain = dense_attention(_module(g, eager), query, keys, values, mask, d ** -0.5)
    zero = dense_attention(_module(g, eager), query, keys, values, mask, d ** -0.5, bias=torch.zeros(b, hkv, n))
    assert torch.equal(plain, zero)


@pytest.mark.parametrize("q_len,eager,softcap", [(1, False, None), (3, False, None), (3, True, None), (3, False, 5.0)])
def test_log_n_bias_equals_the_slot_duplicated_n_times(q_len, eager, softcap):
    """Attention over a slot with bias log n is attention over n copies of it: ZeroMerge's compensation."""
    torch.manual_seed(1)
    b, hkv, g, n, d, slot, copies = 1, 2, 3, 8, 16, 2, 5
    query = torch.randn(b, hkv * g, q_len, d)
    keys, values = torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    bias = torch.zeros(b, hkv, n)
    bias[..., slot] = math.log(copies)
    biased = _layer(keys, values, bias)
    idx = torch.tensor([slot] * (copies - 1) + list(range(n)))  # the copies first: the queries stay the last slots
    dup = _layer(keys[:, :, idx], values[:, :, idx])
    call = AttentionCall(scaling=d ** -0.5, softcap=softcap)
    mod = _module(g, eager)
    got = dense_attention(mod, query, keys, values, storage_mask(biased, q_len), call.scaling, call, slot_bias(biased))
    want = dense_attention(mod, query, dup.keys, dup.values, storage_mask(dup, q_len), call.scaling, call)
    assert torch.allclose(got, want, atol=1e-5)
    nobias = dense_attention(mod, query, keys, values, storage_mask(biased, q_len), call.scaling, call)
    assert not torch.allclose(nobias, want, atol=1e-3)  # the bias is what makes them equal


def test_bias_follows_the_slots_and_is_counted():
    keys = torch.randn(2, 1, 6, 4)
    bias = torch.arange(12, dtype=torch.float32).view(2, 1, 6)
    layer = _layer(keys, keys.clone(), bias.clone())
    assert layer.nbytes() == 2 * keys.numel() * 4 + bias.numel() * 4
    layer.select(torch.tensor([[[4, 1, 3]], [[0, 5, 2]]]))
    assert layer.bias.tolist() == [[[1, 3, 4]], [[6, 8, 11]]]
    layer.append(torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4), torch.tensor([[6, 7], [6, 7]]), None)
    assert layer.bias[..., 3:].eq(0).all() and layer.bias.shape == (2, 1, 5)
    assert layer.keep_rows(torch.tensor([1])).bias.tolist() == [[[6, 8, 11, 0, 0]]]
    assert layer.repeat_rows(2).bias[:, 0, 0].tolist() == [1, 1, 6, 6]
    layer.crop_to(3)
    assert layer.bias.shape == (2, 1, 3)
    rows = row_layers(layer)  # one sample per row (cross-sample batching) and back
    assert [r.bias.tolist() for r in rows] == [[[[1, 3, 4]]], [[[6, 8, 11]]]]
    short = DenseLayer()
    short.append(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.tensor([[0, 1]]), None)
    stacked = stack_rows([rows[0], short])
    assert stacked.bias.tolist() == [[[1, 3, 4]], [[0, 0, 0]]]
    assert take_rows(layer, [0, 2]).bias[:, 0].tolist() == [[6, 8, 11]] * 2


def test_shared_context_keeps_the_context_bias():
    """Turns sharing one biased context attend as over their own copies with the bias."""
    torch.manual_seed(2)
    hkv, g, n, d = 2, 2, 6, 8
    context = _layer(torch.randn(1, hkv, n, d), torch.randn(1, hkv, n, d), torch.rand(1, hkv, n) * 2)
    shared = SharedContextLayer(context, rows=2)
    new_k, new_v = torch.randn(2, hkv, 3, d), torch.randn(2, hkv, 3, d)
    shared.append(new_k, new_v, torch.tensor([[6, 7, 8], [6, 7, 8]]), None)
    query = torch.randn(2, hkv * g, 3, d)
    call = AttentionCall(scaling=d ** -0.5)
    got = shared_context_attention(_module(g), query, shared, call)
    copy = shared.materialize()
    assert torch.equal(copy.bias[:, :, :n], context.bias.expand(2, -1, -1)) and copy.bias[:, :, n:].eq(0).all()
    want = dense_attention(_module(g), query, copy.keys, copy.values, storage_mask(copy, 3), call.scaling, call,
                           slot_bias(copy))
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("chain", ["zeromerge+kivi", "zeromerge+adakv", "zeromerge+think", "kivi+zeromerge"])
def test_layers_that_cannot_hold_the_bias_refuse_it(tiny, chain):
    model, tok = tiny
    engine = engine_for(model, tok, chain, 0.3, check_ratio=False)
    with pytest.raises(UserError, match="bias"):
        engine.run(make_sample(repeat=4, max_new_tokens=2), False)


# --- zeromerge ---------------------------------------------------------------------------------
def test_merge_chunks_split_like_the_official_cache_init():
    """7 residual tokens into 3 slots: chunks of 3, 2, 2 in storage order, averaged."""
    keys = torch.arange(10, dtype=torch.float32).view(1, 1, 10, 1)
    residual = torch.tensor([[[True, False, True, True, True, False, True, True, False, True]]])
    mk, _, pos, weight, held = merge_chunks(keys, keys, torch.arange(10).view(1, 1, 10), torch.ones(1, 1, 10),
                                            residual, 3)
    assert mk[0, 0, :, 0].tolist() == pytest.approx([(0 + 2 + 3) / 3, (4 + 6) / 2, (7 + 9) / 2])
    assert weight[0, 0].tolist() == [3, 2, 2] and pos[0, 0].tolist() == [3, 6, 9] and bool(held.all())


def test_zeromerge_keeps_attended_and_recent_tokens_and_merges_the_rest():
    torch.manual_seed(3)
    n, d = 40, 8
    keys = torch.randn(1, 1, n, d) * 0.1
    hot = torch.zeros(d)
    hot[0] = 6.0
    keys[0, 0, [5, 17]] = hot  # what every query attends to
    values = torch.randn(1, 1, n, d)
    layer = _layer(keys, values.clone())
    queries = hot.expand(1, 2, n, d).clone()  # 2 query heads on 1 KV head
    seen = LayerObservation(layer_idx=0, num_layers=1, num_groups=2, context_length=n,
                            queries=queries, module=types.SimpleNamespace(scaling=d ** -0.5),
                            positions=torch.arange(n)[None])
    stage = ZeroMerge(ratio=0.75, tail=0.2)
    out = stage.compress_layer(layer, seen)
    k = stage.budget(_layer(keys, values), seen, keys, values)  # 10 slots: 2 recent, 1 merged, 7 kept
    assert out.seq_len() == k == 9
    kept = out.positions[0, 0].tolist()
    assert {5, 17, 38, 39} <= set(kept)
    merged = out.bias[0, 0].nonzero().flatten().tolist()
    assert len(merged) == 1  # one residual slot, carrying log(count)
    evicted = sorted(set(range(n)) - set(kept) | {kept[merged[0]]})
    assert kept[merged[0]] == max(evicted)  # the merged slot sits at its newest member's position
    assert out.bias[0, 0, merged[0]].item() == pytest.approx(math.log(len(evicted)))
    assert torch.allclose(out.values[0, 0, merged[0]], values[0, 0, evicted].mean(0), atol=1e-6)
    assert out.nbytes() == 2 * k * d * 4 + k * 4 < 0.26 * 2 * n * d * 4 + 1


def test_zeromerge_scale_factor_zero_is_no_compensation():
    torch.manual_seed(4)
    n, d = 30, 8
    keys, values = torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    seen = LayerObservation(layer_idx=0, num_layers=1, num_groups=1, context_length=n,
                            queries=torch.randn(1, 2, n, d), module=None, positions=torch.arange(n)[None])
    out = ZeroMerge(ratio=0.5, scale_factor=0.0).compress_layer(_layer(keys, values), seen)
    assert out.bias.eq(0).all() and out.seq_len() < n


def test_zeromerge_batched_is_token_identical_to_alone(tiny):
    """Samples prefilled together and compressed per row keep each row's bias (row_stack)."""
    model, tok = tiny
    samples = [make_sample(n_turns=t, repeat=r, max_new_tokens=6, sid=f"s{i}") for i, (t, r) in
               enumerate([(1, 8), (2, 6), (1, 7)])]
    from lcbench.engine.batching import run_batched

    alone_engine = engine_for(model, tok, "zeromerge", 0.6, decode_rows=1)
    ids_alone, rec_alone = decoded_ids(lambda: [r for s in samples for r in alone_engine.run(s, False)])
    together = engine_for(model, tok, "zeromerge", 0.6, decode_rows=8)
    ids_batch, rec_batch = decoded_ids(lambda: [r for _, recs in run_batched(together, samples, {}, 8) for r in recs])
    assert ids_batch == ids_alone and len(ids_alone) == 4
    assert all(rec_batch[k]["kv_bytes"] == rec_alone[k]["kv_bytes"] for k in rec_alone)
    assert max(r["batch_samples"] for r in rec_batch.values()) >= 2
