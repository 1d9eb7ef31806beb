"""LongBench prompts: the protocol data is upstream's verbatim, all 21 templates render into a
context part + question part that join to ``template.format(**row)``, and middle truncation and
the split reproduce ``pred.py`` exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcbench.errors import UserError
from lcbench.models.tiny import tiny_tokenizer
from lcbench.tasks.longbench.prompt import middle_truncate, prompt_budget, render_parts, render_prompt
from lcbench.tasks.longbench.protocol import length_bucket, longbench_protocol

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
P = longbench_protocol()


class CharTokenizer:
    """One token per character plus a BOS id (1) that ``decode(skip_special_tokens=True)`` drops:
    enough to pin truncation arithmetic exactly, and fast on 200k-character prompts."""

    chat_template = None

    def __call__(self, text: str, truncation: bool = False, add_special_tokens: bool = True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) + 10 for c in text]}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(("<s>" if i == 1 else chr(i - 10)) for i in ids if not (skip_special_tokens and i == 1))


ROW = {"context": "C" * 50, "input": "what?"}


@pytest.mark.skipif(not (SHARED / "longbench" / "config").is_dir(), reason="needs ../shared/data")
def test_protocol_constants_are_upstreams_verbatim():
    cfg = SHARED / "longbench" / "config"
    assert P["prompts"] == json.loads((cfg / "dataset2prompt.json").read_text(encoding="utf-8"))
    assert list(P["prompts"]) == P["datasets"]  # pred.py's order
    assert P["max_new_tokens"] == json.loads((cfg / "dataset2maxlen.json").read_text())
    assert P["model_max_length"] == json.loads((cfg / "model2maxlen.json").read_text())


def test_protocol_tables():
    assert len(P["datasets"]) == 21 and len(P["e_datasets"]) == 13
    assert set(P["e_datasets"]) <= set(P["datasets"])
    assert P["no_chat"] == ["trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"]
    assert sorted(P["language"].values()).count("zh") == 5
    assert P["metric"]["dureader"] == "rouge_zh_score" and P["metric"]["passage_count"] == "count_score"
    # upstream typos and whitespace are kept
    assert P["prompts"]["narrativeqa"].count("asconcisely") == 2
    assert "\n\n Answer the question" in P["prompts"]["qasper"]
    assert "{context}{input}Next line of code" in P["prompts"]["repobench-p"]
    assert "all news. \n\nNews" in P["prompts"]["multi_news"]


@pytest.mark.parametrize("dataset", P["datasets"])
def test_every_template_renders_and_splits_after_the_context(dataset):
    template = P["prompts"][dataset]
    context_part, question_part = render_parts(template, ROW)
    assert context_part + question_part == template.format(**ROW)
    assert context_part.endswith(ROW["context"])
    assert ROW["context"] not in question_part
    if "{input}" in template:
        assert ROW["input"] in question_part


def test_middle_truncation_is_pred_py():
    tok = CharTokenizer()
    prompt = "HEAD-" + "x" * 100 + "-TAIL"
    out, n, head = middle_truncate(tok, prompt, 21)
    ids = tok(prompt)["input_ids"]
    assert n == len(prompt) + 1  # BOS counted, as tokenizer(prompt) does upstream
    assert out == tok.decode(ids[:10], skip_special_tokens=True) + tok.decode(ids[-10:], skip_special_tokens=True)
    assert out == "HEAD-xxxx" + "xxxxx-TAIL" and head == "HEAD-xxxx"
    assert middle_truncate(tok, prompt, 200) == (prompt, n, None)


def test_truncated_prompt_split_keeps_the_question_part():
    tok = CharTokenizer()
    row = {"context": "".join(chr(ord("a") + i % 26) for i in range(400)), "input": "Who?"}
    template = P["prompts"]["hotpotqa"]
    full_ctx, question = render_parts(template, row)
    r = render_prompt(tok, template, row, 301)
    assert r.truncated and r.split == "template" and r.prompt_tokens == len(full_ctx + question) + 1
    assert r.question_part == question
    upstream, _, _ = middle_truncate(tok, full_ctx + question, 301)
    assert r.context_part + r.question_part == upstream
    assert len(r.context_part + r.question_part) == 2 * 150 - 1  # half = int(301 / 2); the head's BOS is dropped


def test_split_falls_back_when_the_cut_reaches_the_input():
    tok = CharTokenizer()
    row = {"context": "c" * 40, "input": "Passage: " + "p" * 200 + "\n\nQuestion: q?\nAnswer:"}
    template = P["prompts"]["triviaqa"]  # "...\n\n{context}\n\n{input}"
    r = render_prompt(tok, template, row, 100)
    upstream, _, _ = middle_truncate(tok, "".join(render_parts(template, row)), 100)
    assert r.context_part + r.question_part == upstream
    assert r.split == "suffix-search" and r.question_part == "\n\nQuestion: q?\nAnswer:"


def test_split_with_a_real_bpe_tokenizer():
    tok = tiny_tokenizer()
    row = {"context": "The quick brown fox jumps over the lazy dog. " * 60, "input": "What jumps?"}
    template = P["prompts"]["multifieldqa_en"]
    r = render_prompt(tok, template, row, 200)
    ids = tok(template.format(**row))["input_ids"]
    assert r.context_part + r.question_part == tok.decode(ids[:100], skip_special_tokens=True) + tok.decode(
        ids[-100:], skip_special_tokens=True)
    # the context's trailing space moves to the question part, so the two parts tokenize as the
    # whole prompt does (the engine tokenizes them separately)
    assert r.split == "template" and r.question_part == " " + render_parts(template, row)[1]
    parts = tok(r.context_part)["input_ids"] + tok(r.question_part)["input_ids"]
    assert parts == tok(r.context_part + r.question_part)["input_ids"]


def test_prompt_budget():
    table = P["model_max_length"]
    assert prompt_budget("llama2-7b-chat-4k", 4096, 128, 0, table) == (3500, "model2maxlen.json[llama2-7b-chat-4k]")
    assert prompt_budget("/models/vicuna-v1.5-7b-16k", 16384, 32, 5, table)[0] == 15500
    assert prompt_budget("smollm2", 8192, 128, 30, table) == (
        8034, "model_max_length - max_new_tokens - chat template tokens")
    assert prompt_budget("smollm2", 8192, 128, 30, table, override=1000) == (1000, "max_length parameter")
    with pytest.raises(UserError, match="max_length"):
        prompt_budget("tiny", 100, 512, 0, table)


def test_length_buckets_are_scorer_e():
    assert [length_bucket(n) for n in (0, 3999, 4000, 7999, 8000, 50000)] == [
        "0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+"]
    assert length_bucket(None) is None
