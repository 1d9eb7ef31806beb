"""Needle in a haystack: the upstream context build (buffer, depth, back to a period) and the
offline scorer (a labelled deviation from the LLM judge)."""

import pytest

from lcbench.errors import UserError
from lcbench.models.tiny import tiny_tokenizer
from lcbench.tasks.base import TaskEnv
from lcbench.tasks.niah import NeedleInAHaystack, needle_recall


def _env(tok, seed=0):
    return TaskEnv(tokenizer=tok, model_name="tiny", model_max_length=4096, seed=seed)


def test_grid_ids_and_meta():
    tok = tiny_tokenizer()
    samples = NeedleInAHaystack(lengths="400;600", depths="0;50;100", haystack="filler").samples(_env(tok))
    assert [s.id for s in samples] == [f"niah-L{n}-D{d}" for n in (400, 600) for d in (0, 50, 100)]
    assert samples[4].meta == {"dataset": "niah[filler]", "length": 600, "depth": 50.0, "length_bucket": 600,
                               "needle": "passkey", "messages": "one", "haystack": "filler",
                               "haystack_source": "builtin filler", "data_label": "filler"}


def test_context_and_question_as_two_user_messages_as_upstreams_openai_provider():
    """providers/openai.py: [system, user: context, user: question] (messages=two); the default joins them."""
    from lcbench.engine.prompt import render

    tok = tiny_tokenizer()
    up = NeedleInAHaystack(lengths="400", depths="50", haystack="filler", messages="two").samples(_env(tok))[0]
    p = render(tok, up, up.context, multi_turn=False)
    q = "What is the pass key? Don't give information outside the document or repeat your findings"
    want = tok.apply_chat_template([{"role": "system", "content": up.system}, {"role": "user", "content": up.context},
                                    {"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    assert p.context_text + p.turn_texts[0] == want and up.turns[0].question == q
    fixed = NeedleInAHaystack(lengths="400", depths="50", haystack="filler").samples(_env(tok))[0]
    p = render(tok, fixed, fixed.context, multi_turn=False)
    assert p.context_text + p.turn_texts[0] == tok.apply_chat_template(
        [{"role": "system", "content": up.system}, {"role": "user", "content": up.context + "\n\n" + q}],
        tokenize=False, add_generation_prompt=True)
    assert fixed.meta["messages"] == "one" and fixed.context == up.context


# Gemma-1/2's and Mistral-7B-Instruct v0.x's template shape: no system role, roles must alternate
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
             "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
             "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_without_a_system_role_gets_the_system_prompt_in_the_user_message(tmp_path):
    """Such a template raised on upstream's system message (`lcbench run --task niah` on Gemma-2-it
    ended in a TemplateError traceback, exit 1). The system prompt now opens the context's user
    message, as Gemma-3's template folds one; records say system='folded'. messages=two falls back
    to one message there (roles must alternate)."""
    import copy
    import json
    import shutil
    import subprocess
    import sys

    from lcbench.engine.prompt import render
    from lcbench.models.tiny import tiny_llama

    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = NO_SYSTEM
    with pytest.warns(UserWarning, match="no system role"):
        sample = NeedleInAHaystack(lengths="400", depths="50", haystack="filler").samples(_env(tok))[0]
    plain = NeedleInAHaystack(lengths="400", depths="50", haystack="filler").samples(_env(tiny_tokenizer()))[0]
    assert sample.system is None and sample.meta["system"] == "folded" and "system" not in plain.meta
    assert sample.context == plain.system + "\n\n" + plain.context
    p = render(tok, sample, sample.context, multi_turn=False)
    assert p.context_text + p.turn_texts[0] == tok.apply_chat_template(
        [{"role": "user", "content": sample.context + sample.turns[0].question}], tokenize=False,
        add_generation_prompt=True)
    with pytest.warns(UserWarning, match="two user messages"):
        two = NeedleInAHaystack(lengths="400", depths="50", haystack="filler", messages="two").samples(_env(tok))[0]
    assert two.meta["messages"] == "one"

    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    tok.save_pretrained(folder)
    exe = shutil.which("lcbench")
    cmd = [exe] if exe else [sys.executable, "-m", "lcbench.cli"]
    proc = subprocess.run(cmd + ["run", "--model", str(folder), "--method", "full", "--task", "niah", "--task-args",
                                 "lengths=400,depths=50,haystack=filler,max_new_tokens=4", "--output-path",
                                 str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(next((tmp_path / "out").rglob("samples.jsonl")).read_text().splitlines()[0])
    assert record["meta"]["system"] == "folded"


def test_a_template_that_raises_on_the_messages_is_exit_2_in_its_own_words():
    """A template's raise_exception (here on any assistant turn) reaches the user as a UserError with
    the template's message and the fix, not a jinja traceback."""
    import copy

    from lcbench.chat import chat_text

    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ raise_exception('no replies here') }}"
                         "{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(UserError, match=r"refuses the messages \[user, assistant\]: no replies here.*chat=false"):
        chat_text(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_default_haystack_is_upstreams_essays_from_the_local_data(shared_data, monkeypatch):
    from lcbench.tasks import essays

    monkeypatch.setenv("LCBENCH_DATA", str(shared_data))
    s = NeedleInAHaystack(lengths="600", depths="50").samples(_env(tiny_tokenizer()))[0]
    folder = shared_data / "niah" / "PaulGrahamEssays"
    assert s.meta["dataset"] == "niah" and s.meta["haystack"] == "essays" and s.meta["haystack_source"] == "local"
    assert s.meta["haystack_sha256"] == essays.folder_sha256(folder)
    # the shared copy is upstream's: every file matches the pinned sha256
    import hashlib
    for f in essays.niah_manifest()["files"]:
        assert hashlib.sha256((folder / f["name"]).read_bytes()).hexdigest() == f["sha256"]


def test_filler_fallback_is_warned_and_labelled(tmp_path, monkeypatch):
    monkeypatch.setenv("LCBENCH_DATA", str(tmp_path / "none"))
    monkeypatch.setenv("LCBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.warns(UserWarning, match="filler haystack.*HF_HUB_OFFLINE forbids downloading"):
        s = NeedleInAHaystack(lengths="400", depths="50").samples(_env(tiny_tokenizer()))[0]
    assert s.meta["dataset"] == "niah[filler]" and s.meta["haystack"] == "filler"
    assert s.meta["haystack_source"].startswith("fallback: ") and s.meta["data_label"] == "filler"
    assert "The grass is green." in s.context


def test_context_length_buffer_and_sentence_boundary():
    tok = tiny_tokenizer()
    task = NeedleInAHaystack(lengths="500", depths="50", needle="sandwich")
    s = task.samples(_env(tok))[0]
    needle = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
    assert needle in s.context
    n = len(tok(s.context, add_special_tokens=False)["input_ids"])
    assert 500 - 200 - 8 <= n <= 500 - 200  # upstream keeps length − 200 tokens (re-tokenizing may merge a few)
    before = s.context[: s.context.index(needle)].rstrip("\n")
    assert before.endswith(".")  # moved back to just after a period


def _sentencepiece_like_tokenizer(vocab_size: int):
    """A Llama-2/Mistral-style tokenizer (Metaspace '▁', BPE) trained offline: a lone '.' encodes
    as '▁.', a token that never follows a word, while periods in text are '.' or merged ('▁go.')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
              "The pass key is 0123456789. Remember it. The best thing to do in San Francisco is eat a sandwich "
              "and sit in Dolores Park on a sunny day.\n A lone period . like this . encodes as one piece. ")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("vocab_size", [120, 400])  # 120: '.' mostly its own token; 400: merged into words
def test_sentence_boundary_with_a_sentencepiece_tokenizer(vocab_size):
    tok = _sentencepiece_like_tokenizer(vocab_size)
    lone = tok.convert_ids_to_tokens(tok(".", add_special_tokens=False)["input_ids"])
    assert lone == ["▁."]  # the case the upstream test (ids of encode('.')) never matches inside text
    assert "<unk>" not in tok.convert_ids_to_tokens(tok("Here we go.\nThe grass", add_special_tokens=False)["input_ids"])
    needle = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
    samples = NeedleInAHaystack(lengths="600", depths="25;50;75", needle="sandwich", haystack="filler"
                                ).samples(_env(tok))
    for s, depth in zip(samples, (25, 50, 75)):
        at = s.context.index(needle)
        before = s.context[:at].rstrip()
        assert before.endswith(".")  # right after a sentence end, not slid back to position 0
        haystack_chars = len(s.context) - len(needle)
        assert abs(at / haystack_chars - depth / 100) < 0.05, (depth, at, haystack_chars)


def test_depth_zero_and_hundred():
    tok = tiny_tokenizer()
    first, last = NeedleInAHaystack(lengths="500", depths="0;100").samples(_env(tok))
    key0, key1 = first.turns[0].answers[0], last.turns[0].answers[0]
    assert first.context.lstrip("\n").startswith(f"The pass key is {key0}.")
    assert last.context.rstrip("\n").endswith(f"{key1} is the pass key.")


def test_deterministic_for_a_seed_and_varies_across_seeds():
    tok = tiny_tokenizer()
    task = NeedleInAHaystack(lengths="400", depths="0;50", repeats=2)
    a, b = task.samples(_env(tok, 1)), task.samples(_env(tok, 1))
    assert [s.context for s in a] == [s.context for s in b]
    c = task.samples(_env(tok, 2))
    assert [s.turns[0].answers for s in a] != [s.turns[0].answers for s in c]


def test_essay_haystack_from_shared_data(shared_data):
    tok = tiny_tokenizer()
    s = NeedleInAHaystack(lengths="800", depths="25", haystack=str(shared_data / "niah" / "PaulGrahamEssays")
                          ).samples(_env(tok))[0]
    assert "The pass key is" in s.context and len(s.context) > 600


def test_scorers():
    needle = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
    assert needle_recall(needle, needle) == 1.0
    assert needle_recall("Eat a sandwich in Dolores Park.", needle) == pytest.approx(4 / 8)
    assert needle_recall("I don't know.", needle) == 0.0
    task = NeedleInAHaystack()
    s = task.samples(_env(tiny_tokenizer()))[0]
    key = s.turns[0].answers[0]
    assert task.score(s, s.turns[0], f"The pass key is {key}.") == {"score": 1.0, "score_10": 10}
    assert task.score(s, s.turns[0], "The pass key is 12.") == {"score": 0.0, "score_10": 1}


def test_bad_grid():
    with pytest.raises(UserError, match="lengths"):  # must exceed the 200-token buffer
        NeedleInAHaystack(lengths="100").samples(_env(tiny_tokenizer()))
    with pytest.raises(UserError, match="does not exist"):
        NeedleInAHaystack(haystack="/no/such/folder").samples(_env(tiny_tokenizer()))
