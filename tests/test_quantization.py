"""KV quantization: packing, KIVI/int reconstruction error within the bound of the bit width,
bytes held (packed codes + float16 scales + window), the ratio → (bits, window) mapping, and the
layer contract (append/flush, crop, select, repeat) that appended question/answer tokens need."""

from __future__ import annotations

import pytest
import torch
from test_dropping import CONTEXT, context_ids, make_sample, prefill, run  # noqa: F401  (fixtures below)
from test_dropping import model, tok  # noqa: F401

from lcbench.cache.quantized import QuantizedLayer, QuantSpec, pack, unpack
from lcbench.errors import CompressionShortfall
from lcbench.methods.chain import Chain, resolve_chain
from lcbench.methods.quantization.plan import plan

RATIOS = (0.25, 0.5, 0.75, 0.9)


def random_kv(tokens: int = 128, head_dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with outlier channels (what KIVI's per-channel keys are for) and plain values."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn((1, 2, tokens, head_dim), generator=gen)
    keys[..., 3] *= 20  # an outlier channel
    values = torch.randn((1, 2, tokens, head_dim), generator=gen)
    return keys, values


def layer_of(keys, values, spec: QuantSpec) -> QuantizedLayer:
    positions = torch.arange(keys.shape[2]).expand(keys.shape[:3])
    return QuantizedLayer.from_dense(keys, values, positions, None, spec)


def group_bound(x: torch.Tensor, bits: int, shape: tuple[int, ...], dim: int) -> torch.Tensor:
    """Per element: (max − min) / (2 (2^bits − 1)) of its group, plus float16 rounding of the
    scale and zero (2^-10 of the group's largest magnitude)."""
    grouped = x.reshape(shape)
    lo, hi = grouped.amin(dim, keepdim=True), grouped.amax(dim, keepdim=True)
    bound = (hi - lo) / (2 * (2**bits - 1)) + 2**-10 * torch.maximum(lo.abs(), hi.abs()) + 1e-6
    return bound.expand_as(grouped).reshape(x.shape)


def test_pack_unpack_round_trip():
    gen = torch.Generator().manual_seed(0)
    for bits in (2, 4, 8):
        codes = torch.randint(0, 2**bits, (3, 5, 16), generator=gen, dtype=torch.uint8)
        packed = pack(codes, bits)
        assert packed.shape[-1] == 16 * bits // 8 and packed.dtype == torch.uint8
        assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_error_within_the_bound_of_its_bit_width(bits):
    keys, values = random_kv()
    layer = layer_of(keys, values, QuantSpec(bits, "channel", 32, 0))
    k, v = layer.dense()
    b, h, t, d = keys.shape
    key_bound = group_bound(keys, bits, (b, h, t // 32, 32, d), 3)  # per channel over 32 tokens
    value_bound = group_bound(values, bits, (b, h, t, 1, d), 4)  # per token (16 channels < group 32)
    assert ((k - keys).abs() <= key_bound).all()
    assert ((v - values).abs() <= value_bound).all()
    # the bound is tight: the worst error is at least a quarter of it somewhere
    assert ((k - keys).abs() / key_bound).max() > 0.25
    # per-channel keys beat per-token keys on outlier channels (KIVI's point)
    per_token = layer_of(keys, values, QuantSpec(bits, "token", 16, 0)).dense()[0]
    assert (k - keys).abs().mean() < (per_token - keys).abs().mean()


@pytest.mark.parametrize("bits", [8, 4])
def test_per_token_error_within_the_bound(bits):
    keys, values = random_kv()
    layer = layer_of(keys, values, QuantSpec(bits, "token", 8, 0))
    k, v = layer.dense()
    b, h, t, d = keys.shape
    assert ((k - keys).abs() <= group_bound(keys, bits, (b, h, t, 2, 8), 4)).all()
    assert ((v - values).abs() <= group_bound(values, bits, (b, h, t, 2, 8), 4)).all()


def test_bytes_held_are_the_packed_ones():
    keys, values = random_kv(tokens=64)
    layer = layer_of(keys, values, QuantSpec(2, "channel", 32, 0))
    # per head: key codes 64·16/4 = 256, value codes 256, key scale+zero (64/32)·16·2·2 = 128,
    # value scale+zero 64·1·2·2 = 256 (one group per token: 32 does not divide 16) → 896; two heads
    assert layer.nbytes() == 1792
    assert layer.spec.nbytes(1, 2, 64, 16, 4) == 1792
    assert keys.numel() * 4 * 2 == 16384  # the float32 original
    windowed = layer_of(keys, values, QuantSpec(2, "channel", 32, 20))  # 44 past the window → 32 quantized
    assert windowed.quantized == 32 and windowed.nbytes() == windowed.spec.nbytes(1, 2, 64, 16, 4)


def test_window_stays_full_precision_through_appends_and_flushes_by_groups():
    keys, values = random_kv(tokens=100)
    spec = QuantSpec(2, "channel", 32, 16)
    layer = layer_of(keys[:, :, :60], values[:, :, :60], spec)
    assert layer.quantized == 32  # 60 − 16 = 44 → one whole group
    for t in range(60, 100):  # decoding, one token at a time
        layer.append(keys[:, :, t:t + 1], values[:, :, t:t + 1], torch.tensor([[t]]), None)
        assert layer.seq_len() == t + 1
        assert 16 <= layer.rkeys.shape[2] < 16 + 32
    assert layer.quantized == 64
    k, _ = layer.dense()
    assert torch.equal(k[:, :, 64:], keys[:, :, 64:])  # the window is exact
    assert torch.equal(layer.positions[0, 0], torch.arange(100))


def test_crop_select_and_repeat_keep_the_contract():
    keys, values = random_kv(tokens=96)
    layer = layer_of(keys, values, QuantSpec(4, "channel", 32, 8))
    seen_by_attention = layer.dense()[0]
    copy = layer.repeat_rows(3)
    assert torch.equal(copy.dense()[0][2], seen_by_attention[0]) and copy.nbytes() == 3 * layer.nbytes()
    layer.crop_to(40)  # inside the quantized part: the cut group returns to the window as it was seen
    assert layer.seq_len() == 40 and layer.quantized == 32
    assert torch.equal(layer.dense()[0], seen_by_attention[:, :, :40])
    layer.select(torch.arange(0, 40, 2).expand(1, 2, 20))
    assert layer.positions[0, 0].tolist() == list(range(0, 40, 2))
    assert (layer.dense()[0] - keys[:, :, 0:40:2]).abs().max() < 3.0


def test_plan_picks_the_most_bits_then_the_longest_window():
    keys, values = random_kv(tokens=1024, head_dim=64)
    dense = layer_of(keys, values, QuantSpec(8, "token", 64, 1024))  # window = everything: not quantized
    assert dense.quantized == 0
    spec = plan(dense, 0.5, (4, 2), "channel", 32, -1)
    assert spec.bits == 4 and spec.window > 0
    achieved = 1 - spec.nbytes(1, 2, 1024, 64, 4) / dense.nbytes()
    assert 0.5 <= achieved < 0.5 + 0.03
    assert plan(dense, 0.87, (4, 2), "channel", 32, -1).bits == 2
    assert plan(dense, 0.99, (4, 2), "channel", 32, -1) == QuantSpec(2, "channel", 32, 0)


# --- through the engine ----------------------------------------------------------------------
LONG = make_sample(context=CONTEXT + " " + CONTEXT, turns=1, max_new_tokens=4)


@pytest.mark.parametrize("method", ["kivi", "int8", "int4"])
def test_achieved_ratio_within_tolerance_where_reachable(model, tok, method):  # noqa: F811
    stage = Chain.build(resolve_chain(method, None, 0.5), 0.5).stages[0]
    n = len(context_ids(tok, LONG.context))
    cfg = model.config
    reachable = stage.max_ratio(cfg.num_key_value_heads, n, cfg.head_dim, model.dtype)
    for ratio in RATIOS:
        if ratio - stage.tolerance > reachable:
            with pytest.raises(CompressionShortfall):
                run(model, tok, method, ratio, sample=LONG)
            continue
        rec = run(model, tok, method, ratio, sample=LONG)[0]
        assert abs(rec["achieved_ratio"] - ratio) <= stage.tolerance, (method, ratio, rec["achieved_ratio"])
        assert rec["kept_tokens"] == rec["context_tokens"]  # quantization keeps every token


def test_quantized_cache_decodes_multi_turn_and_batched(model, tok):  # noqa: F811
    sample = make_sample(turns=3, max_new_tokens=6)
    for multi_turn in (False, True):
        recs = run(model, tok, "kivi", 0.6, sample=sample, multi_turn=multi_turn)
        assert len(recs) == 3 and all(abs(r["achieved_ratio"] - 0.6) <= 0.06 for r in recs)
    int8 = run(model, tok, "int8", 0.5, sample=sample)
    full = run(model, tok, "full", 0.0, sample=sample)
    assert [r["prediction"] for r in int8] == [r["prediction"] for r in full]  # 8 bits: same greedy answers


# --- the ratio → (bits, window) search ----------------------------------------------------------
def linear_search_plan(shape, elem, nbytes, ratio, bits_options, key_axis, group_size, window):
    """The former plan(): try every window from the longest down (the reference for bisection)."""
    b, h, length, d = shape
    target = (1.0 - ratio) * nbytes
    g = group_size if key_axis == "channel" else 1
    for bits in bits_options:
        if window >= 0:
            spec = QuantSpec(bits, key_axis, group_size, window)
            if spec.nbytes(b, h, length, d, elem) <= target or bits == bits_options[-1]:
                return spec
            continue
        for quantized in range(0, length // g * g + 1, g):
            spec = QuantSpec(bits, key_axis, group_size, length - quantized)
            if spec.nbytes(b, h, length, d, elem) <= target:
                return spec
    return QuantSpec(bits_options[-1], key_axis, group_size, max(window, 0))


class ShapeOnly:
    """A layer as plan() sees it: the shape and dtype of its dense keys and the bytes it holds
    (fewer than the rectangle for a ragged layer, hence ``held``)."""

    def __init__(self, shape, dtype, held: float = 1.0):
        self.keys = torch.empty(1, dtype=dtype).expand(*shape)
        self.held = held

    def dense(self):
        return self.keys, self.keys

    def nbytes(self):
        return int(2 * self.keys.numel() * self.keys.element_size() * self.held)


def test_plan_bisection_equals_the_linear_search_on_a_grid():
    gen = torch.Generator().manual_seed(0)
    lengths = [0, 1, 2, 7, 31, 32, 33, 64, 95, 129] + torch.randint(130, 400, (3,), generator=gen).tolist()
    ratios = [i / 10 for i in range(10)] + [0.45, 0.55, 0.65, 0.85, 0.87, 0.93, 0.97, 0.99]
    configs = [(axis, group, d, dtype, options)
               for axis in ("channel", "token") for group in (32, 8, 5) for d in (16, 15, 64)
               for dtype in (torch.float32, torch.bfloat16) for options in ((4, 2), (8,), (2,))]
    checked = 0
    for axis, group, d, dtype, options in configs:
        for length in lengths:
            for held in (1.0, 0.8):
                layer = ShapeOnly((1, 2, length, d), dtype, held)
                for ratio in ratios:
                    for window in (-1, 16):
                        new = plan(layer, ratio, options, axis, group, window)
                        old = linear_search_plan((1, 2, length, d), layer.keys.element_size(), layer.nbytes(),
                                                 ratio, options, axis, group, window)
                        assert new == old, (axis, group, d, dtype, options, length, held, ratio, window)
                        checked += 1
    assert checked > 30_000


def test_plan_evaluates_logarithmically_many_windows(monkeypatch):
    calls = []
    original = QuantSpec.nbytes
    monkeypatch.setattr(QuantSpec, "nbytes", lambda self, *a: calls.append(1) or original(self, *a))
    layer = ShapeOnly((1, 8, 16384, 64), torch.bfloat16)
    spec = plan(layer, 0.4, (8,), "token", 64, -1)  # per-token axis: 16385 candidate windows
    assert 0 < spec.window < 16384
    assert len(calls) <= 2 * 16  # ≈ log2(16384) + 2, not thousands


def test_chosen_bits_and_window_are_recorded_per_sample(model, tok):  # noqa: F811
    four = run(model, tok, "kivi", 0.5, sample=LONG)[0]
    two = run(model, tok, "kivi", 0.85, sample=LONG)[0]
    assert four["quant_bits"] == 4 and two["quant_bits"] == 2
    assert four["quant_window"] > two["quant_window"] >= 0
    assert 0 < four["quant_window_share"] < 1
    fixed = run(model, tok, "kivi", 0.5, args="bits=2,window=0", sample=LONG, check=False)[0]
    assert fixed["quant_bits"] == 2 and fixed["quant_window"] < 32  # only the partial last group
    assert "quant_bits" not in run(model, tok, "kivi", 0.0, sample=LONG)[0]


# --- ragged layers (AdaKV's head-wise budgets) then quantization --------------------------------
def test_ragged_layer_is_quantized_with_each_heads_recent_tokens_in_the_window():
    from lcbench.cache.ragged import RaggedLayer

    keys, values = random_kv(tokens=100)
    keys[..., 3] += 40  # an outlier channel far from zero: zero padding would widen its groups
    keep = torch.ones((1, 2, 100), dtype=torch.bool)
    keep[0, 1, 1::5] = False  # head 1 keeps 80 of 100 tokens → 20 padding slots at its end
    keep[0, 1, 90:] = False  # ... 72 in all (28 padding slots)
    positions = torch.arange(100).expand(1, 2, 100)
    ragged = RaggedLayer.from_mask(keys, values, positions, keep)
    spec = QuantSpec(2, "channel", 32, 16)
    layer = QuantizedLayer.from_layer(ragged, spec)
    assert layer.nbytes() == spec.nbytes(1, 2, 100, 16, 4)  # the padded rectangle is still stored
    k, v = layer.dense()
    for head in range(2):
        real = layer.valid[0, head]
        assert int(real.sum()) == int(keep[0, head].sum())
        assert layer.positions[0, head][real].tolist() == positions[0, head][keep[0, head]].tolist()
        original_k, original_v = keys[0, head][keep[0, head]], values[0, head][keep[0, head]]
        # every head's 16 most recent tokens stay exact (the window is not spent on padding)
        assert torch.equal(k[0, head][real][-16:], original_k[-16:])
        assert torch.equal(v[0, head][real][-16:], original_v[-16:])
        # key error within the bound of each group's *real* tokens (padding copies a real token)
        quantized = layer.valid[0, head][:layer.quantized]
        got = k[0, head][:layer.quantized][quantized]
        for group in range(layer.quantized // 32):
            before = int(quantized[:group * 32].sum())
            real_k = original_k[before: int(quantized[:(group + 1) * 32].sum())]
            if len(real_k):
                lo, hi = real_k.amin(0), real_k.amax(0)
                bound = (hi - lo) / (2 * 3) + 2**-10 * torch.maximum(lo.abs(), hi.abs()) + 1e-6
                assert ((got[before: before + len(real_k)] - real_k).abs() <= bound).all(), (head, group)


@pytest.mark.parametrize("spec", [QuantSpec(2, "channel", 32, 16), QuantSpec(8, "token", 8, 4), QuantSpec(4, "token", 8, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_dequantizes_each_group_once_into_a_buffer_of_the_models_dtype(monkeypatch, spec, dtype):
    """Issue #14: a decode step does not dequantize the whole layer — each group is dequantized
    once, when it closes, into the compute buffer (model dtype) that dense() returns; that buffer
    equals dequantizing all packed groups at once (the former dense()), and nbytes() stays the
    packed storage's."""
    from lcbench.cache import quantized

    keys, values = (t.to(dtype) for t in random_kv(tokens=160))
    layer = layer_of(keys[:, :, :100], values[:, :, :100], spec)
    dequantized: list[int] = []
    real = quantized.dequantize

    def counting(codes, *args):
        dequantized.append(codes.numel())
        return real(codes, *args)

    monkeypatch.setattr(quantized, "dequantize", counting)
    for t in range(100, 160):  # decoding, one token at a time
        layer.append(keys[:, :, t:t + 1], values[:, :, t:t + 1], torch.tensor([[t]]), None)
        k, v = layer.dense()
        assert k.dtype == dtype and k.shape[2] == t + 1
    # per step at most one closing token group of keys and of values, never the whole layer
    group = 2 * 2 * spec.token_group() * 16  # keys + values, 2 heads, a group of tokens, 16 channels
    assert sum(dequantized) <= group * (60 // spec.token_group() + 1)
    monkeypatch.setattr(quantized, "dequantize", real)
    cg = layer._channel_group(layer.dvalues)
    whole_k = layer._dequantize_keys(layer.qkeys).to(dtype)
    whole_v = quantized.dequantize_tokens(layer.qvalues, spec.bits, cg).to(dtype)
    k, v = layer.dense()
    assert torch.equal(k[:, :, :layer.quantized], whole_k) and torch.equal(v[:, :, :layer.quantized], whole_v)
    assert torch.equal(k[:, :, layer.quantized:], keys[:, :, layer.quantized:])  # the window as is
    assert layer.nbytes() == spec.nbytes(1, 2, 160, 16, keys.element_size())
    assert layer.buffer_nbytes() == 2 * layer.quantized * 2 * 16 * keys.element_size()


def test_decode_block_quantizes_what_leaves_the_window_a_block_at_a_time():
    """Per-token int4/int8 quantize the tokens leaving the window ``block`` at a time while
    decoding (transformers QuantizedCache's residual); compression still quantizes down to exactly
    the window, and ``block=1`` is the former token-by-token flush."""
    keys, values = random_kv(tokens=200)
    blocked = layer_of(keys[:, :, :100], values[:, :, :100], QuantSpec(8, "token", 8, 16, decode_block=32))
    single = layer_of(keys[:, :, :100], values[:, :, :100], QuantSpec(8, "token", 8, 16))
    assert blocked.quantized == single.quantized == 84  # compression: exactly the window stays
    assert blocked.nbytes() == single.nbytes()
    for t in range(100, 200):
        for layer in (blocked, single):
            layer.append(keys[:, :, t:t + 1], values[:, :, t:t + 1], torch.tensor([[t]]), None)
        assert 16 <= blocked.rkeys.shape[2] < 16 + 32 and single.rkeys.shape[2] == 16
    k_blocked, k_single = blocked.dense()[0], single.dense()[0]
    # per-token groups: a token quantized later is quantized to the same codes
    assert torch.equal(k_blocked[:, :, :blocked.quantized], k_single[:, :, :blocked.quantized])
    assert torch.equal(k_blocked[:, :, blocked.quantized:], keys[:, :, blocked.quantized:])
    stage = Chain.build(resolve_chain("int8", None, 0.5), 0.5).stages[0]
    assert stage.args["block"] == 32
