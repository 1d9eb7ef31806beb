"""Soft compression: kvmerge (SnapKV's kept set, merged averages), pool (mean-pooled embeddings
through the engine's ``context_inputs`` hook) and the adapter for trained compressors, proven end
to end with tiny compressors defined in this file and loaded from a folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from helpers import make_sample

from lcbench.cache.layer import DenseLayer
from lcbench.engine import runner
from lcbench.engine.runner import Engine, EngineConfig
from lcbench.errors import UserError
from lcbench.methods.base import LayerObservation
from lcbench.methods.chain import Chain, resolve_chain
from lcbench.methods.registry import METHODS
from lcbench.methods.soft.adapter import SoftContext
from lcbench.methods.soft.kvmerge import merge_evicted
from lcbench.methods.soft.pool import chunk_bounds, mean_pool

torch.set_num_threads(1)  # steadier than 2 on a shared 2-core machine


# --- tiny soft compressors (the adapter loads this very file from a compressor folder) ---------
class AttentionPoolCompressor:
    """Learned attention pooling: each chunk of the context becomes the softmax(w·e)-weighted sum
    of its input embeddings; ``w`` is read from weights.safetensors."""

    def __init__(self, w: torch.Tensor):
        self.w = w

    @classmethod
    def from_pretrained(cls, folder: str):
        return cls(load_file(str(Path(folder) / "weights.safetensors"))["w"])

    def compress(self, model, ids, ratio):
        embeds = model.get_input_embeddings()(ids)[0]  # (n, h)
        n = embeds.shape[0]
        slots = max(1, round(n * (1 - ratio)))
        bounds = chunk_bounds(n, slots).tolist()
        out = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            weight = (embeds[a:b] @ self.w.to(embeds.dtype)).softmax(0)
            out.append((weight[:, None] * embeds[a:b]).sum(0))
        positions = torch.tensor(bounds[1:])[None] - 1
        return SoftContext(positions=positions, embeds=torch.stack(out)[None])


class IdentityEmbedsCompressor:
    """Returns the context's own embeddings at their own positions (no compression)."""

    @classmethod
    def from_pretrained(cls, folder: str):
        return cls()

    def compress(self, model, ids, ratio):
        return SoftContext(positions=torch.arange(ids.shape[1])[None], embeds=model.get_input_embeddings()(ids))


class StrideKVCompressor:
    """Runs the target model on the context and keeps the KV of every ``stride``-th token
    (stride 1: the exact cache a plain prefill makes)."""

    def __init__(self, stride: int):
        self.stride = stride

    @classmethod
    def from_pretrained(cls, folder: str):
        return cls(json.loads((Path(folder) / "lcbench_compressor.json").read_text())["stride"])

    def compress(self, model, ids, ratio):
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=ids, cache=cache, use_cache=True)
        keep = torch.arange(0, ids.shape[1], self.stride)
        keep[-1:] = ids.shape[1] - 1 if self.stride > 1 else keep[-1:]  # the last context token stays
        kv = [(layer.keys[:, :, keep], layer.values[:, :, keep]) for layer in cache.layers]
        return SoftContext(positions=keep[None], kv=kv)


def compressor_folder(tmp_path: Path, class_name: str, **config) -> str:
    folder = tmp_path / class_name
    folder.mkdir()
    shutil.copy(__file__, folder / "compressor.py")
    (folder / "lcbench_compressor.json").write_text(json.dumps({"class": f"compressor.py:{class_name}", **config}))
    return str(folder)


@pytest.fixture(scope="module")
def sample():
    return make_sample(n_turns=2, max_new_tokens=8)


def run(tiny, sample, method, ratio, args=None, query_aware=False, check=True):
    """The engine's records, each with the token ids it decoded under ``_ids``."""
    model, tok = tiny
    chain = Chain.build(resolve_chain(method, args, ratio), ratio)
    decoded, real = [], runner.greedy_decode
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "greedy_decode", lambda *a, **k: decoded.extend(real(*a, **k)) or decoded[-len(a[3]):])
        recs = Engine(model, tok, chain, EngineConfig(query_aware=query_aware, check_ratio=check)).run(sample, multi_turn=False)
    return [{**rec, "_ids": row.tokens} for rec, row in zip(recs, decoded)]


def tokens(recs):
    return [r["_ids"] for r in recs]


# --- kvmerge --------------------------------------------------------------------------------
def test_merge_evicted_is_the_weighted_average_into_the_most_similar_kept_key():
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])[None, None]
    values = torch.tensor([[1.0], [2.0], [3.0], [4.0]])[None, None]
    kept = torch.tensor([[[0, 2]]])
    weights = torch.tensor([[[1.0, 3.0, 1.0, 1.0]]])
    k, v = merge_evicted(keys, values, kept, weights, n_ctx=4, valid=None)
    eps = 1e-6  # merge_evicted's floor on weights
    w0, w1 = 1 + eps, 3 + eps
    assert torch.allclose(v[0, 0, 0], torch.tensor([(w0 * 1 + w1 * 2) / (w0 + w1)]))  # slot 1 → slot 0
    assert torch.allclose(v[0, 0, 2], torch.tensor([3.5]))  # slot 3 → slot 2, equal weights
    assert torch.allclose(k[0, 0, 0], (w0 * keys[0, 0, 0] + w1 * keys[0, 0, 1]) / (w0 + w1))
    assert torch.equal(v[0, 0, 1], values[0, 0, 1])  # evicted slots are left for select() to drop


def test_kvmerge_keeps_snapkvs_slots_and_bytes(tiny, sample):
    snap = run(tiny, sample, "snapkv", 0.5, "window_size=16")
    merged = run(tiny, sample, "kvmerge", 0.5, "window_size=16")
    assert merged[0]["kv_bytes"] == snap[0]["kv_bytes"] and merged[0]["kept_tokens"] == snap[0]["kept_tokens"]
    assert merged[0]["achieved_ratio"] == pytest.approx(0.5, abs=0.01)

    stage = METHODS.get("kvmerge")(ratio=0.5, window_size=4)
    layer = DenseLayer()
    gen = torch.Generator().manual_seed(0)
    layer.append(torch.randn(1, 2, 20, 8, generator=gen), torch.randn(1, 2, 20, 8, generator=gen), torch.arange(20)[None], None)
    seen = LayerObservation(layer_idx=0, num_layers=1, num_groups=2, context_length=20,
                            window_attention=torch.rand(1, 4, 4, 20, generator=gen).softmax(-1))
    snap_layer = DenseLayer()
    snap_layer.append(layer.keys.clone(), layer.values.clone(), torch.arange(20)[None], None)
    out = stage.compress_layer(layer, seen)
    ref = METHODS.get("snapkv")(ratio=0.5, window_size=4).compress_layer(snap_layer, seen)
    assert torch.equal(out.positions, ref.positions)
    assert not torch.equal(out.values, ref.values)  # same slots, merged contents


def test_kvmerge_ratio_zero_is_token_identical(tiny, sample):
    assert tokens(run(tiny, sample, "kvmerge", 0.0)) == tokens(run(tiny, sample, "full", 0.0))


def test_kvmerge_query_aware_keeps_the_question(tiny, sample):
    recs = run(tiny, sample, "kvmerge", 0.5, "window_size=16", query_aware=True)
    assert len(recs) == 2 and recs[0]["achieved_ratio"] == pytest.approx(0.5, abs=0.02)


def test_kvmerge_after_quantization_is_a_clear_error(tiny, sample):
    with pytest.raises(UserError, match="before any quantization"):
        run(tiny, sample, "kivi+kvmerge", 0.5, "kvmerge.window_size=16", check=False)


# --- pool -----------------------------------------------------------------------------------
def test_mean_pool_over_near_equal_chunks():
    assert chunk_bounds(10, 3).tolist() == [0, 3, 6, 10]
    x = torch.arange(10, dtype=torch.float32)[None, :, None]
    assert mean_pool(x, chunk_bounds(10, 3))[0, :, 0].tolist() == [1.0, 4.0, 7.5]


def test_pool_inputs_keep_the_sink_and_true_positions(tiny):
    model, _ = tiny
    ids = torch.arange(3, 23)[None]  # 20 context tokens + 0 question
    inputs = METHODS.get("pool")(ratio=0.5).context_inputs(model, ids, 20, None)
    assert inputs.embeds.shape[1] == 10 and inputs.positions.tolist() == [[0, 2, 4, 6, 8, 10, 12, 14, 16, 19]]
    emb = model.get_input_embeddings()(ids)
    assert torch.allclose(inputs.embeds[0, 0], emb[0, 0]) and torch.allclose(inputs.embeds[0, 1], emb[0, 1:3].mean(0))
    q = torch.arange(30, 35)[None]  # query-aware: the question is not pooled
    aware = METHODS.get("pool")(ratio=0.5).context_inputs(model, torch.cat([ids, q], 1), 20, None)
    assert aware.positions[0, -5:].tolist() == [20, 21, 22, 23, 24]
    assert aware.embeds.shape[1] == 12  # keep_count(25, 0.5) = 12 positions: sink, 6 pooled, 5 question


def test_pool_in_the_engine_equals_a_plain_forward_of_the_pooled_embeddings(tiny, sample):
    model, tok = tiny
    recs = run(tiny, sample, "pool", 0.75)
    assert recs[0]["achieved_ratio"] == pytest.approx(0.75, abs=0.01)
    from lcbench.engine.prompt import render

    prompt = render(tok, sample, sample.context, False)
    ctx = torch.tensor([prompt.context_ids])
    inputs = METHODS.get("pool")(ratio=0.75).context_inputs(model, ctx, ctx.shape[1], None)
    q = torch.tensor([prompt.turn_ids[0]])
    embeds = torch.cat([inputs.embeds, model.get_input_embeddings()(q)], 1)
    positions = torch.cat([inputs.positions, torch.arange(ctx.shape[1], ctx.shape[1] + q.shape[1])[None]], 1)
    with torch.no_grad():
        first = model(inputs_embeds=embeds, position_ids=positions).logits[0, -1].argmax()
    assert recs[0]["_ids"][0] == int(first)


def test_pool_ratio_zero_is_token_identical(tiny, sample):
    assert tokens(run(tiny, sample, "pool", 0.0)) == tokens(run(tiny, sample, "full", 0.0))


def test_pool_composes_with_a_cache_stage(tiny, sample):
    recs = run(tiny, sample, "pool+snapkv", 0.75, "window_size=8")
    assert recs[0]["achieved_ratio"] == pytest.approx(0.75, abs=0.02)


@pytest.mark.parametrize("cache_stage", ["chunkkv", "h2o", "expected_attention", "tova", "leverage"])
def test_pool_composes_with_stages_that_map_positions_to_slots(tiny, sample, cache_stage):
    """After ``pool`` a slot's index is no longer its position: stages that look tokens up by
    position (chunkkv's index reuse, h2o's accumulated scores, RoPE undone at the query positions)
    must still run and meet the chain's budget."""
    recs = run(tiny, sample, f"pool+{cache_stage}", 0.75)
    assert recs[0]["achieved_ratio"] == pytest.approx(0.75, abs=0.03)


def test_chunkkv_index_reuse_keeps_the_same_pooled_tokens(tiny, sample):
    model, tok = tiny
    from lcbench.engine.prompt import render

    chain = Chain.build(resolve_chain("pool+chunkkv", "index_reuse=2,chunk_size=4", 0.75), 0.75)
    engine = Engine(model, tok, chain, EngineConfig())
    prompt = render(tok, sample, sample.context, False)
    cache = engine.prefill([prompt.context_ids]).cache
    first, second = (layer.positions for layer in cache.layers[:2])
    assert torch.equal(first, second)  # layer 1 reused layer 0's kept tokens
    inputs = METHODS.get("pool")(ratio=chain.stages[0].ratio).context_inputs(
        model, torch.tensor([prompt.context_ids]), len(prompt.context_ids), None)
    assert set(first.flatten().tolist()) <= set(inputs.positions.flatten().tolist())


def test_query_positions_are_the_pass_positions():
    from lcbench.methods.base import LayerObservation
    from lcbench.methods.dropping.select import pass_slots, query_positions

    pooled = torch.tensor([[0, 5, 11, 17, 18, 19]])  # sink, 2 pooled chunks, then 3 real tokens
    seen = LayerObservation(layer_idx=0, num_layers=1, num_groups=1, context_length=6,
                            queries=torch.zeros(1, 1, 3, 4), positions=pooled)
    assert query_positions(seen).tolist() == [17, 18, 19]
    assert pass_slots(seen, torch.tensor([[[5, 18]]])).tolist() == [[[1, 4]]]


# --- the adapter for trained compressors ------------------------------------------------------
def test_adapter_runs_a_trained_compressor_from_a_folder(tmp_path, tiny, sample):
    folder = compressor_folder(tmp_path, "AttentionPoolCompressor")
    save_file({"w": torch.randn(64, generator=torch.Generator().manual_seed(0))}, str(Path(folder) / "weights.safetensors"))
    recs = run(tiny, sample, "soft_compressor", 0.5, f"path={folder},trust_code=true")
    assert recs[0]["achieved_ratio"] == pytest.approx(0.5, abs=0.01) and len(recs) == 2
    aware = run(tiny, sample, "soft_compressor", 0.5, f"path={folder},trust_code=true", query_aware=True)
    assert aware[0]["achieved_ratio"] == pytest.approx(0.5, abs=0.01)  # the uncompressed question is budgeted


@pytest.mark.parametrize("class_name,config", [("IdentityEmbedsCompressor", {}), ("StrideKVCompressor", {"stride": 1})])
def test_adapter_identity_compressors_are_token_identical(tmp_path, tiny, sample, class_name, config):
    """Embeddings and KV handed over by a compressor that keeps everything reproduce ``full``
    exactly: both paths of the adapter are lossless."""
    folder = compressor_folder(tmp_path, class_name, **config)
    full = run(tiny, sample, "full", 0.0)
    recs = run(tiny, sample, "soft_compressor", 0.5, f"path={folder},trust_code=true", check=False)
    assert tokens(recs) == tokens(full) and recs[0]["kv_bytes"] == full[0]["kv_bytes"]
    aware = run(tiny, sample, "soft_compressor", 0.5, f"path={folder},trust_code=true", query_aware=True, check=False)
    assert tokens(aware) == tokens(run(tiny, sample, "full", 0.0, query_aware=True))


def test_adapter_kv_compressor_compresses(tmp_path, tiny, sample):
    folder = compressor_folder(tmp_path, "StrideKVCompressor", stride=2)
    recs = run(tiny, sample, "soft_compressor", 0.5, f"path={folder},trust_code=true")
    assert recs[0]["achieved_ratio"] == pytest.approx(0.5, abs=0.01)


def test_adapter_errors_name_the_fix(tmp_path, tiny, sample):
    folder = compressor_folder(tmp_path, "IdentityEmbedsCompressor")
    with pytest.raises(UserError, match="trust_code=true"):
        run(tiny, sample, "soft_compressor", 0.5, f"path={folder}")
    with pytest.raises(UserError, match="lcbench_compressor.json"):
        run(tiny, sample, "soft_compressor", 0.5, f"path={tmp_path}")
    with pytest.raises(UserError, match="path="):
        run(tiny, sample, "soft_compressor", 0.5)
    assert tokens(run(tiny, sample, "soft_compressor", 0.0)) == tokens(run(tiny, sample, "full", 0.0))
