"""REFORM (lcbench/methods/dropping/reform.py): the compressing read keeps a bounded cache and exits
early, and with a cache that holds everything its value states are a one-pass forward's; tokens the
question repeats are gathered; only the gathered tokens and the question are recomputed, at true
positions, at the requested ratio; the embedding heads are calibrated once per model."""

from __future__ import annotations

import pytest
import torch
from test_dropping import make_sample, model, tok  # noqa: F401  (fixtures)

from lcbench.engine.runner import Engine, EngineConfig
from lcbench.errors import UserError
from lcbench.methods.chain import Chain, resolve_chain
from lcbench.methods.dropping.reform import read_values
from lcbench.methods.registry import METHODS

torch.set_num_threads(1)


def plain_values(model, ids, layer):
    """Value states of ``layer`` in one plain forward (a hook on its v projection)."""
    got = {}
    attn = model.model.layers[layer].self_attn
    hook = attn.v_proj.register_forward_hook(lambda m, i, o: got.setdefault("v", o))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]))
    finally:
        hook.remove()
    v = got["v"][0]
    return v.view(v.shape[0], -1, attn.head_dim).transpose(0, 1).float()  # (H, n, D)


def test_read_with_room_for_everything_equals_one_pass_and_exits_early(model, tok):  # noqa: F811
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, add_special_tokens=False)["input_ids"]
    values = read_values(model, ids, {1}, chunk=16, sinks=4, window=10_000)
    assert torch.allclose(values[1], plain_values(model, ids, 1), atol=1e-4)
    bounded = read_values(model, ids, {1}, chunk=16, sinks=2, window=8)  # each chunk saw 2 sinks + 8 recent
    assert bounded[1].shape == values[1].shape and not torch.allclose(bounded[1], values[1], atol=1e-3)
    first = read_values(model, ids, {0}, chunk=16, sinks=2, window=8)  # layer 0's values need no attention
    assert torch.allclose(first[0], plain_values(model, ids, 0), atol=1e-5)


def test_tokens_the_question_repeats_are_gathered_and_recomputed_alone(model, tok):  # noqa: F811
    stage_chain = Chain.build(resolve_chain("reform", "chunk=32,window=64", 0.75))
    engine = Engine(model, tok, stage_chain, EngineConfig(query_aware=True))
    engine.chain.stages[0].calibration = {"heads": [[0, 0], [0, 1]]}  # layer-0 values: a token's own embedding
    filler = tok("the grass is green and the sky is blue " * 12, add_special_tokens=False)["input_ids"]
    needle = tok(" zebra quartz violin", add_special_tokens=False)["input_ids"]
    ctx = filler[:60] + needle + filler[60:]
    question = tok(" zebra quartz violin ?", add_special_tokens=False)["input_ids"]
    distinct = [i for i, t in enumerate(needle) if t not in filler]  # (a token the filler has too ties with it)
    assert len(distinct) >= 3
    prefilled = engine.prefill([ctx + question], protected=len(question))
    n, q = len(ctx), len(question)
    for layer in prefilled.cache.layers:
        pos = layer.positions[0, 0].tolist()
        assert pos[-q:] == list(range(n, n + q))
        assert {60 + i for i in distinct} <= set(pos[:-q])  # the needle's own tokens, gathered
        assert len(pos) == round((n + q) * 0.25)  # the requested ratio over context and question
    assert prefilled.compress_s > 0


def test_calibration_picks_heads_of_the_early_layers_and_refusals(model, tok):  # noqa: F811
    found = METHODS.get("reform")(ratio=0.5, heads=3, depth=1.0, probe_tokens=64).calibrate(model, tok)
    assert len(found["heads"]) == 3 and found["recall"] == sorted(found["recall"], reverse=True)
    early = METHODS.get("reform")(ratio=0.5, heads=3, depth=0.5, probe_tokens=64).calibrate(model, tok)
    assert sorted(map(tuple, early["heads"])) == [(0, 0), (0, 1)]  # half of 2 layers: layer 0's 2 KV heads only
    with pytest.raises(UserError, match="--query-aware"):
        Engine(model, tok, Chain.build(resolve_chain("reform", None, 0.5)), EngineConfig())
