"""Rendering a sample into token ids: the context part and one question part per turn.

With a chat template the whole user message (context part + question part) is rendered as chat
text and split where the context part ends (DESIGN.md step 1), so the split respects the
template. The answer prefix (RULER) is appended after the generation prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..chat import chat_text
from ..errors import UserError
from ..tasks.sample import Sample

_SPLIT = "\u2063<lcbench:context-end>\u2063"


@dataclass
class RenderedPrompt:
    context_text: str
    turn_texts: list[str]  # multi-request: each follows the context; multi-turn: each follows the previous turn's gold answer
    context_ids: list[int]
    turn_ids: list[list[int]]


def uses_chat(tokenizer, sample: Sample) -> bool:
    return bool(sample.chat and getattr(tokenizer, "chat_template", None))


def _messages(sample: Sample, turn_count: int, gold_history: bool, context: str, question: str) -> list[dict]:
    msgs: list[dict] = []
    if sample.system is not None:
        msgs.append({"role": "system", "content": sample.system})
    if sample.question_message:  # the question as its own user message (NIAH's providers)
        msgs += [{"role": "user", "content": context}, {"role": "user", "content": question}]
    else:
        msgs.append({"role": "user", "content": context + question})
    for k in range(1, turn_count):
        prev = sample.turns[k - 1]
        gold = prev.answers[0] if (gold_history and prev.answers) else ""
        msgs.append({"role": "assistant", "content": prev.answer_prefix + gold})
        msgs.append({"role": "user", "content": sample.turns[k].question})
    return msgs


def render(tokenizer, sample: Sample, context: str, multi_turn: bool) -> RenderedPrompt:
    """Render ``sample`` with ``context`` (the possibly compressed context part)."""
    turns = sample.turns
    if uses_chat(tokenizer, sample):
        marked = chat_text(tokenizer, _messages(sample, 1, True, context + _SPLIT, turns[0].question))
        if marked.count(_SPLIT) != 1:
            raise UserError("the model's chat template altered the prompt so the context could not be located; "
                            "run the task with chat disabled (--task-args chat=false) or fix the template")
        context_text, _, _ = marked.partition(_SPLIT)
        full_first = chat_text(tokenizer, _messages(sample, 1, True, context, turns[0].question))
        if not multi_turn:
            texts = []
            for t in turns:
                full = chat_text(tokenizer, _messages(sample, 1, True, context, t.question))
                texts.append(full[len(context_text):] + t.answer_prefix)
        else:
            texts = [full_first[len(context_text):] + turns[0].answer_prefix]
            previous = full_first + turns[0].answer_prefix
            for k in range(1, len(turns)):
                full = chat_text(tokenizer, _messages(sample, k + 1, True, context, turns[0].question))
                if not full.startswith(previous[: len(previous) - len(turns[k - 1].answer_prefix)]):
                    raise UserError("the chat template does not render conversations as growing prefixes; "
                                    "multi-turn mode needs that (try --task-args mode=multi_request)")
                head = previous[: len(previous) - len(turns[k - 1].answer_prefix)]
                delta = full[len(head):]
                # the delta starts with the previous answer prefix + gold answer (history), then the new question
                texts.append(delta[len(turns[k - 1].answer_prefix):] + turns[k].answer_prefix)
                previous = full + turns[k].answer_prefix
        ctx_ids = tokenizer(context_text, add_special_tokens=False)["input_ids"]
    else:
        context_text = sample.prefix + (sample.system + "\n\n" if sample.system else "") + context
        texts = []
        for k, t in enumerate(turns):
            if multi_turn and k > 0:
                prev = turns[k - 1]
                gold = prev.answers[0] if prev.answers else ""
                texts.append(gold + "\n\n" + t.question + t.answer_prefix)
            else:
                texts.append(t.question + t.answer_prefix)
        ctx_ids = tokenizer(context_text, add_special_tokens=True)["input_ids"]
    turn_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return RenderedPrompt(context_text, texts, list(ctx_ids), [list(t) for t in turn_ids])
