"""InfLLM (issue #16): initial tokens, the memory blocks whose representatives best match the
query chunk, and the local window — for the question prefill and every decoding step."""

from types import SimpleNamespace

import pytest
import torch

from conftest import engine_for
from helpers import make_sample
from lcbench.engine.attention import dense_attention
from lcbench.methods.sparse.infllm import InfLLM, representative_scores


def test_ratio_zero_is_full_and_density_follows_the_ratio(tiny):
    model, tok = tiny
    sample = make_sample(2, repeat=30)
    full = engine_for(model, tok).run(sample, False)
    same = engine_for(model, tok, "infllm", 0.0, "block_size=8").run(sample, False)
    assert [r.decoded_ids for r in same] == [r.decoded_ids for r in full]
    for ratio in (0.25, 0.5, 0.75):
        records = engine_for(model, tok, "infllm", ratio, "block_size=8").run(sample, False)  # checked by the engine
        density = records[0]["attention_density"]
        assert ratio - 0.05 <= 1 - density <= ratio + 0.05, (ratio, density)
        assert records[0]["kv_bytes"] == full[0]["kv_bytes"]  # the whole cache is kept


def test_representative_scores_are_each_keys_local_window_attention():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 20, 8, generator=gen), torch.randn(1, 2, 20, 8, generator=gen)
    local = 5
    got = representative_scores(q, k, 2, 0.3, local)
    want = torch.zeros(1, 2, 20)
    for h in range(4):
        for i in range(20):
            cols = list(range(max(0, i - local + 1), i + 1))
            p = (q[0, h, i] @ k[0, h // 2, cols].T * 0.3).softmax(-1)
            want[0, h // 2, cols] += p
    assert torch.allclose(got, want, atol=1e-5)


def test_the_block_matching_the_question_is_retrieved_and_only_it_is_attended():
    """A planted block of keys along one direction, question queries along it: that block is the
    one retrieved, and the output equals dense attention over init + that block + window + question."""
    gen = torch.Generator().manual_seed(1)
    d, context, q_len = 16, 96, 3
    stage = InfLLM(ratio=0.75, block_size=8, repr_topk=2)
    stage.begin_sample()
    init, local, topk = stage._plan(context)
    assert topk == 1 and init >= 0 and local >= 1
    keys = torch.randn(1, 1, context + q_len, d, generator=gen) * 0.1
    direction = torch.zeros(d)
    direction[0] = 1.0
    planted = init + 8 * 3  # the fourth memory block
    keys[0, 0, planted:planted + 8] += 3 * direction
    values = torch.randn(1, 1, context + q_len, d, generator=gen)
    ctx_queries = torch.randn(1, 1, context, d, generator=gen) * 0.1
    module = SimpleNamespace(num_key_value_groups=1, config=SimpleNamespace())
    assert stage.prefill_attention(module, ctx_queries, keys[:, :, :context], values[:, :, :context], None, 0.25, 0) is None
    question = (direction * 2 + 0.05 * torch.randn(q_len, d, generator=gen))[None, None]
    out = stage.prefill_attention(module, question, keys, values, None, 0.25, 0)
    slots = torch.arange(context + q_len)
    _, _, blocks_end, _ = stage._learned[0]
    keep = (slots < init) | (slots >= blocks_end) | ((slots >= planted) & (slots < planted + 8))
    causal = slots[None, :] <= torch.arange(context, context + q_len)[:, None]
    want = dense_attention(module, question, keys, values, (causal & keep[None])[None, None], 0.25)
    assert torch.allclose(out, want, atol=1e-6)
    assert 0 < stage.sample_stats()["attention_density"] < 0.5


def test_a_cache_stage_before_it_is_refused(tiny):
    from lcbench.errors import UserError

    model, tok = tiny
    with pytest.raises(UserError, match="chain infllm with no"):
        engine_for(model, tok, "snapkv+infllm", 0.5, "block_size=8,snapkv.window_size=8,snapkv.ratio=0.5,"
                   "infllm.ratio=0.5").run(make_sample(1, repeat=30), False)
