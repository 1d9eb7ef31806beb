"""EMS, CompressKV and task-aware KV compression (issue #15): what each paper promises, on
constructed tensors and on the tiny random Llama (ratio and ratio-0 identity come from
tests/test_dropping.py, which checks every registered kv_dropping method)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lcbench.cache import KVCache
from lcbench.cache.layer import DenseLayer
from lcbench.cache.ragged import RaggedLayer
from lcbench.engine.decode import forward
from lcbench.engine.state import ForwardState
from lcbench.engine.timing import Stopwatch
from lcbench.engine.runner import Engine, EngineConfig
from lcbench.methods.base import LayerObservation, keep_count
from lcbench.methods.chain import Chain, resolve_chain
from lcbench.methods.dropping.compresskv import (CompressKV, allocate_layer_budgets, causal_probs, needle_scores,
                                                 run_captured, same_kind_layers)
from lcbench.methods.dropping.taskkv import TaskKV
from lcbench.methods.dropping.ems import EMS, global_local_scores
from lcbench.methods.registry import METHODS
from lcbench.tasks.sample import Sample, Turn
from test_dropping import CONTEXT as DROPPING_CONTEXT, model, tok  # noqa: F401  (fixtures)

torch.set_num_threads(1)

# the half-length context of test_dropping's (its first 20 sentences), and its fixtures
CONTEXT = DROPPING_CONTEXT[: DROPPING_CONTEXT.index("The special magic number is " + str(20 * 7919 % 10000))].rstrip()


def sample(turns: int = 1) -> Sample:
    return Sample("s0", CONTEXT, [Turn(question=f"Question: What is the number {i}? Answer:", answers=["x"],
                                       max_new_tokens=4, scorer="x") for i in range(turns)])


def run(model, tok, method: str, ratio: float, args: str | None = None, query_aware: bool = False) -> list[dict]:
    chain = Chain.build(resolve_chain(method, args, ratio), ratio)
    return Engine(model, tok, chain, EngineConfig(query_aware=query_aware)).run(sample(), multi_turn=False)


def dense_layer(keys: torch.Tensor, values: torch.Tensor) -> DenseLayer:
    layer = DenseLayer()
    b, h, n, _ = keys.shape
    layer.append(keys, values, torch.arange(n)[None].expand(b, n), None)
    return layer


def observation(attention_sum: torch.Tensor, window_attention: torch.Tensor, n: int) -> LayerObservation:
    return LayerObservation(layer_idx=0, num_layers=1, num_groups=1, context_length=n,
                            attention_sum=attention_sum, window_attention=window_attention,
                            positions=torch.arange(n)[None])


# --- EMS ------------------------------------------------------------------------------------------
def test_ems_global_score_removes_the_causal_visibility_bias():
    """Two keys that received the same summed attention: the later one was visible to fewer queries,
    so its global (per visible query) score is higher."""
    n = 10
    attention_sum = torch.full((1, 1, n), 0.1)
    attention_sum[0, 0, 1] = attention_sum[0, 0, 7] = 2.0
    window = torch.full((1, 1, 2, n), 1.0 / n)
    scores = global_local_scores(observation(attention_sum, window, n), window=2, global_weight=1.0)
    assert scores[0, 0, 7] > scores[0, 0, 1] > scores[0, 0, 0]
    assert torch.allclose(scores.sum(-1), torch.ones(1, 1))  # normalised per head


def test_ems_merges_similar_evicted_tokens_into_their_centre_and_evicts_the_rest():
    """Token 2 is kept (high score); token 5 has the same key direction (redundant) and is merged
    into it; token 6's key is orthogonal to every kept key (sparse) and goes to the zero class:
    its value reaches no kept token. Values are one-hot token ids, so each kept value shows what
    was merged into it."""
    n, d = 10, 16
    keys = torch.zeros(1, 1, n, d)
    for j in range(n):
        keys[0, 0, j, 8 + j % 4] = 1.0  # distinct directions for the fillers
    keys[0, 0, 2, :] = 0.0
    keys[0, 0, 2, 0] = 1.0
    keys[0, 0, 5, :] = 0.0
    keys[0, 0, 5, 0] = 2.0  # same direction as token 2
    keys[0, 0, 6, :] = 0.0
    keys[0, 0, 6, 1] = 1.0  # orthogonal to everything
    values = torch.eye(n, d)[None, None].clone()
    attention_sum = torch.full((1, 1, n), 0.05)
    attention_sum[0, 0, 2] = 3.0
    attention_sum[0, 0, 5] = 0.5
    window = torch.zeros(1, 1, 2, n)
    window[..., 2] = 0.5
    window[..., 8:] = 0.25
    seen = observation(attention_sum, window, n)
    for j in (0, 1, 3, 4, 7):  # the fillers are orthogonal to token 2 too (dims 8-11 vs dim 0)
        assert float(keys[0, 0, j] @ keys[0, 0, 2]) == 0.0
    stage = EMS(ratio=0.7, window_size=2, merge_threshold=0.5)  # keeps 3 of 10: token 2 + the window
    stage.begin_sample()
    out = stage.compress_layer(dense_layer(keys, values), seen)
    assert isinstance(out, RaggedLayer)
    kept = out.positions[0, 0].tolist()
    assert 2 in kept and 8 in kept and 9 in kept and 5 not in kept and 6 not in kept
    merged_into_2 = out.dense()[1][0, 0, kept.index(2)]
    assert merged_into_2[5] > 0.05 and merged_into_2[2] > merged_into_2[5]  # weighted by the scores
    assert torch.allclose(merged_into_2.sum(), torch.tensor(1.0))  # an average, not a sum
    assert all(float(out.dense()[1][0, 0, i, 6]) == 0.0 for i in range(len(kept)))  # zero class: evicted
    assert 0 < stage.sample_stats()["ems_merged_fraction"] < 1


def test_ems_gives_heads_with_spread_attention_more_budget():
    """Head 0's attention is concentrated on two tokens, head 1's is spread: one top-k over both heads
    gives head 1 more of the layer's budget (each head keeps at least its floor)."""
    n, d = 20, 8
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, n, d, generator=gen), torch.randn(1, 2, n, d, generator=gen)
    attention_sum = torch.full((1, 2, n), 1.0)
    attention_sum[0, 0] = 0.01
    attention_sum[0, 0, 3] = attention_sum[0, 0, 11] = 10.0
    window = attention_sum[:, :, None, :].expand(1, 2, 2, n) / attention_sum.sum(-1)[..., None, None]
    stage = EMS(ratio=0.5, window_size=2)
    stage.begin_sample()
    out = stage.compress_layer(dense_layer(keys, values), observation(attention_sum, window.contiguous(), n))
    counts = out.kept_tokens()[0]
    assert int(counts.sum()) == 2 * 10 and counts[1] > counts[0] >= 2
    assert {3, 11} <= set(out.positions[0, 0, : int(counts[0])].tolist())


def test_ems_on_the_model_is_ragged_and_records_its_merges(model, tok):
    rec = run(model, tok, "ems", 0.75, "window_size=8")[0]
    assert abs(rec["achieved_ratio"] - 0.75) <= 0.05
    assert 0 <= rec["ems_merged_fraction"] <= 1
    assert rec["ems_head_budget_min"] < rec["ems_head_budget_max"]


# --- CompressKV -----------------------------------------------------------------------------------
def test_compresskv_semantic_score_ranks_the_head_that_reads_the_needle_first():
    """Upstream's semantic retrieval score: the attention mass the answer queries put on the whole
    needle span. Head 0's answer queries point at the needle's keys, head 1's elsewhere."""
    L, d = 12, 8
    key = torch.zeros(1, 1, L, d)
    key[0, 0, :, 1] = 1.0
    key[0, 0, 4:6, 0] = 1.0  # the needle (slots 4, 5)
    query = torch.zeros(1, 2, L, d)
    query[0, 0, :, 0] = 6.0  # head 0 looks for the needle
    query[0, 1, :, 1] = 6.0  # head 1 attends every key alike
    scores = needle_scores(query, key, 1.0, (4, 6), range(10, 12))
    assert scores[0] > 1.9 and scores[1] < 0.5  # two answer queries, ≈ all of head 0's mass on the needle


def test_compresskv_keeps_what_its_retrieval_heads_read_in_every_head():
    """Query head 1 (KV head 0) is the layer's semantic retrieval head and reads tokens 3 and 4; the
    other heads read 10 and 11. CompressKV keeps 3 and 4 (and the window) in both KV heads; SnapKV,
    which averages every head of a group, keeps 10 and 11 in KV head 1."""
    n, hq = 20, 4
    window = torch.full((1, hq, 2, n), 0.01)
    window[:, 1, :, 3:5] = 1.0
    window[:, [0, 2, 3], :, 10:12] = 1.0
    seen = LayerObservation(layer_idx=0, num_layers=1, num_groups=2, context_length=n, window_attention=window,
                            positions=torch.arange(n)[None])
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, n, 4, generator=gen)
    stage = CompressKV(ratio=0.8, window_size=2, kernel_size=1)  # keeps 4 of 20
    stage.calibration = {"heads": [[1]], "importance": [1.0], "ratio": 0.8}
    stage.begin_sample()
    out = stage.compress_layer(dense_layer(keys, keys.clone()), seen)
    for head in range(2):
        assert out.positions[0, head].tolist() == [3, 4, 18, 19]
    snap = METHODS.get("snapkv")(ratio=0.8, window_size=2, kernel_size=1)
    assert {10, 11} <= set(snap.compress_layer(dense_layer(keys, keys.clone()), seen).positions[0, 1].tolist())


def test_compresskv_layer_budgets_follow_importance_and_sum_to_the_total():
    budgets = allocate_layer_budgets([0.6, 0.3, 0.1], 300, 32, 300)
    assert sum(budgets) == 300 and budgets[0] > budgets[1] > budgets[2] >= 32
    clipped = allocate_layer_budgets([0.9, 0.05, 0.05], 300, 32, 150)  # the cap moves tokens to the others
    assert sum(clipped) == 300 and clipped[0] == 150 and min(clipped) >= 32
    assert allocate_layer_budgets([0.5, 0.5], 64, 32, 96) == [32, 32]
    # sliding-window and full layers hold different numbers of tokens: each kind splits its own total
    module = SimpleNamespace(config=SimpleNamespace(layer_types=["sliding_attention", "full_attention"] * 2))
    seen = LayerObservation(layer_idx=1, num_layers=4, num_groups=1, context_length=8, module=module)
    assert same_kind_layers(seen) == [1, 3]
    assert same_kind_layers(dataclasses.replace(seen, module=None)) == [0, 1, 2, 3]


def test_compresskv_is_calibrated_by_the_engine_and_layers_keep_different_budgets(model, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("LCBENCH_CACHE", str(tmp_path))  # computed here, not read from an earlier run's cache
    chain = Chain.build(resolve_chain("compresskv", "first_k=2,probe_tokens=64", 0.75), 0.75)
    engine = Engine(model, tok, chain, EngineConfig())
    stage = chain.stages[0]
    cal = stage.calibration
    assert cal is not None and [(c.method, c.computed) for c in engine.calibrations] == [("compresskv", True)]
    assert [len(h) for h in cal["heads"]] == [2, 2] and all(0 <= h < 4 for hs in cal["heads"] for h in hs)
    assert abs(sum(cal["importance"]) - 1.0) < 1e-6 and all(e > 0 for e in cal["importance"])
    rec = engine.run(sample(), multi_turn=False)[0]
    assert abs(rec["achieved_ratio"] - 0.75) <= 0.05
    assert rec["compresskv_budget_min"] < rec["compresskv_budget_max"]  # layer-adaptive


# --- task-aware KV compression ------------------------------------------------------------------
def taskkv_prefill(model, tok, ratio: float, **args) -> tuple[KVCache, list[int], list[int]]:
    """What the engine does for a one-component taskkv chain: its scoring pass (context_inputs), then
    the compressing prefill of the context. Returns the cache, the context ids and the task ids."""
    stage = TaskKV(ratio=ratio, **args)
    stage.calibration = stage.calibrate(model, tok)
    stage.begin_sample()
    ids = tok(CONTEXT, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    layers = model.config.num_hidden_layers
    with torch.inference_mode():
        assert stage.context_inputs(model, x, len(ids), KVCache(layers)) is None
        cache = KVCache(layers)
        state = ForwardState(cache=cache, stages=[stage], needs=stage.needs, timer=Stopwatch("cpu"))
        state.compressing = True
        forward(model, x, torch.arange(len(ids))[None], state)
    return cache, ids, stage.calibration["task_ids"]


def test_taskkv_keeps_what_the_task_prompt_attends_to_and_drops_the_prompt(model, tok):
    """Reference, computed independently with plain attention: the attention of every task-prompt
    query over the context (mean over the prompt, avg-pooled over 5, mean over each KV group), top-k
    per KV head. The kept cache holds exactly those context tokens, and none of the prompt's."""
    few_shot = ["What is the special magic number?", "Which animal jumps over the dog?"]
    cache, ids, task_ids = taskkv_prefill(model, tok, 0.75, few_shot=few_shot)
    n, T = len(ids), len(task_ids)
    keep = keep_count(n, 0.75)
    reference = {}

    def score(module, query, key, value, scaling):
        probs = causal_probs(query, key, scaling, range(n, n + T))[:, :, :n].mean(1)  # (Hq, n)
        pooled = F.avg_pool1d(probs[:, None], kernel_size=5, padding=2, stride=1)[:, 0, :n]
        per_kv = pooled.reshape(key.shape[1], -1, n).mean(1)
        reference[module.layer_idx] = [sorted(r) for r in per_kv.topk(keep, dim=-1).indices.tolist()]

    with torch.inference_mode():
        run_captured(model, ids + task_ids, score)
    assert "Example questions" in tok.decode(task_ids) and "magic number" in tok.decode(task_ids)
    for i, layer in enumerate(cache.layers):
        assert layer.seq_len() == keep and int(layer.positions.max()) < n  # the task prompt is not stored
        assert [layer.positions[0, h].tolist() for h in range(layer.positions.shape[1])] == reference[i]


def test_taskkv_selection_follows_the_task(model, tok):
    a, _, _ = taskkv_prefill(model, tok, 0.75, few_shot=["What is the special magic number?"])
    b, _, _ = taskkv_prefill(model, tok, 0.75, task="Summarise the story of the fox and the dog.")
    assert any(not torch.equal(x.positions, y.positions) for x, y in zip(a.layers, b.layers))


def test_taskkv_meets_its_ratio_query_aware_and_is_calibrated_by_the_engine(model, tok):
    rec = run(model, tok, "taskkv", 0.5, query_aware=True)[0]
    assert abs(rec["achieved_ratio"] - 0.5) <= 0.05
    assert rec["taskkv_prompt_tokens"] > 10
    chain = Chain.build(resolve_chain("taskkv", None, 0.5), 0.5)
    engine = Engine(model, tok, chain, EngineConfig(query_aware=True))
    assert [c.method for c in engine.calibrations] == ["taskkv"]
