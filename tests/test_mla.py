"""Multi-head latent attention (DeepSeek-V2/V3): the cache holds one latent per token, which the model
expands into every head's keys and values before each attention call. lcbench stores what the model
caches (so KV bytes are the latent's), observes the attention of the expanded keys, and runs the methods
whose math holds on latents (:attr:`Stage.latent_cache`); the rest are refused with exit 2."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from lcbench import architectures as support
from lcbench.engine.batching import run_batched
from lcbench.errors import UserError
from lcbench.models.families import build, family
from lcbench.models.tiny import tiny_tokenizer
from tests.conftest import engine_for
from tests.helpers import make_sample, records_by_method, saved_family, sharing_prefills
from tests.test_cli_errors import lcbench

warnings.filterwarnings("ignore", message=".*rope.*")

# the built-in methods whose math holds on a latent cache, with settings for ~250-token contexts
RUNS = [("snapkv", 0.5, "window_size=8"), ("streamingllm", 0.5, None), ("kivi", 0.5, "group_size=8"),
        ("int8", 0.25, None), ("chunkkv", 0.5, "window_size=8"), ("pyramidkv", 0.5, "window_size=8"),
        ("random", 0.5, None), ("ashape", 0.5, "block_size=8,sink_tokens=8")]


@pytest.fixture(scope="module")
def mla():
    """(lcbench model, transformers' eager reference with the same weights, tokenizer): tiny DeepSeek-V3."""
    from lcbench.engine.attach import use_lcbench_attention

    model = build(family("deepseek-v3"), "eager")
    use_lcbench_attention(model)
    return model, build(family("deepseek-v3"), "eager"), tiny_tokenizer()


def _context_ids(tok, sample):
    from lcbench.engine.prompt import render

    return torch.tensor([render(tok, sample, sample.context, False).context_ids])


def test_the_cache_holds_the_models_latents_and_the_reference_is_their_bytes(mla):
    """The probe sees that attention receives keys and values of another shape than the layer stores;
    the full cache a method is measured against is transformers' own cache of the same context
    (latent plus rotary key per token, not the expanded heads)."""
    from transformers import DynamicCache

    model, ref, tok = mla
    geometry = model.lcbench_geometry
    assert geometry.latent and "latent" in geometry.describe()
    cfg = ref.config
    assert geometry.bytes_per_token == ((cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4,) * cfg.num_hidden_layers
    s = support.sample()
    record = engine_for(model, tok).run(s, False)[0]
    cache = DynamicCache(config=cfg)
    with torch.inference_mode():
        ref(_context_ids(tok, s), past_key_values=cache, use_cache=True)
    theirs = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert record.measured.kv_bytes == record.measured.kv_bytes_full == theirs
    # ordinary models are not latent
    from lcbench.engine.attach import use_lcbench_attention

    llama = build(family("llama"), "eager")
    use_lcbench_attention(llama)
    assert not llama.lcbench_geometry.latent


def test_snapkv_scores_the_expanded_attention_over_all_query_heads(mla, monkeypatch):
    """What a cache stage observes on MLA is the model's attention (transformers' eager weights) per
    query head, and the one stored "head" gathers all of them: SnapKV keeps the window and the top
    slots of that attention, averaged over the window and every query head, pooled."""
    from lcbench.methods.dropping.snapkv import SnapKV

    model, ref, tok = mla
    s = support.sample()
    seen_by_layer, kept = {}, {}
    original = SnapKV.compress_layer

    def spy(self, layer, seen):
        seen_by_layer[seen.layer_idx] = seen
        out = original(self, layer, seen)
        kept[seen.layer_idx] = out.positions[0, 0].tolist()
        return out

    monkeypatch.setattr(SnapKV, "compress_layer", spy)
    engine_for(model, tok, "snapkv", 0.5, "window_size=8,kernel_size=5").run(s, False)
    ids = _context_ids(tok, s)
    with torch.inference_mode():
        attentions = ref(ids, output_attentions=True).attentions
    n = ids.shape[1]
    for idx, attn in enumerate(attentions):  # (1, H, n, n)
        seen = seen_by_layer[idx]
        heads = attn.shape[1]
        assert seen.num_groups == heads
        assert torch.allclose(seen.window_attention, attn[:, :, -8:], atol=1e-5)
        scores = F.avg_pool1d(attn[:, :, -8:, : n - 8].mean(2), kernel_size=5, padding=2, stride=1)[..., : n - 8]
        scores = scores.mean(1)[0]  # every query head into the one stored head
        top = scores.topk(len(kept[idx]) - 8).indices.tolist()
        assert kept[idx] == sorted(top) + list(range(n - 8, n))


@pytest.mark.parametrize("method,ratio,args", RUNS)
def test_methods_on_mla_reach_their_ratio_and_turns_together_equal_alone(mla, method, ratio, args):
    """Each method that declares latent_cache runs on MLA at its ratio, and a sample's turns decoded
    together (rows over copies of the compressed latents) equal each turn alone."""
    model, _, tok = mla
    s = support.sample()
    together = engine_for(model, tok, method, ratio, args).run(s, False)
    assert len(together) == 2
    measured = together[0].measured
    if method == "ashape":
        assert 0 < together[0].method_stats["attention_density"] < 1
    else:
        assert measured.achieved_ratio >= ratio - 0.05 and measured.kv_bytes < measured.kv_bytes_full
    for k, record in enumerate(together):
        one = dataclasses.replace(s, turns=[s.turns[k]])
        alone = engine_for(model, tok, method, ratio, args).run(one, False)[0]
        assert record.decoded_ids == alone.decoded_ids
        assert record.measured.kv_bytes == alone.measured.kv_bytes


def test_samples_batched_together_on_mla_equal_each_alone(mla):
    model, _, tok = mla
    samples = [make_sample(n_turns=1, repeat=12, max_new_tokens=6, sid="a"),
               make_sample(n_turns=1, repeat=8, max_new_tokens=6, sid="b")]
    for method, ratio, args in [("snapkv", 0.5, "window_size=8"), ("kivi", 0.5, "group_size=8")]:
        alone = [engine_for(model, tok, method, ratio, args).run(x, False)[0] for x in samples]
        engine = engine_for(model, tok, method, ratio, args, decode_rows=4)
        batched = [r for _, records in run_batched(engine, samples, {}, 4) for r in records]
        assert max(r.measured.batch_samples for r in batched) == 2  # the samples shared a batch
        assert [r.decoded_ids for r in batched] == [r.decoded_ids for r in alone]
        assert [r.measured.kv_bytes for r in batched] == [r.measured.kv_bytes for r in alone]


def test_runs_sharing_a_prefill_decode_together_on_mla_as_alone(mla):
    """Several runs' rows in one decode batch (engine/joint.py): on MLA the model expands every run's
    latents, padded to the longest, and each run attends only its own; records equal each run alone."""
    from lcbench.engine.joint import decode_together
    model, _, tok = mla
    runs = RUNS[:4] + [("full", 0.0, None)]
    sample = make_sample(n_turns=2, repeat=12, max_new_tokens=6, sid="a")
    sample = dataclasses.replace(sample, turns=[sample.turns[0], dataclasses.replace(sample.turns[1], max_new_tokens=3)])
    alone = [engine_for(model, tok, n, r, a).run(sample, False) for n, r, a in runs]
    engines = sharing_prefills([engine_for(model, tok, n, r, a) for n, r, a in runs])
    together = decode_together([e.ask(e.prepare(sample)) for e in engines])
    for got, want in zip(together, alone):
        for a, b in zip(got, want):
            assert a.decoded_ids == b.decoded_ids
            for field in ("kv_bytes", "kept_tokens", "achieved_ratio", "kv_bytes_end"):
                assert getattr(a.measured, field) == getattr(b.measured, field), field
            assert a.measured.batch_rows == 2 * len(runs)
    assert len({got[0].measured.kv_bytes_end for got in together}) >= 4  # each run's own layers


@pytest.mark.parametrize("method,args", [("knorm", None), ("tova", None), ("h2o", None),
                                         ("quest", "page_size=4,dense_layers=0"), ("think", None),
                                         ("infllm", None)])
def test_methods_that_read_cached_keys_are_refused_on_mla(mla, method, args):
    ratio = 0.3 if method == "think" else 0.5  # ThinK prunes key channels: it cannot reach 0.5
    """A method that reads the cached slots as keys or values would compute on latents: refused with the
    reason and the fix; at ratio 0 it changes nothing and runs."""
    model, _, tok = mla
    with pytest.raises(UserError, match="latent") as err:
        engine_for(model, tok, method, ratio, args)
    assert "Fix:" in str(err.value)
    engine_for(model, tok, method, 0.0, args)


def test_dense_layer_selects_keys_and_values_of_different_widths():
    from lcbench.cache.layer import DenseLayer

    layer = DenseLayer()
    keys, values = torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 8)
    layer.append(keys, values, torch.arange(6)[None], None)
    layer.select(torch.tensor([[[4, 1, 3]]]))
    assert torch.equal(layer.keys, keys[:, :, [1, 3, 4]]) and torch.equal(layer.values, values[:, :, [1, 3, 4]])


def test_block_sparse_kernel_with_narrower_values_equals_masked_attention():
    """MLA's values are narrower than its keys: the exact loop (and FlexAttention) still equal
    attention restricted to the pattern."""
    from lcbench.engine.attention import softmax_attention
    from lcbench.methods.sparse import flex
    from lcbench.methods.sparse.kernel import loop_block_sparse_attention
    from tests.test_sparse_softcap_sinks import pattern

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 70, 24, generator=gen), torch.randn(2, 2, 70, 24, generator=gen),
               torch.randn(2, 2, 70, 12, generator=gen))
    p = pattern()
    allowed = p.dense_mask().repeat_interleave(2, 1)
    want = softmax_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), 0.3, allowed=allowed).transpose(1, 2)
    assert torch.allclose(loop_block_sparse_attention(q, k, v, p, 0.3), want, atol=1e-5)
    if flex.available():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert torch.allclose(flex.flex_block_sparse_attention(q, k, v, p, 0.3, compiled=False), want, atol=1e-5)


def test_cli_runs_deepseek_and_refuses_a_key_reading_method(tmp_path):
    """What a user runs on a local DeepSeek-V3 checkpoint: snapkv and kivi exit 0 with their ratios,
    sharing one prefill and decoding together; knorm exits 2 naming the reason, no traceback."""
    folder = saved_family(tmp_path / "deepseek-v3", "deepseek-v3")
    common = ["--model", str(folder), "--ratio", "0.5", "--task", "niah", "--limit", "1",
              "--task-args", "lengths=320,depths=50,max_new_tokens=4"]
    proc = lcbench("run", *common, "--method", "snapkv,kivi", "--output-path", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = records_by_method(tmp_path / "out")
    assert sorted(records) == ["kivi", "snapkv"]
    assert all(rows and rows[0]["measured"]["achieved_ratio"] > 0.45 for rows in records.values())
    bad = lcbench("run", *common, "--method", "knorm", "--output-path", str(tmp_path / "bad"))
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "latent" in bad.stderr and "Fix:" in bad.stderr and "Traceback" not in bad.stderr


def test_quantized_layer_of_narrower_values_holds_the_planned_bytes():
    """int8 / KIVI on MLA's latent (keys 16 wide, values 8): each tensor gets its own channel groups,
    and the planner's byte count (which picks the window for a ratio) is what the layer holds."""
    from lcbench.cache.quantized import QuantizedLayer, QuantSpec

    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 1, 70, 16, generator=gen), torch.randn(1, 1, 70, 8, generator=gen)
    for spec in (QuantSpec(8, "token", 16, 6), QuantSpec(2, "channel", 8, 6)):
        layer = QuantizedLayer.from_dense(keys, values, torch.arange(70)[None, None], None, spec)
        assert layer.nbytes() == spec.nbytes(1, 1, 70, 16, 4, value_dim=8)
        k, v = layer.dense()
        assert k.shape == keys.shape and v.shape == values.shape
        assert torch.allclose(v, values, atol=0.1 if spec.bits == 8 else 2.0)
