"""EMS, CompressKV and task-aware KV compression (issue #15): what each paper promises, on
constructed tensors and on the tiny random Llama (ratio and ratio-0 identity come from
tests/test_dropping.py, which checks every registered kv_dropping method)."""

from __future__ import annotations

import pytest
import torch

from lcbench.cache.layer import DenseLayer
from lcbench.cache.ragged import RaggedLayer
from lcbench.engine.attach import use_lcbench_attention
from lcbench.engine.runner import Engine, EngineConfig
from lcbench.methods.base import LayerObservation
from lcbench.methods.chain import Chain, resolve_chain
from lcbench.methods.dropping.ems import EMS, global_local_scores
from lcbench.models.tiny import tiny_llama, tiny_tokenizer
from lcbench.tasks.sample import Sample, Turn

torch.set_num_threads(1)

CONTEXT = "Read the following text carefully. " + " ".join(
    f"The special magic number is {i * 7919 % 10000}. The quick brown fox jumps over the lazy dog." for i in range(20))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    m = tiny_llama(layers=2)
    use_lcbench_attention(m)
    return m


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
