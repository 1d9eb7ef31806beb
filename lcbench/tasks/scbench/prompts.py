"""SCBench rows → lcbench samples in either shared-context mode (microsoft/MInference@fb56c91
``scbench/eval_utils.py``: ``create_multiturn_prompt`` / ``create_scdq_prompt``; ``run_scbench.py``
budgets and truncation; spec §4.3).

Multi-turn (default): the context part is the task template up to the end of the context; turn 0's
question part is the rest (``multiturn_templates``); later turns are the chat follow-ups
(``multiturn_follow_up_templates_in_chat_template``) after the previous turn's gold answer, which
the engine feeds as history. Without a chat template the plain follow-ups apply, whose
``{pre_ans}\\n\\n`` the engine writes. Summary follow-ups in chat start their answer with
"This paper", as upstream appends it after the generation prompt.

Multi-request ("scdq"): the context part is ``multiturn_templates_scdq`` (the user turn left
open) and every query continues it directly with its chat follow-up text.

Truncation: only the first prompt is cut, in the middle of its tokens, to ``max_seq_length`` less
the generation budget (``max_new_tokens × turns``; mixed tasks ``sum × turns // 2``; multi-request
another 1000) — here applied to the context text so that the template around it survives.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ...chat import chat_text
from ..sample import Sample, Turn
from .protocol import MIXED, PROTOCOL

_SEP = "\u2063<scbench:split>\u2063"
_OPTIONS = "ABCD"


def max_new_tokens(task: str, turn: dict, max_seq_length: int) -> int:
    budget = PROTOCOL["max_new_tokens"][task]
    if isinstance(budget, dict):
        return int(budget[turn["task"]])
    return PROTOCOL["defaults"]["large_max_new_tokens"] if budget >= max_seq_length else int(budget)


def input_budget(task: str, turns: int, max_seq_length: int, multi_request: bool) -> int:
    """``max_input_length`` of ``run_scbench.py``."""
    budget = PROTOCOL["max_new_tokens"][task]
    if task in MIXED:
        limit = max_seq_length - sum(budget.values()) * turns // 2
    else:
        limit = max_seq_length - (PROTOCOL["defaults"]["large_max_new_tokens"] if budget >= max_seq_length
                                  else budget) * turns
    return limit - PROTOCOL["defaults"]["scdq_reserve"] if multi_request else limit


def label(task: str, turn: dict) -> Any:
    """The scoring label as ``eval_utils.get_ground_truth`` builds it."""
    kind = PROTOCOL["tasks"][task]["label"]
    if kind == "answer_and_letter":
        return [turn["answer"], _OPTIONS[turn["options"].index(turn["answer"])]]
    if kind == "answer_in_list":
        return [turn["answer"]]
    return turn["answer"]


def mf_prefix(turn: dict) -> str:
    target = re.findall(PROTOCOL["mf"]["target_regex"], turn["input"])[0].lower()[:-3]
    return PROTOCOL["mf"]["prefix"].format(target=target)


def fields(task: str, turn: dict) -> dict[str, Any]:
    """Template fields of one turn."""
    if task == "scbench_choice_eng":
        opts = turn["options"]
        return {"question": turn["input"], **{f"OPTION_{c}": opts[i] for i, c in enumerate(_OPTIONS)}}
    if task in ("scbench_qa_eng", "scbench_qa_chn"):
        return {"question": turn["input"]}
    if task == "scbench_mf":
        return {"input": turn["input"], "prefix": mf_prefix(turn)}
    return {"input": turn["input"]}


def _around_context(template: str, values: dict[str, Any]) -> tuple[str, str]:
    head, sep, tail = template.partition("{context}")
    assert sep, template
    return head.format(**values), tail.format(**values)


def parts(task: str, row: dict, multi_request: bool, chat: bool,
          quirks: str = "upstream") -> tuple[str, str, list[str], list[str]]:
    """(text before the context, the context, each turn's question part, each turn's answer prefix).

    ``quirks=upstream``: mf's chat follow-ups all get the *last* turn's question line
    (``create_multiturn_prompt``'s list comprehension reads ``prefix`` left over from the loop
    before it); ``fixed``: each turn its own."""
    turns = row["multi_turns"]
    context = row["context"] if "context" in row else row["input"]
    context = context if isinstance(context, str) else str(context)  # mf: a list, rendered as by str.format
    if multi_request:
        template = PROTOCOL["multiturn_templates_scdq"][task]
        if isinstance(template, list):
            head, _ = _around_context(template[0], {})
            queries = [template[1].format(**fields(task, t)) for t in turns]
        else:
            # mf: the context template's {prefix} is turn 0's *input* (upstream verbatim)
            head, _ = _around_context(template, {"prefix": turns[0]["input"]} if task == "scbench_mf" else {})
            follow = PROTOCOL["multiturn_follow_up_templates_in_chat_template"][task]
            queries = [follow.format(**fields(task, t)) for t in turns]
        return head, context, queries, [""] * len(turns)
    head, first = _around_context(PROTOCOL["multiturn_templates"][task], fields(task, turns[0]))
    questions, prefixes = [first], [""]
    for t in turns[1:]:
        if chat:
            values = fields(task, t)
            if task == "scbench_mf" and quirks == "upstream":
                values["prefix"] = mf_prefix(turns[-1])
            questions.append(PROTOCOL["multiturn_follow_up_templates_in_chat_template"][task].format(**values))
            prefixes.append(PROTOCOL["summary"]["chat_follow_up_answer_prefix"] if task == "scbench_summary" else "")
        else:
            plain = PROTOCOL["multiturn_follow_up_templates"][task]
            assert plain.startswith("{pre_ans}\n\n"), plain
            questions.append(plain[len("{pre_ans}\n\n"):].format(**fields(task, t)))
            prefixes.append("")
    return head, context, questions, prefixes


def _render(tokenizer: Any, chat: bool, user: str) -> str:
    if chat:
        return chat_text(tokenizer, [{"role": "user", "content": user}])
    return user


def _tokens(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def first_prompt_tokens(tokenizer: Any, chat: bool, head: str, context: str, tail: str | None) -> tuple[int, int, int]:
    """Token counts of the first prompt (as ``tok.encode``: special tokens added) split into the
    text before the context, the context and the text after it; ``tail=None`` is multi-request's
    context-only prompt, which ends where the context ends."""
    text = _render(tokenizer, chat, head + _SEP + context + _SEP + (tail or ""))
    before, ctx, after = text.split(_SEP)
    n_after = 0 if tail is None else len(_tokens(tokenizer, after, False))
    return len(_tokens(tokenizer, before, True)), len(_tokens(tokenizer, ctx, False)), n_after


def truncate_middle(tokenizer: Any, chat: bool, head: str, context: str, tail: str | None,
                    limit: int) -> tuple[str, bool]:
    """The context cut so the first prompt keeps its first and last ``limit // 2`` tokens
    (``run_scbench.truncate_input``); unchanged when the prompt fits."""
    n_before, n_ctx, n_after = first_prompt_tokens(tokenizer, chat, head, context, tail)
    if limit < 0 or n_before + n_ctx + n_after <= limit:
        return context, False
    half = limit // 2
    keep_head, keep_tail = max(half - n_before, 0), max(half - n_after, 0)
    ids = _tokens(tokenizer, context, False)
    kept = tokenizer.decode(ids[:keep_head]) + (tokenizer.decode(ids[-keep_tail:]) if keep_tail else "")
    return kept, True


def length_bucket(tokens: int) -> int:
    bucket = 1024
    while bucket < tokens:
        bucket *= 2
    return bucket


def _seam(context_part: str, questions: list[str]) -> tuple[str, list[str]]:
    """Multi-turn: the first prompt is one string upstream (``tok.encode(prompts[0])``), while the
    engine tokenizes the context part and the question part apart; a context ending in whitespace
    next to a question starting with it would tokenize differently (one extra token). The
    whitespace moves into the question part, as LongBench's prompt split does."""
    kept = context_part.rstrip()
    if not kept or kept == context_part:
        return context_part, questions
    return kept, [context_part[len(kept):] + questions[0]] + questions[1:]


def build_sample(task: str, row: dict, *, sample_id: str, dataset: str, mode: str, chat: bool, tokenizer: Any,
                 max_seq_length: int, turn_budget: int, max_turns: int, quirks: str = "upstream") -> Sample:
    """One SCBench row as a sample (``turn_budget``: the turn count used for the input budget)."""
    row = {**row, "multi_turns": list(row["multi_turns"])[:max_turns] if max_turns > 0 else list(row["multi_turns"])}
    multi_request = mode == "multi_request"
    use_chat = bool(chat and getattr(tokenizer, "chat_template", None))
    head, context, questions, prefixes = parts(task, row, multi_request, use_chat, quirks)
    first_tail = None if multi_request else questions[0]
    limit = input_budget(task, turn_budget, max_seq_length, multi_request)
    context, truncated = truncate_middle(tokenizer, use_chat, head, context, first_tail, limit)
    turns = []
    for t, question, prefix in zip(row["multi_turns"], questions, prefixes):
        turns.append(Turn(question=question, answers=[str(t["answer"])],
                          max_new_tokens=max_new_tokens(task, t, max_seq_length),
                          scorer=_metric(task, t), answer_prefix=prefix,
                          meta={"label": label(task, t), "subtask": t.get("task"), "name": t.get("name")}))
    n_ctx = first_prompt_tokens(tokenizer, use_chat, head, context, first_tail)[1]
    meta = {"dataset": dataset, "task": task, "suite": "scbench", "mode": mode, "row_id": row.get("id"),
            "context_tokens": n_ctx, "length": n_ctx, "length_bucket": length_bucket(n_ctx), "truncated": truncated,
            "category": PROTOCOL["tasks"][task]["category"]}
    for key in ("lang", "repo"):
        if key in row:
            meta[key] = row[key]
    if "task" in row and isinstance(row["task"], str):
        meta["row_task"] = row["task"]
    context_part = head + context
    if not multi_request:  # multi-request: upstream encodes context and query apart too (test_scdq)
        context_part, moved = _seam(context_part, [t.question for t in turns])
        turns = [dataclasses.replace(t, question=q) for t, q in zip(turns, moved)]
    return Sample(sample_id, context_part, turns, meta=meta, chat=chat)


def _metric(task: str, turn: dict) -> str:
    metric = PROTOCOL["tasks"][task]["metric"]
    return metric[turn["task"]] if isinstance(metric, dict) else metric
