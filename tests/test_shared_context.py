"""Turns sharing one compressed context (cache/shared.py) and a decode that lets finished rows go
(engine/decode.py): every answer is token-identical to answering that turn alone, for each kind
of layer and method family; the context is held once, not once per turn; N rows cost the sum of
their tokens, not N × the longest."""

import pytest
import torch

from lcbench.cache import KVCache
from lcbench.cache.layer import DenseLayer
from lcbench.cache.ragged import RaggedLayer
from lcbench.cache.shared import SharedContextLayer
from lcbench.engine import decode as decode_module
from lcbench.engine.attention import dense_attention, storage_mask
from lcbench.tasks.sample import Sample, Turn
from tests.conftest import engine_for
from tests.helpers import FILLER

BUDGETS = [3, 12, 1, 7, 5]  # max new tokens per turn: rows finish at different steps


def varied_sample(budgets=BUDGETS) -> Sample:
    turns = [Turn(question=f"\n\nQuestion: What is the special magic number {i}{'?' * (i % 3)} Answer:",
                  answers=["x"], max_new_tokens=n, scorer="passkey") for i, n in enumerate(budgets)]
    return Sample("v0", "Read the following text carefully. " + FILLER * 12, turns)


def _layer_kinds(monkeypatch) -> list[str]:
    """Kinds of the layers each decode ran on (spied at greedy_decode)."""
    seen: list[str] = []
    real = decode_module.forward

    def spy(model, ids, positions, state, *args, **kwargs):
        seen.append(type(state.cache.layers[0]).__name__)
        return real(model, ids, positions, state, *args, **kwargs)

    monkeypatch.setattr(decode_module, "forward", spy)
    return seen


FAMILIES = [
    ("full", 0.0, None, "SharedContextLayer"),
    ("snapkv", 0.5, "window_size=8", "SharedContextLayer"),
    ("adakv", 0.5, None, "SharedContextLayer"),          # ragged context
    ("kivi", 0.7, None, "QuantizedLayer"),               # re-quantizes its window per row: copied
    ("snapkv+int8", 0.6, "window_size=8", "QuantizedLayer"),
    ("h2o", 0.5, None, "EvictingLayer"),                  # decode-time eviction: copied per row
    ("streamingllm", 0.5, None, "EvictingLayer"),
    ("quest", 0.5, "page_size=4,dense_layers=0", "DenseLayer"),  # sparse decode attention: copied
]


def _former(monkeypatch):
    """The former multi-request path: a copy of the context per turn, finished rows kept."""
    import functools

    from lcbench.engine import runner

    monkeypatch.setattr(KVCache, "share_rows", KVCache.repeat_rows)
    monkeypatch.setattr(runner, "greedy_decode", functools.partial(runner.greedy_decode, free_finished=False))


@pytest.mark.parametrize("method,ratio,args,kind", FAMILIES)
def test_shared_turns_are_token_identical_to_before_and_to_each_turn_alone(tiny, monkeypatch, method, ratio, args, kind):
    model, tok = tiny
    sample = varied_sample()
    with monkeypatch.context() as patch:
        seen = _layer_kinds(patch)
        batched = engine_for(model, tok, method, ratio, method_args=args, decode_rows=None).run(sample, False)
    assert kind in seen
    with monkeypatch.context() as patch:
        _former(patch)
        before = engine_for(model, tok, method, ratio, method_args=args, decode_rows=None).run(sample, False)
    for field in ("prediction", "decode_tokens", "stopped_by", "kv_bytes", "kept_tokens", "batch_rows"):
        assert [r[field] for r in batched] == [r[field] for r in before], field
    assert [r["batch_rows"] for r in batched] == [len(BUDGETS)] * len(BUDGETS)
    alone = [engine_for(model, tok, method, ratio, method_args=args, decode_rows=None).run(
        Sample(sample.id, sample.context, [turn]), False)[0] for turn in sample.turns]
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in alone]
    assert [r["kv_bytes"] for r in batched] == [r["kv_bytes"] for r in alone]


def test_finished_rows_leave_the_batch(tiny, monkeypatch):
    """Decode steps run on the rows still decoding: rows × steps ≈ the sum of the tokens."""
    model, tok = tiny
    sample = varied_sample()
    rows_per_step: list[int] = []
    real = decode_module.forward

    def spy(model, ids, positions, state, *args, **kwargs):
        rows_per_step.append(ids.shape[0])
        return real(model, ids, positions, state, *args, **kwargs)

    monkeypatch.setattr(decode_module, "forward", spy)
    records = engine_for(model, tok, decode_rows=None).run(sample, False)
    tokens = [r["decode_tokens"] + (r["stopped_by"] == "eos") for r in records]
    # each step feeds every row still decoding its last token (the first token comes from the
    # question prefill): rows fed = sum of (tokens - 1)
    assert sum(rows_per_step) == sum(t - 1 for t in tokens)
    assert rows_per_step == sorted(rows_per_step, reverse=True) and rows_per_step[-1] < len(BUDGETS)


def test_context_is_held_once_not_once_per_turn(tiny, monkeypatch):
    held: list[int] = []
    original = KVCache.update

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = original(self, key_states, value_states, layer_idx, *args, **kwargs)
        if isinstance(self.layers[0], SharedContextLayer):
            held.append(self.nbytes())
        return out

    monkeypatch.setattr(KVCache, "update", update)
    model, tok = tiny
    engine = engine_for(model, tok, decode_rows=None)
    records = engine.run(varied_sample(), False)
    assert held, "the turns did not share the context"
    # five rows: the context once plus each row's own question and answer tokens (not 5 contexts)
    own = sum(r["input_tokens"] - r["context_tokens"] + r["decode_tokens"] for r in records)
    assert max(held) <= records[0]["kv_bytes"] + own * engine.bytes_per_token


def _context_layer(kind: str, heads=2, length=12, dim=8) -> DenseLayer | RaggedLayer:
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(1, heads, length, dim, generator=gen)
    values = torch.randn(1, heads, length, dim, generator=gen)
    positions = torch.arange(length)[None, None].expand(1, heads, length).contiguous()
    if kind == "ragged":
        keep = torch.rand(1, heads, length, generator=gen) > 0.4
        keep[..., 0] = True
        return RaggedLayer.from_mask(keys, values, positions, keep)
    layer = DenseLayer()
    layer.append(keys, values, torch.arange(length)[None], None)
    return layer


@pytest.mark.parametrize("kind,window", [("dense", None), ("ragged", None), ("dense", 6), ("ragged", 9)])
def test_folded_attention_equals_attention_over_each_rows_copy(kind, window):
    """The folded call over [context | flat tail] equals dense attention over the per-row copy
    (left-padded question parts, then decode steps; a row leaving in between), with and without
    a sliding window."""
    gen = torch.Generator().manual_seed(2)
    rows, heads, groups, dim = 3, 2, 2, 8
    module = torch.nn.Module()
    module.num_key_value_groups = groups
    shared = SharedContextLayer(_context_layer(kind), rows)
    copy = shared.materialize()
    lengths = torch.tensor([4, 2, 3])
    for step, q in enumerate([4, 1, 1]):
        valid = torch.arange(q)[None, :] >= (q - lengths)[:, None] if step == 0 else None
        k, v = torch.randn(rows, heads, q, dim, generator=gen), torch.randn(rows, heads, q, dim, generator=gen)
        pos = torch.arange(q)[None].expand(rows, q) + 20 + step
        query = torch.randn(rows, heads * groups, q, dim, generator=gen)
        shared.append(k, v, pos, valid)
        copy.append(k, v, pos, valid)
        got = shared.attend(query, lambda qq, kk, vv, m: dense_attention(module, qq, kk, vv, m, 0.3), window=window)
        ref = dense_attention(module, query, copy.keys, copy.values, storage_mask(copy, q, window), 0.3)
        real = torch.ones(rows, q, dtype=torch.bool) if valid is None else valid
        assert torch.allclose(got[real], ref[real], atol=1e-5)
        view = shared.materialize()
        assert torch.equal(view.positions[view.valid if view.valid is not None else slice(None)],
                           copy.positions[copy.valid if copy.valid is not None else slice(None)])
        if step == 1:  # the middle row finishes
            index = torch.tensor([0, 2])
            shared, copy, rows = shared.keep_rows(index), copy.keep_rows(index), 2


def _rows_of(layer, rows):
    """Per row: the valid (position, key, value) triples of ``layer``, per head, in storage order."""
    keys, values = layer.dense()
    valid = layer.valid if layer.valid is not None else torch.ones_like(layer.positions, dtype=torch.bool)
    return [[(layer.positions[r, h][valid[r, h]].tolist(), keys[r, h][valid[r, h]], values[r, h][valid[r, h]])
             for h in range(keys.shape[1])] for r in rows]


def _same(a, b):
    for ra, rb in zip(a, b, strict=True):
        for (pa, ka, va), (pb, kb, vb) in zip(ra, rb, strict=True):
            assert pa == pb and torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.mark.parametrize("kind", ["dense", "ragged", "quantized", "stacked", "shared", "evicting"])
def test_keep_rows_keeps_exactly_those_rows_for_every_layer_kind(kind):
    from lcbench.cache.quantized import QuantizedLayer, QuantSpec
    from lcbench.engine.row_stack import stack_rows
    from lcbench.methods.dropping.decode_eviction import EvictingLayer

    gen = torch.Generator().manual_seed(3)
    base = _context_layer("ragged" if kind == "ragged" else "dense")
    if kind == "quantized":
        base = QuantizedLayer.from_layer(base, QuantSpec(4, "token", 8, 2))
    if kind == "stacked":
        other = QuantizedLayer.from_layer(_context_layer("dense", length=9), QuantSpec(8, "token", 8, 0))
        layer = stack_rows([base.repeat_rows(2), other])  # rows 0, 1 (dense), 2 (quantized)
    elif kind == "shared":
        layer = SharedContextLayer(base, 3)
    else:
        layer = base.repeat_rows(3)
    if kind == "evicting":
        layer = EvictingLayer(layer)
        layer.tracks["t"] = torch.arange(3.0)[:, None, None].expand(3, 2, layer.seq_len()).contiguous()
    k, v = torch.randn(3, 2, 2, 8, generator=gen), torch.randn(3, 2, 2, 8, generator=gen)
    layer.append(k, v, torch.tensor([[40, 41]] * 3), torch.tensor([[True, True], [False, True], [True, True]]))
    rows = torch.tensor([0, 2])
    kept = layer.keep_rows(rows)
    assert kept.positions.shape[0] == 2
    _same(_rows_of(kept, [0, 1]), _rows_of(layer, [0, 2]))
    if kind == "evicting":
        assert kept.tracks["t"][:, 0, 0].tolist() == [0.0, 2.0]


@pytest.mark.parametrize("family_name,method,args", [
    ("gemma2", "streamingllm", None), ("gpt-oss", "streamingllm", None),
    ("gemma3-text", "quest", "page_size=4,dense_layers=0"), ("mistral-window", "quest", "page_size=4,dense_layers=0"),
    ("llama4-text", "snapkv", None), ("llama4-text", "streamingllm", None),
    ("llama4-text", "quest", "page_size=4,dense_layers=0"), ("llama4-text", "infllm", "block_size=8")])
def test_window_softcap_and_sink_families_decode_batched_turns_as_alone(family_name, method, args):
    """Sliding windows (with softcap on Gemma-2, learned sinks on gpt-oss) and Llama-4's chunked
    attention: a sample's turns decoded together — left-padded question parts, rows leaving as they
    finish, a shared context (snapkv) or a copy per turn (streamingllm) — give each turn's own ids."""
    from lcbench.engine.attach import use_lcbench_attention
    from lcbench.models.families import FAMILIES, build
    from lcbench.models.tiny import tiny_tokenizer

    (fam,) = [f for f in FAMILIES if f.name == family_name]
    model, tok = build(fam, "eager"), tiny_tokenizer()
    use_lcbench_attention(model, "eager")
    sample = varied_sample()
    together = engine_for(model, tok, method, 0.5, method_args=args).run(sample, False)
    alone = [engine_for(model, tok, method, 0.5, method_args=args).run(Sample(sample.id, sample.context, [t]), False)[0]
             for t in sample.turns]
    assert [r.decoded_ids for r in together] == [r.decoded_ids for r in alone]
    assert [r.measured.batch_rows for r in together] == [len(sample.turns)] * len(sample.turns)
