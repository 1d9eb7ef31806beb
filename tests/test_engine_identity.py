"""With nothing compressed, lcbench's engine reproduces ``model.generate`` token for token:
one turn, several turns decoded as one batch, and multi-turn with gold history."""

import torch

from lcbench.engine.prompt import render
from tests.conftest import engine_for
from tests.helpers import make_sample


def _generate(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def _engine_tokens(engine, sample, multi_turn=False):
    records = engine.run(sample, multi_turn)
    return [engine.tokenizer(r["prediction"], add_special_tokens=False)["input_ids"] for r in records], records


def _decode(tok, ids):
    eos = tok.eos_token_id
    ids = ids[: ids.index(eos)] if eos in ids else ids
    return tok.decode(ids, skip_special_tokens=True)


def test_one_turn_matches_generate(tiny, tiny_sdpa):
    model, tok = tiny
    ref_model, _ = tiny_sdpa
    sample = make_sample(1, max_new_tokens=16)
    p = render(tok, sample, sample.context, multi_turn=False)
    ref = _generate(ref_model, p.context_ids + p.turn_ids[0], 16)
    engine = engine_for(model, tok)
    records = engine.run(sample, False)
    assert records[0]["prediction"] == _decode(tok, ref)
    assert records[0]["achieved_ratio"] == 0.0 and records[0]["kv_bytes"] == records[0]["kv_bytes_full"]


def test_decoded_token_ids_identical(tiny, tiny_sdpa):
    """Compare ids, not text: the record keeps the decoded token ids."""
    model, tok = tiny
    ref_model, _ = tiny_sdpa
    sample = make_sample(1, max_new_tokens=20)
    p = render(tok, sample, sample.context, False)
    ids = p.context_ids + p.turn_ids[0]
    ref = _generate(ref_model, ids, 20)
    engine = engine_for(model, tok)
    engine.eos = {-1}  # never stop early: all 20 ids are compared
    (record,) = engine.run(sample, False)
    assert record.decoded_ids == ref
    assert record.prediction == tok.decode(ref, skip_special_tokens=True)


def test_several_turns_batched_match_generate_each(tiny, tiny_sdpa):
    model, tok = tiny
    ref_model, _ = tiny_sdpa
    sample = make_sample(4, max_new_tokens=12)
    p = render(tok, sample, sample.context, False)
    refs = [_decode(tok, _generate(ref_model, p.context_ids + p.turn_ids[k], 12)) for k in range(4)]
    records = engine_for(model, tok, decode_rows=8).run(sample, False)
    assert [r["batch_rows"] for r in records] == [4, 4, 4, 4]
    assert [r["prediction"] for r in records] == refs


def test_multi_turn_with_gold_history_matches_generate(tiny, tiny_sdpa):
    model, tok = tiny
    ref_model, _ = tiny_sdpa
    sample = make_sample(3, max_new_tokens=10)
    p = render(tok, sample, sample.context, multi_turn=True)
    # turn k's prompt = context + every earlier question with its gold answer + question k
    refs = []
    for k in range(3):
        ids = p.context_ids + [t for j in range(k + 1) for t in p.turn_ids[j]]
        refs.append(_decode(tok, _generate(ref_model, ids, 10)))
    assert "7421" in p.turn_texts[1]  # the gold answer of turn 0 is in turn 1's history
    records = engine_for(model, tok).run(sample, multi_turn=True)
    assert [r["prediction"] for r in records] == refs


def test_eager_dense_attention_matches_generate(tiny_sdpa):
    """``--model-args attn_implementation=eager`` computes dense attention with the explicit softmax."""
    from lcbench.engine.attach import use_lcbench_attention
    from lcbench.models.tiny import tiny_llama

    _, tok = tiny_sdpa
    ref_model = tiny_llama(attn_implementation="eager")
    model = tiny_llama()
    use_lcbench_attention(model, "eager")
    sample = make_sample(2, max_new_tokens=12)
    p = render(tok, sample, sample.context, False)
    refs = [_decode(tok, _generate(ref_model, p.context_ids + p.turn_ids[k], 12)) for k in range(2)]
    assert [r["prediction"] for r in engine_for(model, tok).run(sample, False)] == refs
