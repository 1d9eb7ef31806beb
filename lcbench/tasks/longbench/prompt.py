"""LongBench prompts (``LongBench/pred.py`` ``get_pred``): the template rendered with the row, then
middle truncation of the *whole raw prompt* in the target tokenizer, before any chat template:

    ids = tokenizer(prompt, truncation=False).input_ids        # default special tokens
    if len(ids) > max_length:
        half = int(max_length / 2)
        prompt = decode(ids[:half], skip_special_tokens=True) + decode(ids[-half:], skip_special_tokens=True)

lcbench needs the prompt as a *context part* (template up to the end of ``{context}``) and a
*question part* (the rest), which the engine joins again. The truncated prompt is split at the
position where the question part starts, so ``context_part + question_part`` is exactly the
string upstream feeds the model. The question part is normally far shorter than ``max_length / 2``
tokens, so the cut falls inside the context and the truncated prompt ends with the untouched
question part (``split="template"``). Two cases fall back: a tokenizer whose decode does not
reproduce the tail verbatim, and a window so small that the cut reaches into a long ``{input}``
(triviaqa's and lsht's inputs carry a passage). Then the split is the last occurrence of the
template's literal text after ``{context}`` past the cut (``"suffix-search"``), or else the cut
itself (``"cut"``). The joined text is upstream's in every case; only where compression may act
moves. Trailing whitespace of the context goes to the question part (see :func:`_split`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...chat import chat_text
from ...errors import UserError


@dataclass(frozen=True)
class RenderedPrompt:
    """One row's prompt as context part + question part, with its truncation record."""

    context_part: str
    question_part: str
    prompt_tokens: int  # tokens of the untruncated raw prompt (default special tokens)
    truncated: bool
    split: str  # "template", "suffix-search" or "cut"


def render_parts(template: str, row: dict[str, Any]) -> tuple[str, str]:
    """``template.format(**row)`` split right after the context: (context part, question part)."""
    if template.count("{context}") != 1:
        raise ValueError("a LongBench template has exactly one {context} field")
    head, _, tail = template.partition("{context}")
    return head.format(**row) + row["context"], tail.format(**row)


def middle_truncate(tokenizer, prompt: str, max_length: int) -> tuple[str, int, str | None]:
    """Upstream's middle truncation; returns (prompt, untruncated token count, decoded head or None)."""
    ids = tokenizer(prompt, truncation=False)["input_ids"]
    if len(ids) <= max_length:
        return prompt, len(ids), None
    half = int(max_length / 2)
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail, len(ids), head


def _literal_after_context(template: str) -> str:
    tail = template.partition("{context}")[2]
    return tail.split("{", 1)[0]


def _split(prompt: str, at: int, n_tokens: int, truncated: bool, how: str) -> RenderedPrompt:
    """Split ``prompt`` at ``at``, moved back over the context's trailing whitespace: the engine
    tokenizes the two parts separately, and a whitespace run cut in two (context ending in "\n",
    question starting with "\n\n") would tokenize differently from upstream's single pass."""
    at = len(prompt[:at].rstrip()) or at
    return RenderedPrompt(prompt[:at], prompt[at:], n_tokens, truncated, how)


def render_prompt(tokenizer, template: str, row: dict[str, Any], max_length: int) -> RenderedPrompt:
    """Render, middle-truncate to ``max_length`` tokens and split one row (see module docstring)."""
    context_part, question_part = render_parts(template, row)
    prompt, n_tokens, head = middle_truncate(tokenizer, context_part + question_part, max_length)
    if head is None:
        return _split(prompt, len(context_part), n_tokens, False, "template")
    if prompt.endswith(question_part) and len(prompt) - len(question_part) >= len(head):
        return _split(prompt, len(prompt) - len(question_part), n_tokens, True, "template")
    literal = _literal_after_context(template)
    at = prompt.rfind(literal) if literal else -1
    if at >= len(head):
        return _split(prompt, at, n_tokens, True, "suffix-search")
    return _split(prompt, len(head), n_tokens, True, "cut")


def chat_overhead(tokenizer) -> int:
    """Tokens a chat template adds around a user message (0 without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return 0
    msgs = [{"role": "user", "content": "x"}]
    text = chat_text(tokenizer, msgs)
    return max(0, len(tokenizer(text, add_special_tokens=False)["input_ids"]) - len(tokenizer("x", add_special_tokens=False)["input_ids"]))


def prompt_budget(model_name: str, model_max_length: int, max_new_tokens: int, chat_tokens: int,
                  table: dict[str, int], override: int = 0) -> tuple[int, str]:
    """``max_length`` for middle truncation and where it came from.

    1. ``override`` (the task's ``max_length`` parameter) when > 0;
    2. ``model2maxlen.json`` when the model's name (or its last path component) is listed there;
    3. otherwise the model's window minus the generation length and the tokens the chat template
       adds, so prompt + wrapper + answer fit (LongBench's budgets leave 500 tokens for the same)."""
    if override > 0:
        return override, "max_length parameter"
    for key in (model_name, model_name.rstrip("/").split("/")[-1]):
        if key in table:
            return int(table[key]), f"model2maxlen.json[{key}]"
    budget = model_max_length - max_new_tokens - chat_tokens
    if budget <= 0:
        raise UserError(f"LongBench: model '{model_name}' has a context window of {model_max_length} tokens, too small for "
                        f"{max_new_tokens} generated tokens. Fix: pass max_length=<tokens> in the task arguments.")
    return budget, "model_max_length - max_new_tokens - chat template tokens"
