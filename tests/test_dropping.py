"""KV-dropping methods on a tiny random Llama (4 query heads, 2 KV heads): requested vs measured
ratio, the positions each method promises to keep, token identity at ratio 0, per-layer and
per-head budgets, decode-time eviction. Helpers here are shared with the quantization and
kvpress tests."""

from __future__ import annotations

import sys

import pytest
import torch

from lcbench.cache import KVCache
from lcbench.cache.layer import DenseLayer
from lcbench.cache.ragged import RaggedLayer
from lcbench.engine.decode import forward, greedy_decode
from lcbench.engine import runner
from lcbench.engine.runner import Engine, EngineConfig
from lcbench.engine.state import QUESTION, ForwardState
from lcbench.engine.timing import Stopwatch
from lcbench.errors import CompressionShortfall, UserError
from lcbench.methods.chain import Chain, resolve_chain
from lcbench.methods.dropping.decode_eviction import EvictingLayer
from lcbench.methods.dropping.pyramidkv import layer_budget
from lcbench.methods.registry import METHODS
from lcbench.engine.attach import use_lcbench_attention
from lcbench.models.tiny import tiny_llama, tiny_tokenizer
from lcbench.tasks.sample import Sample, Turn

torch.set_num_threads(1)  # the CI machine is shared; one thread is steadier


def _family(family: str) -> list[str]:
    """Every registered built-in method of ``family`` (found by the registry, no list kept here)."""
    return sorted(n for n in METHODS.names() if METHODS.get(n).family == family)


DROPPING, QUANTIZATION = _family("kv_dropping"), _family("kv_quantization")
RATIOS = (0.25, 0.5, 0.75, 0.9)
CONTEXT = "Read the following text carefully. " + " ".join(
    f"The special magic number is {i * 7919 % 10000}. The quick brown fox jumps over the lazy dog." for i in range(40))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    m = tiny_llama(layers=2)
    use_lcbench_attention(m)
    return m


@pytest.fixture(scope="module")
def model4():
    m = tiny_llama(layers=4, seed=1)
    use_lcbench_attention(m)
    return m


def make_sample(context: str = CONTEXT, turns: int = 2, max_new_tokens: int = 8) -> Sample:
    return Sample("s0", context, [Turn(question=f"Question: What is the number {i}? Answer:", answers=["x"],
                                       max_new_tokens=max_new_tokens, scorer="x") for i in range(turns)])


def chain(method: str, ratio: float, args: str | None = None) -> Chain:
    return Chain.build(resolve_chain(method, args, ratio), ratio)


def window_args(method: str, window: int) -> str | None:
    """``window_size=<window>`` for the methods of a chain that take it (a short context needs a short window)."""
    takes = any("window_size" in {p.name for p in METHODS.get(m).params} for m in method.split("+"))
    return f"window_size={window}" if takes else None


def run(model, tok, method: str, ratio: float, args: str | None = None, sample: Sample | None = None,
        query_aware: bool = False, multi_turn: bool = False, check: bool = True) -> list[dict]:
    engine = Engine(model, tok, chain(method, ratio, args), EngineConfig(query_aware=query_aware, check_ratio=check))
    return engine.run(sample or make_sample(), multi_turn=multi_turn)


def prefill(model, ch: Chain, ids: list[int], protected: int = 0) -> tuple[KVCache, torch.Tensor]:
    """A compressing prefill of ``ids`` (what Engine.prefill does), returning the cache and logits."""
    for stage in ch.stages:
        stage.begin_sample()
    cache = KVCache(model.config.num_hidden_layers)
    state = ForwardState(cache=cache, stages=ch.stages, needs=ch.needs, timer=Stopwatch("cpu"))
    state.compressing, state.protected = True, protected
    with torch.inference_mode():
        logits = forward(model, torch.tensor([ids]), torch.arange(len(ids))[None], state)
    return cache, logits


def context_ids(tok, text: str = CONTEXT) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def kept_positions(layer, row: int = 0, head: int = 0) -> list[int]:
    pos, valid = layer.positions[row, head], layer.valid
    if valid is not None:
        pos = pos[valid[row, head]]
    return sorted(pos.tolist())


# --- registry and presets --------------------------------------------------------------------
def test_every_method_is_registered_with_paper_family_and_defaults():
    for name in (*DROPPING, *QUANTIZATION):
        cls = METHODS.get(name)
        assert cls.name == name
        assert cls.__module__.startswith("lcbench.methods." + ("dropping" if name in DROPPING else "quantization"))
        assert cls.summary and cls.paper
        if "arXiv:" in cls.paper:  # the docstring cites the same paper
            arxiv = cls.paper.split("arXiv:")[1][:10]
            assert arxiv in (sys.modules[cls.__module__].__doc__ or "") + (cls.__doc__ or ""), name
        else:
            assert name in ("random", "int8", "int4"), name
        assert all(p.default is not None for p in cls.params), name
        assert "cache" in cls.stages or "context_inputs" in cls.stages  # ilre prefills only what it recalls


# --- the ratio knob --------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(DROPPING))
def test_achieved_ratio_within_tolerance(model, tok, method):
    for ratio in RATIOS:
        if ratio >= getattr(METHODS.get(method), "max_ratio", 1.0):  # a ratio it cannot reach: refused up front
            with pytest.raises(UserError, match="cannot be reached"):
                run(model, tok, method, ratio, args=window_args(method, 16))
            continue
        records = run(model, tok, method, ratio, args=window_args(method, 16),
                      query_aware=METHODS.get(method).needs_question)  # finch: the question is its window
        achieved = records[0]["achieved_ratio"]
        assert abs(achieved - ratio) <= METHODS.get(method).tolerance, (method, ratio, achieved)
        assert records[0]["kv_bytes"] < records[0]["kv_bytes_full"]


def run_tokens(model, tok, method: str, ratio: float, sample: Sample) -> tuple[list[list[int]], list[dict]]:
    """The token ids the Engine decoded (per turn) and its records."""
    decoded: list[list[int]] = []
    real = runner.greedy_decode

    def spy(*args, **kwargs):
        rows = real(*args, **kwargs)
        decoded.extend(row.tokens for row in rows)
        return rows

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "greedy_decode", spy)
        records = run(model, tok, method, ratio, sample=sample)
    return decoded, records


@pytest.fixture(scope="module")
def full_tokens(model, tok):
    return run_tokens(model, tok, "full", 0.0, make_sample(max_new_tokens=12))


@pytest.mark.parametrize("method", sorted(DROPPING) + sorted(QUANTIZATION))
def test_ratio_zero_is_token_identical_to_full(model, tok, full_tokens, method):
    full_ids, full = full_tokens
    ids, got = run_tokens(model, tok, method, 0.0, make_sample(max_new_tokens=12))
    assert len(ids) == 2 and all(len(t) == 12 for t in full_ids)
    assert ids == full_ids
    assert got[0]["kv_bytes"] == full[0]["kv_bytes"]


def test_query_aware_keeps_the_question_and_meets_the_ratio(model, tok):
    sample = make_sample(turns=1)
    for method in ("snapkv", "h2o", "adakv", "pyramidkv"):
        rec = run(model, tok, method, 0.5, args=window_args(method, 8), sample=sample, query_aware=True)[0]
        assert abs(rec["achieved_ratio"] - 0.5) <= 0.05, method
    ids = context_ids(tok)
    question = tok(sample.turns[0].question, add_special_tokens=False)["input_ids"]
    cache, _ = prefill(model, chain("snapkv", 0.75, "window_size=4"), ids + question, protected=len(question))
    kept = kept_positions(cache.layers[0])
    assert kept[-len(question):] == list(range(len(ids), len(ids) + len(question)))


# --- positions each method promises ------------------------------------------------------------
def test_streamingllm_keeps_sinks_and_the_recent_window(model, tok):
    ids = context_ids(tok)
    cache, _ = prefill(model, chain("streamingllm", 0.75, "n_sink=4"), ids)
    n = len(ids)
    k = round(n * 0.25)
    for layer in cache.layers:
        for head in range(layer.positions.shape[1]):
            assert kept_positions(layer, head=head) == list(range(4)) + list(range(n - (k - 4), n))


def test_snapkv_keeps_the_observation_window(model, tok):
    ids = context_ids(tok)
    cache, _ = prefill(model, chain("snapkv", 0.9, "window_size=16"), ids)
    n = len(ids)
    for layer in cache.layers:
        for head in range(2):
            kept = kept_positions(layer, head=head)
            assert len(kept) == round(n * 0.1)
            assert kept[-16:] == list(range(n - 16, n))


def test_tova_keeps_the_last_token_and_the_same_tokens_in_every_head(model, tok):
    ids = context_ids(tok)
    cache, _ = prefill(model, chain("tova", 0.8), ids)
    for layer in cache.layers:
        assert kept_positions(layer, head=0) == kept_positions(layer, head=1)
        assert kept_positions(layer)[-1] == len(ids) - 1


def test_knorm_keeps_the_lowest_norm_keys(model, tok):
    ids = context_ids(tok)
    full, _ = prefill(model, chain("full", 0.0), ids)
    cache, _ = prefill(model, chain("knorm", 0.5), ids)
    for layer_full, layer in zip(full.layers, cache.layers):
        norms = layer_full.keys.float().norm(dim=-1)[0]  # (H, n)
        for head in range(norms.shape[0]):
            kept = kept_positions(layer, head=head)
            dropped = sorted(set(range(len(ids))) - set(kept))
            assert len(kept) == round(len(ids) * 0.5)
            # RoPE keeps norms, so repeated tokens tie: compare values, not index sets
            assert norms[head, kept].max() <= norms[head, dropped].min() + 1e-5


def test_h2o_keeps_the_recent_half_of_its_budget(model, tok):
    ids = context_ids(tok)
    cache, _ = prefill(model, chain("h2o", 0.5), ids)
    n, k = len(ids), round(len(ids) * 0.5)
    recent = round(k * 0.5)
    for layer in cache.layers:
        assert kept_positions(layer)[-recent:] == list(range(n - recent, n))


def test_expected_attention_and_compactor_keep_their_sinks(model, tok):
    ids = context_ids(tok)
    n = len(ids)
    cache, _ = prefill(model, chain("expected_attention", 0.9), ids)
    assert kept_positions(cache.layers[1])[:4] == [0, 1, 2, 3]
    cache, _ = prefill(model, chain("compactor", 0.9, "chunk_size=32"), ids)
    kept = kept_positions(cache.layers[1])
    assert kept[:8] == list(range(8)) and kept[-4:] == list(range(n - 4, n))


def test_chunkkv_keeps_whole_chunks_and_reuses_indices_across_layers(model4, tok):
    ids = context_ids(tok)
    cache, _ = prefill(model4, chain("chunkkv", 0.5, "chunk_size=10,index_reuse=2,window_size=8"), ids)
    first = kept_positions(cache.layers[0])
    assert first == kept_positions(cache.layers[1])  # reused
    assert first != kept_positions(cache.layers[2])  # a new group scores again
    assert kept_positions(cache.layers[0], head=0) == kept_positions(cache.layers[0], head=1)
    chunks: dict[int, int] = {}
    for p in first:
        chunks[p // 10] = chunks.get(p // 10, 0) + 1
    n_chunks = -(-len(ids) // 10)
    partial = [c for c, count in chunks.items() if count < min(10, len(ids) - 10 * c)]
    assert len(partial) <= 2, partial  # at most the budget's last chunk and the one the window cuts
    assert n_chunks - 1 in chunks  # the window's chunk


def test_qfilters_freezes_its_calibrated_filters(model, tok):
    stage = chain("qfilters", 0.5, "calibration_samples=1").stages[0]
    ids = context_ids(tok)
    ch = Chain([stage], 0.5)
    prefill(model, ch, ids)
    frozen = stage.filters(0).clone()
    prefill(model, ch, context_ids(tok, "What is the best thing to do in San Francisco? " * 20))
    assert torch.equal(stage.filters(0), frozen)
    assert torch.allclose(stage.filters(0).norm(dim=-1), torch.ones(2))


def test_leverage_scores_an_outlier_key_highest():
    from lcbench.methods.dropping.leverage import leverage_scores

    gen = torch.Generator().manual_seed(0)
    keys = torch.randn((1, 1, 200, 16), generator=gen) * torch.linspace(0.1, 1, 16)
    keys[0, 0, 17] += 25 * torch.nn.functional.one_hot(torch.tensor(0), 16).float()
    for sketch in (8, 48):
        assert int(leverage_scores(keys, sketch, 0)[0, 0].argmax()) == 17


# --- layer-wise and head-wise budgets --------------------------------------------------------------
def test_pyramid_budgets_decrease_over_layers_and_average_the_uniform_budget():
    budgets = [layer_budget(1000, 500, 16, 4, i, 8) for i in range(8)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
    assert abs(sum(budgets) / 8 - 500) <= 1
    assert budgets[-1] == round(500 / 4 + 0)  # the last layer keeps mean/beta
    assert layer_budget(100, 50, 64, 20, 0, 8) == 50  # no pyramid fits: uniform


def test_pyramidkv_layers_hold_different_lengths_and_decode(model4, tok):
    sample = make_sample()
    rec = run(model4, tok, "pyramidkv", 0.5, args="window_size=8,beta=2", sample=sample)
    assert abs(rec[0]["achieved_ratio"] - 0.5) <= 0.05
    cache, _ = prefill(model4, chain("pyramidkv", 0.5, "window_size=8,beta=2"), context_ids(tok))
    lengths = cache.seq_lengths()
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]


def test_pyramidkv_records_when_it_falls_back_to_uniform_budgets(model4, tok):
    # ~800 context tokens, window 8, beta 20: at 0.5 the last layer keeps mean/20 ≈ 20 ≥ 8 tokens
    # (a pyramid); at 0.9 mean/20 ≈ 4 < window, so every layer keeps the uniform budget (= SnapKV)
    args = "window_size=8,beta=20"
    cache, _ = prefill(model4, chain("pyramidkv", 0.5, args), context_ids(tok))
    lengths = cache.seq_lengths()
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]
    rec = run(model4, tok, "pyramidkv", 0.5, args=args)[0]
    assert rec["pyramid_uniform_layers"] == 0.0
    assert rec["pyramid_budget_min"] < rec["pyramid_budget_max"]

    cache, _ = prefill(model4, chain("pyramidkv", 0.9, args), context_ids(tok))
    assert len(set(cache.seq_lengths())) == 1
    rec = run(model4, tok, "pyramidkv", 0.9, args=args)[0]
    assert rec["pyramid_uniform_layers"] == 1.0
    assert rec["pyramid_budget_min"] == rec["pyramid_budget_max"]
    assert abs(rec["achieved_ratio"] - 0.9) <= 0.05
    assert "SnapKV" in sys.modules["lcbench.methods.dropping.pyramidkv"].__doc__
    assert "pyramid_uniform_layers" in {p.name: p.help for p in METHODS.get("pyramidkv").params}["beta"]


def test_adakv_heads_hold_different_counts_and_bytes_fall_with_them(model, tok):
    ids = context_ids(tok)
    cache, _ = prefill(model, chain("adakv", 0.75, "window_size=8"), ids)
    k = round(len(ids) * 0.25)
    for layer in cache.layers:
        assert isinstance(layer, RaggedLayer)
        counts = layer.kept_tokens()[0]
        assert int(counts.sum()) == 2 * k and counts[0] != counts[1]
        assert counts.min() >= int(k * 0.2)
        head_dim = layer.flat_keys.shape[-1]
        assert layer.nbytes() == 2 * int(counts.sum()) * head_dim * 4  # no padding stored
    rec = run(model, tok, "adakv", 0.75, args="window_size=8")
    assert abs(rec[0]["achieved_ratio"] - 0.75) <= 0.05


def test_ragged_layer_round_trips_select_crop_and_repeat():
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn((1, 2, 6, 4), generator=gen), torch.randn((1, 2, 6, 4), generator=gen)
    positions = torch.arange(6).expand(1, 2, 6)
    keep = torch.tensor([[[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 0, 1]]], dtype=torch.bool)
    layer = RaggedLayer.from_mask(keys, values, positions, keep)
    layer.append(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), torch.tensor([[6]]), None)
    k, _ = layer.dense()
    assert layer.positions.shape == (1, 2, 5) and layer.valid[0, 1].tolist() == [True, True, False, False, True]
    assert torch.equal(k[0, 1, :2], keys[0, 1, [2, 5]]) and torch.equal(k[0, 1, 4], torch.ones(4))
    twice = layer.repeat_rows(2)
    assert torch.equal(twice.dense()[0][1][twice.valid[1]], k[0][layer.valid[0]])
    layer.crop_to(4)  # forget the appended token
    assert kept_positions(layer, head=0) == [0, 2, 3, 5] and kept_positions(layer, head=1) == [2, 5]


# --- decode-time eviction ------------------------------------------------------------------------
def decode_with(model, tok, ch: Chain, max_new: int = 10):
    """Compress, prefill one question and decode; returns the cache and its lengths at decode start."""
    ids = context_ids(tok)
    cache, _ = prefill(model, ch, ids)
    question = tok("Question: What is the number? Answer:", add_special_tokens=False)["input_ids"]
    state = ForwardState(cache=cache, stages=ch.stages, needs=ch.needs, timer=Stopwatch("cpu"))
    state.phase = QUESTION
    start = len(ids)
    with torch.inference_mode():
        logits = forward(model, torch.tensor([question]), (start + torch.arange(len(question)))[None], state)
        before = cache.seq_lengths()
        out = greedy_decode(model, tok, state, logits, torch.tensor([start + len(question)]), [max_new],
                            set(), [()])  # no EOS: decode all tokens
    return cache, before, out[0], len(ids), len(question)


def test_streamingllm_rolls_during_decoding(model, tok):
    cache, before, out, n, q = decode_with(model, tok, chain("streamingllm", 0.5))
    assert len(out.tokens) == 10
    assert cache.seq_lengths() == before  # constant size: one eviction per generated token
    kept = kept_positions(cache.layers[0])
    assert kept[:4] == [0, 1, 2, 3]
    generated = list(range(n + q, n + q + 9))
    assert kept[-9:] == generated  # the 9 tokens fed back are all held
    context = [p for p in kept if 4 <= p < n]
    assert context == list(range(n - len(context), n))  # the oldest non-sinks went first
    assert len(context) == round(n * 0.5) - 4 - 9


def test_h2o_evicts_during_decoding_but_keeps_recent_and_generated_tokens(model, tok):
    cache, before, out, n, q = decode_with(model, tok, chain("h2o", 0.5))
    assert cache.seq_lengths() == before
    kept = kept_positions(cache.layers[1])
    assert kept[-(q + 9):] == list(range(n, n + q + 9))  # question and generated tokens stay
    no_evict, before2, *_ = decode_with(model, tok, chain("h2o", 0.5, "decode_eviction=false"))
    assert [a + 9 for a in before2] == no_evict.seq_lengths()


def test_evicting_layer_crop_forgets_exactly_the_answer():
    layer = DenseLayer()
    layer.append(torch.randn(1, 1, 10, 2), torch.randn(1, 1, 10, 2), torch.arange(10)[None], None)
    for step in range(3):  # three decode steps, each evicting the oldest slot
        layer.append(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2), torch.tensor([[10 + step]]), None)
        layer = EvictingLayer.wrap(layer)
        layer.evict(torch.arange(layer.evictable(), dtype=torch.float32)[None, None])
    assert layer.seq_len() == 10 and layer.evicted == 3
    layer.crop_to(10)  # the engine's multi-turn crop: slots before the turn's answer
    assert kept_positions(layer) == list(range(3, 10))


@pytest.mark.parametrize("method", ["streamingllm", "h2o"])
def test_decode_eviction_in_multi_turn_mode(model, tok, method):
    recs = run(model, tok, method, 0.5, sample=make_sample(turns=3, max_new_tokens=6), multi_turn=True)
    assert [r["turn"] for r in recs] == [0, 1, 2]
    assert all(abs(r["achieved_ratio"] - 0.5) <= 0.05 for r in recs)


# --- chains ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["snapkv+kivi", "pyramidkv+int8", "streamingllm+int4", "adakv+kivi"])
def test_chains_across_families_are_measured(model, tok, method):
    for ratio in (0.5, 0.75):
        rec = run(model, tok, method, ratio, args=window_args(method, 8))[0]
        assert abs(rec["achieved_ratio"] - ratio) <= 0.05, (method, ratio, rec["achieved_ratio"])
        assert rec["kept_tokens"] < rec["context_tokens"]  # the dropping stage really dropped


def test_a_shortfall_is_a_failed_run(model, tok):
    with pytest.raises(CompressionShortfall):
        run(model, tok, "int8", 0.9)


@pytest.mark.parametrize("q_len,L", [(700, 700), (300, 1100), (512, 512), (1, 40)])
def test_grouped_attention_sum_equals_the_chunked_reference(q_len, L):
    """H2O's observation: the grouped, diagonal-masked sum equals the straightforward one (with the
    queries the last ``q_len`` of ``L`` stored tokens, as after earlier prefill chunks)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from lcbench.engine.attention import attention_sum, sum_in_chunks

    torch.manual_seed(0)
    query, key = torch.randn(1, 6, q_len, 16), torch.randn(1, 2, L, 16)
    keys = repeat_kv(key, 3)

    def probs(start, stop, width):
        scores = query[:, :, start:stop] @ keys[:, :, :width].transpose(-1, -2) * 0.25
        rows = torch.arange(start, stop)[:, None] + (L - q_len)
        return scores.masked_fill(~(torch.arange(width)[None, :] <= rows), float("-inf")).softmax(-1)

    ref = sum_in_chunks(probs, (1, 6), L, q_len, "cpu", chunk=256)
    fast = attention_sum(query, key, 3, 0.25, L, chunk=256)
    assert torch.allclose(fast, ref, atol=1e-5)
    assert torch.allclose(fast.sum(-1), torch.full((1, 6), float(q_len)), atol=1e-3)  # each query's row sums to 1
