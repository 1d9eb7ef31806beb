"""LongBench / LongBench-E tasks: samples from fixture files, scoring rules, aggregates as
upstream reports them, and an end-to-end run of two datasets through the Engine (tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lcbench.errors import UserError
from lcbench.models.tiny import tiny_llama, tiny_tokenizer
from lcbench.tasks.base import TaskEnv
from lcbench.tasks.longbench.protocol import longbench_protocol
from lcbench.tasks.longbench.task import LongBench, LongBenchE
from lcbench.tasks.registry import TASKS

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "longbench"
DATA = str(FIXTURES)  # the task's own data_dir argument (what --data-dir sets)
P = longbench_protocol()


def env(max_len: int = 4096) -> TaskEnv:
    return TaskEnv(tokenizer=tiny_tokenizer(), model_name="tiny-random-llama", model_max_length=max_len)


def test_registered():
    assert TASKS.get("longbench") is LongBench and TASKS.get("longbench_e") is LongBenchE
    assert TASKS.get("minilongbench").__name__ == "MiniLongBench"


def test_samples_from_fixture_folder():
    task = LongBench(data_dir=DATA, datasets="hotpotqa;trec;samsum;lcc;passage_retrieval_zh")
    samples = task.samples(env())
    by_id = {s.id: s for s in samples}
    assert [s.id for s in samples] == ["hotpotqa/0", "hotpotqa/1", "trec/0", "trec/1", "samsum/0",
                                       "passage_retrieval_zh/0", "lcc/0"]  # pred.py's dataset order
    hp = by_id["hotpotqa/0"]
    assert hp.chat and not by_id["trec/0"].chat and not by_id["lcc/0"].chat
    assert hp.context.startswith("Answer the question based on the given passages.") and hp.context.endswith("1841.")
    assert hp.turns[0].question.startswith("\n\n\nAnswer the question")  # the context's "\n" moved over
    assert hp.turns[0].question.endswith("Question: In which town was the builder of the Lighthouse of Varne born?\nAnswer:")
    assert hp.turns[0].max_new_tokens == 32 and hp.turns[0].scorer == "qa_f1_score"
    assert hp.meta["dataset"] == "hotpotqa" and hp.meta["index"] == 0 and not hp.meta["truncated"]
    assert by_id["trec/1"].meta["all_classes"][:2] == ["Food", "Date"]
    samsum = by_id["samsum/0"].turns[0]
    newline = tiny_tokenizer().encode("\n", add_special_tokens=False)[-1]
    assert samsum.stop_token_ids == (newline,) and samsum.min_new_tokens == 1 and samsum.max_new_tokens == 128
    assert by_id["trec/0"].turns[0].stop_token_ids == ()


def test_chat_override_and_limits():
    samples = LongBench(data_dir=DATA, datasets="hotpotqa;trec", chat="never", n_per_dataset=1).samples(env())
    assert [s.id for s in samples] == ["hotpotqa/0", "trec/0"] and not any(s.chat for s in samples)
    assert all(s.chat for s in LongBench(data_dir=DATA, datasets="trec", chat="always").samples(env()))
    with pytest.raises(UserError, match="Did you mean 'hotpotqa'"):
        LongBench(data_dir=DATA, datasets="hotpot_qa").samples(env())


def test_truncation_budget_in_samples():
    # the fixture's hotpotqa/0 prompt is 359 tiny-tokenizer tokens, its question part 121
    untruncated = LongBench(data_dir=DATA, datasets="hotpotqa").samples(env())[0]
    assert untruncated.meta["prompt_tokens"] == 359 and not untruncated.meta["truncated"]
    s = LongBench(data_dir=DATA, datasets="hotpotqa", max_length=300).samples(env())[0]
    assert s.meta["truncated"] and s.meta["max_length"] == 300 and s.meta["split"] == "template"
    assert s.turns[0].question == untruncated.turns[0].question
    ids = tiny_tokenizer()(untruncated.context + untruncated.turns[0].question)["input_ids"]
    tok = tiny_tokenizer()
    assert s.context + s.turns[0].question == tok.decode(ids[:150]) + tok.decode(ids[-150:])
    # without max_length: model_max_length - max_new_tokens - chat template tokens
    small = LongBench(data_dir=DATA, datasets="hotpotqa").samples(env(max_len=400))[0]
    assert small.meta["truncated"] and small.meta["max_length"] < 400 - 32


def test_template_hash_tracks_the_protocol():
    a, b = LongBench(data_dir=DATA).template_hash(), LongBench(data_dir=DATA, quirks="fixed").template_hash()
    assert a != b and len(a) == 16  # the arguments are part of the hashed payload
    assert LongBench(data_dir=DATA).protocol_payload()["protocol"]["prompts"] == P["prompts"]


def test_score_rules():
    task = LongBench(data_dir=DATA, datasets="trec;hotpotqa")
    hp, _, trec, _ = task.samples(env())
    # first-line rule for trec, then the classification metric; 0-100 scale
    assert task.score(trec, trec.turns[0], "\nCountry\nCity")["score"] == 100.0
    assert task.score(trec, trec.turns[0], "City\nCountry")["score"] == 0.0
    out = task.score(hp, hp.turns[0], "Dover, England")
    assert out == {"score": pytest.approx(200 / 3), "score_upstream": pytest.approx(200 / 3),
                   "score_fixed": pytest.approx(200 / 3)}


def test_quirk_and_fix_are_both_reported():
    task, fixed = LongBench(data_dir=DATA, datasets="trec"), LongBench(data_dir=DATA, datasets="trec", quirks="fixed")
    s = task.samples(env())[0]
    assert s.meta["dataset"] == "trec"
    s = type(s)(s.id, s.context, s.turns, {**s.meta, "all_classes": ["Other", "location", "Other location"]})
    turn = type(s.turns[0])(**{**s.turns[0].__dict__, "answers": ["Other location"]})
    assert task.score(s, turn, "Other location") == {"score": 50.0, "score_upstream": 50.0, "score_fixed": 100.0}
    assert fixed.score(s, turn, "Other location")["score"] == 100.0


def _records(values: dict[str, list[float]], buckets: dict[str, list[str]] | None = None) -> list[dict]:
    out = []
    for ds, scores in values.items():
        for i, v in enumerate(scores):
            meta = {"dataset": ds, "length_bucket": (buckets or {}).get(ds, [None] * len(scores))[i]}
            out.append({"sample_id": f"{ds}/{i}", "meta": meta, "score": v, "score_upstream": v, "score_fixed": v + 1})
    return out


def test_aggregate_per_dataset_category_and_avg():
    values = {ds: [10.0 * (k % 7), 10.0 * (k % 7) + 1 / 3] for k, ds in enumerate(P["datasets"])}
    agg = LongBench(data_dir=DATA).aggregate(_records(values))
    per = {ds: round(10.0 * (k % 7) + 1 / 6, 2) for k, ds in enumerate(P["datasets"])}
    assert {ds: agg[ds] for ds in P["datasets"]} == per
    en_sd = round((per["narrativeqa"] + per["qasper"] + per["multifieldqa_en"]) / 3, 2)
    assert agg["en/Single-Doc QA"] == en_sd
    assert agg["en/Synthetic"] == round((per["passage_count"] + per["passage_retrieval_en"]) / 2, 2)
    assert agg["zh/Synthetic"] == per["passage_retrieval_zh"] and agg["zh/Code"] == agg["en/Code"]
    cats = [agg[f"en/{c}"] for c in P["leaderboard"]["en"]]
    assert agg["en/Avg"] == round(sum(cats) / 6, 2)
    assert agg["trec:fixed"] == round(per["trec"] + 1, 2) and "hotpotqa:fixed" not in agg  # quirky metrics only
    # README check: GPT-3.5 English categories average to 44.0
    assert round((39.8 + 38.7 + 26.5 + 67.1 + 54.1 + 37.8) / 6, 1) == 44.0


def test_aggregate_partial_run_has_no_language_avg():
    agg = LongBench(data_dir=DATA).aggregate(_records({"trec": [100.0, 0.0], "hotpotqa": [50.0]}))
    assert agg["trec"] == 50.0 and agg["score"] == 50.0
    assert not any(k.startswith(("en/", "zh/")) for k in agg)


def test_longbench_e_buckets():
    task = LongBenchE(data_dir=DATA, datasets="trec;hotpotqa")
    samples = task.samples(env())
    assert [s.id for s in samples][:3] == ["hotpotqa_e/0", "hotpotqa_e/1", "hotpotqa_e/2"]
    assert [s.meta["length_bucket"] for s in samples] == ["0-4k", "4-8k", "4-8k", "8k+", "0-4k", "4-8k", "8k+"]
    recs = [{"meta": s.meta, "score": float(10 * i)} for i, s in enumerate(samples)]
    agg = task.aggregate(recs)
    assert agg["hotpotqa/0-4k"] == 0.0 and agg["hotpotqa/4-8k"] == 15.0 and agg["hotpotqa/8k+"] == 30.0
    assert agg["trec/0-4k"] == 40.0 and agg["4-8k"] == (15.0 + 50.0) / 2
    assert agg["Few-shot/8k+"] == 60.0 and agg["Multi-Doc QA/0-4k"] == 0.0
    assert not any(k.startswith("en/") for k in agg)


def _run(task, samples, method: str = "snapkv") -> list[dict]:
    from lcbench.engine.runner import Engine, EngineConfig
    from lcbench.methods.chain import Chain, resolve_chain
    from lcbench.engine.attach import use_lcbench_attention

    torch.set_num_threads(2)
    model = tiny_llama()
    use_lcbench_attention(model)
    engine = Engine(model, tiny_tokenizer(), Chain.build(resolve_chain(method, None, 0.5), 0.5), EngineConfig())
    records = []
    for sample in samples:
        for rec in engine.run(sample, multi_turn=False):
            rec = rec.scored(task.score(sample, sample.turns[rec["turn"]], rec["prediction"]))
            records.append(rec)
    return records


def test_longbench_e_end_to_end():
    task = LongBenchE(data_dir=DATA, datasets="trec")
    records = _run(task, task.samples(env()), "streamingllm")
    agg = task.aggregate(records)
    assert {"trec", "trec/0-4k", "trec/4-8k", "trec/8k+", "0-4k", "Few-shot/8k+"} <= set(agg)


def test_end_to_end_two_datasets_through_the_engine():
    task = LongBench(data_dir=DATA, datasets="hotpotqa;trec", n_per_dataset=2)
    samples = task.samples(env())
    records = _run(task, samples)
    assert [r["sample_id"] for r in records] == ["hotpotqa/0", "hotpotqa/1", "trec/0", "trec/1"]
    assert all(0.0 <= r["score"] <= 100.0 and r["decode_tokens"] <= r_max for r, r_max in
               zip(records, [32, 32, 64, 64]))
    assert all(r["achieved_ratio"] > 0.4 for r in records)
    agg = task.aggregate(records)
    assert set(agg) >= {"hotpotqa", "trec", "trec:upstream", "trec:fixed", "score"}
    assert agg["score"] == round((agg["hotpotqa"] + agg["trec"]) / 2, 2)


def test_samsum_generation_rule_matches_generate():
    """Engine with Turn.stop_token_ids/min_new_tokens = generate(min_length=len+1, eos_token_id=[eos, id])."""
    from lcbench.engine.prompt import render
    from lcbench.engine.runner import Engine, EngineConfig
    from lcbench.methods.chain import Chain, resolve_chain
    from lcbench.engine.attach import use_lcbench_attention
    from lcbench.tasks.sample import Sample, Turn

    torch.set_num_threads(2)
    tok, model = tiny_tokenizer(), tiny_llama()
    context = "Read the following text carefully. " + "The quick brown fox jumps over the lazy dog. " * 8
    question = "Question: What is the number 7? Answer:"
    probe = Turn(question=question, answers=["x"], max_new_tokens=12, scorer="x")
    rendered = render(tok, Sample("s", context, [probe], chat=False), context, False)
    ids = torch.tensor([rendered.context_ids + rendered.turn_ids[0]])  # exactly what the engine feeds
    free = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    use_lcbench_attention(model)
    engine = Engine(model, tok, Chain.build(resolve_chain("full", None, 0.0), 0.0), EngineConfig())
    # stop on the token generated third (kept in the text), and forbid the first token at step 0
    for stop_id in (free[2], free[0]):
        turn = Turn(question=question, answers=["x"], max_new_tokens=12, scorer="x",
                    stop_token_ids=(stop_id,), min_new_tokens=1)
        got = engine.run(Sample("s", context, [turn], chat=False), multi_turn=False)[0]
        model.set_attn_implementation("sdpa")
        want = model.generate(ids, max_new_tokens=12, do_sample=False, min_length=ids.shape[1] + 1,
                              eos_token_id=[tok.eos_token_id, stop_id])[0, ids.shape[1]:].tolist()
        use_lcbench_attention(model)
        assert got["prediction"] == tok.decode(want, skip_special_tokens=True)
        if stop_id == free[2]:
            assert want == free[:3] and got["stopped_by"] == "stop" and got["decode_tokens"] == 3
        else:
            assert want[0] != free[0]


@pytest.mark.parametrize("max_length", [0, 120])
def test_chat_never_feeds_exactly_upstreams_token_ids(max_length):
    """pred.py for any model outside its 8: ``tokenizer(prompt)`` (default special tokens) of the
    middle-truncated raw prompt, no wrapper. chat=never gives the same ids through the engine."""
    from lcbench.engine.prompt import render
    from lcbench.tasks.longbench import data

    tok = tiny_tokenizer()
    names = ["hotpotqa", "trec", "samsum", "lcc", "passage_retrieval_zh"]
    task = LongBench(data_dir=DATA, datasets=";".join(names), chat="never", max_length=max_length)
    for s in task.samples(env()):
        row = data.load_rows(s.meta["dataset"], FIXTURES)[s.meta["index"]]
        prompt = P["prompts"][s.meta["dataset"]].format(**row)
        ids = tok(prompt, truncation=False)["input_ids"]
        budget = s.meta["max_length"]
        if len(ids) > budget:
            half = int(budget / 2)
            prompt = (tok.decode(ids[:half], skip_special_tokens=True) + tok.decode(ids[-half:], skip_special_tokens=True))
        p = render(tok, s, s.context, multi_turn=False)
        assert not s.chat and p.context_ids + p.turn_ids[0] == tok(prompt)["input_ids"], s.id
