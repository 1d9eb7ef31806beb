"""After tokens are dropped, later tokens are processed at their true positions.

Reference: one plain transformers forward over the whole sequence with true position ids and a
4D mask in which the question tokens cannot see the dropped context tokens. StreamingLLM keeps
the same tokens in every layer and head, so this reference is exact. A variant that renumbers
positions (as if the kept tokens were contiguous) must give different logits, which shows that
the test depends on the positions and not only on "it runs".
"""

import torch

from lcbench.engine.decode import forward
from lcbench.engine.prompt import render
from tests.conftest import engine_for
from tests.helpers import make_sample


def _reference_logits(model, ctx_ids, q_ids, kept):
    ids = torch.tensor([ctx_ids + q_ids])
    n, q = len(ctx_ids), len(q_ids)
    total = n + q
    allowed = torch.tril(torch.ones(total, total, dtype=torch.bool))
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[kept] = False
    allowed[n:, :n] &= ~dropped  # question rows see only kept context tokens
    mask = torch.zeros(1, 1, total, total).masked_fill(~allowed, float("-inf"))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(total)[None])
    return out.logits[0, -1]


def test_question_after_dropping_uses_true_positions(tiny, tiny_sdpa):
    model, tok = tiny
    ref_model, _ = tiny_sdpa
    ref_model.config._attn_implementation = "eager"
    sample = make_sample(1, repeat=10)
    p = render(tok, sample, sample.context, False)
    engine = engine_for(model, tok, "streamingllm", 0.5)
    cache = engine.prefill([p.context_ids]).cache
    kept = cache.layers[0].positions[0, 0]
    assert all(torch.equal(layer.positions[0, h], kept) for layer in cache.layers for h in range(layer.positions.shape[1]))
    assert len(kept) < len(p.context_ids) * 0.6 and kept[0] == 0  # dropped half, kept the sinks

    n = len(p.context_ids)
    q = torch.tensor([p.turn_ids[0]])
    base_len = cache.seq_lengths()
    with torch.inference_mode():
        state = engine.forward_state(cache)
        true_logits = forward(model, q, torch.arange(n, n + q.shape[1])[None], state)[0]
        cache.crop_to(base_len)
        shifted = torch.arange(len(kept), len(kept) + q.shape[1])[None]  # the renumbering mistake
        wrong_logits = forward(model, q, shifted, engine.forward_state(cache))[0]
    ref = _reference_logits(ref_model, p.context_ids, p.turn_ids[0], kept)
    assert torch.allclose(true_logits, ref, atol=1e-4), (true_logits - ref).abs().max()
    assert (wrong_logits - ref).abs().max() > 1e-2


def test_kept_positions_are_stored_per_head(tiny):
    model, tok = tiny
    sample = make_sample(1, repeat=10)
    p = render(tok, sample, sample.context, False)
    cache = engine_for(model, tok, "snapkv", 0.5, method_args="window_size=8").prefill([p.context_ids]).cache
    layer = cache.layers[0]
    n = len(p.context_ids)
    assert layer.positions.shape[-1] == round(n * 0.5)
    # the observation window (the context's last 8 tokens) is always kept, in every head
    window = torch.arange(n - 8, n)
    for h in range(layer.positions.shape[1]):
        assert set(window.tolist()) <= set(layer.positions[0, h].tolist())
    # positions are strictly increasing in storage order
    assert bool((layer.positions.diff(dim=-1) > 0).all())
