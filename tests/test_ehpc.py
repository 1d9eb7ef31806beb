"""EHPC (issue #16): evaluator heads found once per model on needle probes, tokens ranked by their
attention in a forward through the first layers only, the top tokens kept within the budget."""

import pytest
import torch

from lcbench.methods.prompt import ehpc as ehpc_mod
from lcbench.methods.prompt.attend import head_attention
from lcbench.methods.prompt.lm import CompressorLM
from test_prompt_compression import compress, run, within
from test_prompt_methods import APPLES, SHIPS


@pytest.fixture()
def lm(tiny):
    model, tok = tiny
    return CompressorLM(model, tok, "target", 4096)


def test_the_scoring_forward_runs_only_up_to_the_evaluator_layer(lm):
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: seen.append(i)) for i, layer in
             enumerate(lm.model.model.layers)]
    try:
        probs = head_attention(lm, list(range(5, 60)), [0], 4)
    finally:
        for h in hooks:
            h.remove()
    assert seen == [0]  # layer 1 never ran
    heads = lm.model.config.num_attention_heads
    assert probs[0].shape == (heads, 4, 55)
    assert torch.allclose(probs[0].sum(-1), torch.ones(heads, 4), atol=1e-5)  # each query's row is a softmax


def test_evaluator_heads_are_the_best_heads_of_the_best_layer_and_found_once(lm, monkeypatch):
    ehpc_mod._FOUND.clear()
    calls = []
    real = ehpc_mod.head_attention
    monkeypatch.setattr(ehpc_mod, "head_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    found = ehpc_mod.find_evaluator_heads(lm, 2, 64)
    again = ehpc_mod.find_evaluator_heads(lm, 2, 64)
    assert again is found and len(calls) == 3  # three probes, once per model
    best = found.scores.topk(2, dim=1)
    assert found.layer == int(best.values.sum(1).argmax())
    assert set(found.heads) == set(best.indices[found.layer].tolist())
    ids, (a, b), q = ehpc_mod.probe_inputs(lm.tokenizer, 64, 0.5, 1)
    assert lm.tokenizer.decode(ids[a:b]).strip().startswith("The special magic number is")


def test_kept_tokens_are_those_the_evaluator_heads_attend(tiny, monkeypatch):
    model, tok = tiny
    text = "".join(APPLES + SHIPS)
    ehpc_mod._FOUND.clear()
    out, stats = compress("ehpc", 0.5, text, tok, model, heads=2, window=4, pool=1, probe_tokens=64)
    assert within(stats, 0.5), stats
    found = next(iter(ehpc_mod._FOUND.values()))
    lm = CompressorLM(model, tok, "target", 4096)
    ids, offsets = lm.encode(text)
    probs = head_attention(lm, ids, [found.layer], 4)[found.layer][list(found.heads)].sum((0, 1))
    kept = stats["text_tokens_kept"]
    top = set(probs.topk(int(kept) // 2).indices.tolist())  # the strongest half of what was kept
    kept_text = out
    assert all(text[offsets[i][0]:offsets[i][1]].strip() in kept_text for i in top)
    assert stats["ehpc_layer"] == found.layer


@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_the_budget_is_met(ratio, tiny):
    model, tok = tiny
    out, stats = compress("ehpc", ratio, "".join(APPLES + SHIPS) * 2, tok, model, heads=2, probe_tokens=64)
    assert within(stats, ratio), stats


def test_ratio_zero_is_full(tiny):
    from helpers import make_sample

    model, tok = tiny
    sample = make_sample(1, repeat=10)
    full = run(model, tok, sample, "full", 0.0)
    same = run(model, tok, sample, "ehpc", 0.0)
    assert same[0]["_ids"] == full[0]["_ids"]
