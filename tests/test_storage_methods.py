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


@pytest.mark.parametrize("chain,args", [("zeromerge+kivi", None), ("zeromerge+adakv", None), ("zeromerge+think", None),
                                        ("kivi+zeromerge", None), ("subgen+quest", "quest.dense_layers=0")])
def test_layers_that_cannot_hold_the_bias_refuse_it(tiny, chain, args):
    """Layer kinds that cannot hold the bias, and stages that compute attention themselves, refuse it."""
    model, tok = tiny
    engine = engine_for(model, tok, chain, 0.3, method_args=args, check_ratio=False)
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


def test_zeromerge_decode_keeps_the_size_and_every_token_counted_once():
    """During generation each step merges one slot into its most similar merged slot: the size
    stays, and the weights (exp of the bias, scale_factor 1) always sum to the tokens seen."""
    torch.manual_seed(5)
    n, d, steps = 40, 8, 12
    keys, values = torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    seen = LayerObservation(layer_idx=0, num_layers=1, num_groups=1, context_length=n,
                            queries=torch.randn(1, 2, n, d), module=None, positions=torch.arange(n)[None])
    stage = ZeroMerge(ratio=0.6, residual=2)
    stage.begin_sample()
    layer = stage.compress_layer(_layer(keys, values), seen)
    size = layer.seq_len()
    for step in range(steps):
        layer.append(torch.randn(1, 2, 1, d), torch.randn(1, 2, 1, d), torch.tensor([[n + step]]), None)
        layer = stage.after_decode_step(layer, 0, torch.randn(1, 2, 1, d))
        assert layer.seq_len() == size  # the size decoding began with
        assert torch.allclose(layer.inner.bias.exp().sum(-1), torch.full((1, 2), float(n + step + 1)))
        assert torch.equal(layer.tracks["zeromerge_extra"] + 1, layer.inner.bias.exp().round())
    assert layer.positions[0, 0, -1].item() == n + steps - 1  # the newest tokens stay whole (proximity window)
    plain = ZeroMerge(ratio=0.6, residual=2, decode_merge=False)
    plain.begin_sample()
    grown = plain.compress_layer(_layer(keys, values), seen)
    grown.append(torch.randn(1, 2, 1, d), torch.randn(1, 2, 1, d), torch.tensor([[n]]), None)
    assert plain.after_decode_step(grown, 0, torch.randn(1, 2, 1, d)).seq_len() == size + 1


@pytest.mark.parametrize("method,args", [("zeromerge", "decode_merge=false"), ("subgen", None)])
def test_biased_layers_batched_are_token_identical_to_alone(tiny, method, args):
    """Samples prefilled together and compressed per row keep each row's bias (row_stack). (The
    engine batches no chain with a decode stage: zeromerge's decode merging is off here.)"""
    model, tok = tiny
    samples = [make_sample(n_turns=t, repeat=r, max_new_tokens=6, sid=f"s{i}") for i, (t, r) in
               enumerate([(1, 8), (2, 6), (1, 7)])]
    from lcbench.engine.batching import run_batched

    alone_engine = engine_for(model, tok, method, 0.6, method_args=args, decode_rows=1)
    ids_alone, rec_alone = decoded_ids(lambda: [r for s in samples for r in alone_engine.run(s, False)])
    together = engine_for(model, tok, method, 0.6, method_args=args, decode_rows=8)
    ids_batch, rec_batch = decoded_ids(lambda: [r for _, recs in run_batched(together, samples, {}, 8) for r in recs])
    assert ids_batch == ids_alone and len(ids_alone) == 4
    assert all(rec_batch[k]["kv_bytes"] == rec_alone[k]["kv_bytes"] for k in rec_alone)
    assert max(r["batch_samples"] for r in rec_batch.values()) >= 2


# --- fourierkv ---------------------------------------------------------------------------------
from lcbench.cache.fourier import FourierLayer, dct_basis, project, reconstruct  # noqa: E402
from lcbench.methods.soft.fourierkv import FourierKV, choose_dims, fit_error, plan  # noqa: E402


def test_dct_basis_is_orthonormal_and_the_fit_is_least_squares():
    basis = dct_basis(50, 50)
    assert torch.allclose(basis.T @ basis, torch.eye(50), atol=1e-5)
    x = torch.randn(2, 50, 3)
    assert torch.allclose(reconstruct(project(x, 50), 50), x, atol=1e-4)  # every coefficient: exact
    residual = reconstruct(project(x, 7), 50) - x
    assert torch.allclose(dct_basis(50, 7).T @ residual, torch.zeros(2, 7, 3), atol=1e-4)  # orthogonal to the span


def _signal(n: int, d: int, smooth: list[int], seed: int = 0) -> torch.Tensor:
    """(1, 2, n, d): noise, except the ``smooth`` dimensions, which vary slowly along the sequence."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, n, d, generator=g)
    t = torch.arange(n, dtype=torch.float32) / n
    for j in smooth:
        x[..., j] = 2 * torch.cos(2 * math.pi * (j % 3 + 1) * t / 2) + 0.5
    return x


def test_fourier_layer_stores_coefficients_and_reconstructs():
    n, d, smooth = 120, 8, [1, 4, 6]
    keys, values = _signal(n, d, smooth), _signal(n, d, [0, 2], seed=1)
    layer = _layer(keys, values)
    kd = torch.tensor(smooth).expand(1, 2, -1)
    vd = torch.tensor([0, 2]).expand(1, 2, -1)
    out = FourierLayer.from_layer(layer, front=4, back=16, coefficients=12, key_dims=kd, value_dims=vd)
    k, v = out.dense()
    assert out.buffer_nbytes() == 2 * 2 * (n - 16) * d * 4  # front + middle reconstructed once (not stored bytes)
    exact = [j for j in range(d) if j not in smooth]
    assert torch.equal(k[..., exact], keys[..., exact])  # the other dimensions are kept exactly
    assert torch.equal(k[:, :, :4], keys[:, :, :4]) and torch.equal(k[:, :, -16:], keys[:, :, -16:])
    assert (k[..., smooth] - keys[..., smooth]).abs().max() < 0.15  # a smooth trajectory: 12 of 100 suffice
    assert torch.equal(out.positions, layer.positions)
    m = n - 20
    want = 4 * (2 * 20 * d + m * (d - 3) + m * (d - 2) + 12 * (3 + 2)) * 2 + 2 * 2 * (3 + 2)
    assert out.nbytes() == want  # front/back, exact middle dims, coefficients, int16 indices
    # appended tokens go to the back; a selection or crop may touch only the back
    out.append(torch.randn(1, 2, 2, d), torch.randn(1, 2, 2, d), torch.tensor([[n, n + 1]]), None)
    assert out.seq_len() == n + 2 and out.positions[0, 0, -1].item() == n + 1
    out.crop_to(n)
    assert out.seq_len() == n
    with pytest.raises(UserError, match="before\nfourierkv|before fourierkv"):
        out.select(torch.arange(1, n).expand(1, 2, -1))
    out.select(torch.cat([torch.arange(n - 16), torch.arange(n - 8, n)]).expand(1, 2, -1))
    assert out.seq_len() == n - 8
    assert torch.equal(out.repeat_rows(2).keep_rows(torch.tensor([1])).dense()[0], out.dense()[0])


def test_choose_dims_takes_the_lowest_errors_and_splits_keys_and_values():
    key_error = torch.tensor([[0.1, 5.0, 0.2, 7.0], [0.3, 0.05, 6.0, 9.0]])
    value_error = torch.tensor([[1.0, 0.01, 8.0, 0.5], [0.02, 4.0, 0.4, 8.0]])
    kd, vd = choose_dims(key_error, value_error, 4)
    assert kd.tolist() == [[0, 2], [1, 0]] and vd.tolist() == [[1, 3], [0, 2]]


def test_fourierkv_compresses_the_calibrated_smooth_dims():
    """Calibrated on trajectories whose smooth dimensions are known, it compresses those first."""
    n, d, smooth = 300, 8, [1, 3, 4, 6]
    keys, values = _signal(n, d, smooth), _signal(n, d, smooth, seed=2)
    stage = FourierKV(ratio=0.4, local=16, coefficients=16)
    stage.calibration = {"key_error": [fit_error(keys[0], 9)], "value_error": [fit_error(values[0], 9)]}
    seen = LayerObservation(layer_idx=0, num_layers=1, num_groups=1, context_length=n)
    out = stage.compress_layer(_layer(keys, values), seen)
    assert isinstance(out, FourierLayer)
    assert out.key_dims[0, 0].tolist() == smooth and out.value_dims[0, 0].tolist() == smooth
    full = 2 * n * d * 4 * 2
    assert 1 - out.nbytes() / full >= 0.4
    assert (out.dense()[0] - keys).abs().max() < 0.1


def test_plan_scales_window_and_coefficients_for_short_contexts():
    assert plan(40_000, 4, 1024, 1024, 0.5, 128, 2, 0.8)[:3] == (4, 1024, 1024)  # long: the paper's lengths
    front, back, coef, dims = plan(500, 4, 1024, 1024, 0.5, 128, 2, 0.8)
    assert back == coef < 1024 and dims <= 128
    saved = (500 - front - back - coef) * dims * 2 - 2 * dims
    assert saved >= 0.5 * 500 * 128 * 2


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory):
    import os

    before = os.environ.get("LCBENCH_CACHE")
    os.environ["LCBENCH_CACHE"] = str(tmp_path_factory.mktemp("lcbench_cache"))
    yield
    if before is None:
        os.environ.pop("LCBENCH_CACHE")
    else:
        os.environ["LCBENCH_CACHE"] = before


@pytest.mark.parametrize("method,args", [("fourierkv", "calibration_tokens=256"), ("subgen", None)])
def test_storage_methods_meet_the_ratio_and_ratio_zero_is_full(tiny, calibration_dir, method, args):
    model, tok = tiny
    sample = make_sample(repeat=12, max_new_tokens=6)
    full_ids, full = decoded_ids(lambda: engine_for(model, tok, "full", 0.0).run(sample, False))
    ids, got = decoded_ids(lambda: engine_for(model, tok, method, 0.0, method_args=args).run(sample, False))
    assert ids == full_ids and got[("s0", 0)]["kv_bytes"] == full[("s0", 0)]["kv_bytes"]
    from lcbench.methods.registry import METHODS

    for ratio in (0.25, 0.5, 0.75, 0.9):
        rec = engine_for(model, tok, method, ratio, method_args=args).run(sample, False)[0]
        assert abs(rec["achieved_ratio"] - ratio) <= METHODS.get(method).tolerance, (ratio, rec["achieved_ratio"])
        assert rec["kv_bytes"] < rec["kv_bytes_full"]


# --- subgen ------------------------------------------------------------------------------------
from lcbench.cache.subgen import SubGenLayer  # noqa: E402
from lcbench.methods.soft.subgen import SubGen, l2_samples, online_clusters  # noqa: E402


def _clustered(n_per: int = 15, d: int = 4, seed: int = 0):
    """(1, 1, 3·n_per, d) keys: three tight, far-apart clusters, interleaved in arrival order."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [2.0, 0, -2.5, 0]])[:, :d]  # the third nearer the first
    label = torch.arange(3 * n_per) % 3
    keys = centres[label] + 0.01 * torch.randn(3 * n_per, d, generator=g)
    return keys[None, None], label


def test_online_clustering_finds_the_clusters_and_samples_their_members():
    keys, label = _clustered()
    sizes, reservoir = online_clusters(keys[0], torch.tensor([1.0]), 10, 4, torch.Generator().manual_seed(0))
    assert sizes[0, :3].tolist() == [15, 15, 15] and sizes[0, 3:].eq(0).all()
    for c in range(3):  # every sample of cluster c is one of its members
        assert all(label[j] == c for j in reservoir[0, c].tolist())
    capped, _ = online_clusters(keys[0], torch.tensor([1.0]), 2, 4, torch.Generator().manual_seed(0))
    assert capped[0].tolist() == [30, 15]  # at the cap, the third cluster's keys join the nearest centre


def _seen(n: int, queries: int = 1):
    return LayerObservation(layer_idx=0, num_layers=1, num_groups=1, context_length=n)


def test_subgen_attention_is_the_papers_estimator():
    keys, _ = _clustered()
    n, d = keys.shape[2], keys.shape[3]
    values = torch.randn(1, 1, n, d, generator=torch.Generator().manual_seed(1))
    out = SubGen(ratio=0.6, cluster_samples=3, delta=0.3, sinks=0, recent=0).compress_layer(_layer(keys, values), _seen(n))
    assert isinstance(out, SubGenLayer) and out.seq_len() < n
    q = torch.randn(1, 1, 1, d, generator=torch.Generator().manual_seed(2))
    got = dense_attention(_module(1), q, *out.dense(), storage_mask(out, 1), 1.0, None, slot_bias(out))
    s_c = (out.cluster_keys[0, 0] @ q[0, 0, 0]).exp() * out.cluster_bias[0, 0].exp()
    if out.cluster_valid is not None:
        s_c = s_c * out.cluster_valid[0, 0]
    z = s_c.sum()  # Σ_i n_i/|S_i| Σ_{k∈S_i} exp(q·k)
    a = (out.sample_bias[0, 0].exp() / out.eps)  # W / (s‖v_j‖²)
    num = ((out.sample_keys[0, 0] @ q[0, 0, 0]).exp() * a) @ (out.sample_values[0, 0] * out.eps)
    assert torch.allclose(got[0, 0, 0], num / z, rtol=1e-3, atol=1e-5)
    true_z = (keys[0, 0] @ q[0, 0, 0]).exp().sum()
    assert z.item() == pytest.approx(true_z.item(), rel=0.01)  # near-identical keys per cluster: the denominator is exact


def test_subgen_value_sampling_is_unbiased():
    """ℓ2 sampling: many weighted draws average to the exact product Σ_j exp(q·k_j) v_j; few are noisy."""
    g = torch.Generator().manual_seed(3)
    n, d = 30, 4
    keys, values = torch.randn(n, d, generator=g) * 0.5, torch.randn(n, d, generator=g)
    values[3] *= 0.01  # a small-norm value is rarely drawn and weighs much when it is
    q = torch.randn(d, generator=g)
    f = (keys @ q).exp()
    true = f @ values
    drawn, weight = l2_samples(values[None], 20_000, torch.Generator().manual_seed(0))
    norms = values.pow(2).sum(-1)
    assert torch.allclose(weight[0], norms.sum() / (20_000 * norms[drawn[0]]))
    estimate = (f[drawn[0]] * weight[0]) @ values[drawn[0]]
    assert (estimate - true).norm() < 0.1 * true.norm()
    few, w_few = l2_samples(values[None], 4, torch.Generator().manual_seed(0))
    assert ((f[few[0]] * w_few[0]) @ values[few[0]] - true).norm() > (estimate - true).norm()


def test_subgen_layer_bytes_and_tail():
    keys, _ = _clustered()
    n, d = keys.shape[2], keys.shape[3]
    out = SubGen(ratio=0.5, sinks=0, recent=4).compress_layer(_layer(keys, keys.clone()), _seen(n))
    mc, s = out.cluster_keys.shape[2], out.sample_keys.shape[2]
    assert out.nbytes() == (mc * d + mc + 2 * s * d + s + 2 * 4 * d) * 4  # keys only for cluster samples
    assert torch.equal(out.tail.keys, keys[:, :, -4:])  # the recent tokens are kept exactly
    assert out.nbytes() <= 0.5 * 2 * n * d * 4
    out.append(torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d), torch.tensor([[n]]), None)
    assert out.bias[0, 0, -1].item() == 0.0 and out.seq_len() == mc + s + 5
    with pytest.raises(UserError, match="subgen"):
        out.select(torch.arange(1, out.seq_len())[None, None])
    out.crop_to(mc + s + 4)
    assert out.seq_len() == mc + s + 4


def test_zeromerge_generation_keeps_the_cache_size_in_the_engine(tiny):
    model, tok = tiny
    ends = []
    for new in (3, 9):
        rec = engine_for(model, tok, "zeromerge", 0.5).run(make_sample(repeat=6, max_new_tokens=new), False)[0]
        assert rec["decode_tokens"] == new
        ends.append(rec["kv_bytes_end"])
    assert ends[0] == ends[1]  # merging keeps the size decoding began with
    grown = engine_for(model, tok, "zeromerge", 0.5, method_args="decode_merge=false").run(
        make_sample(repeat=6, max_new_tokens=9), False)[0]
    assert grown["kv_bytes_end"] > ends[1]
