"""A tokenizer's chat template, given each message's text in the form the template reads.

Text-only chat templates read ``message["content"]`` as a string. Many vision-language checkpoints'
templates (LLaVA, LLaVA-NeXT, Idefics, SmolVLM: the ``chat_template.jinja`` beside the processor)
read it only as a list of parts (``[{"type": "text", "text": ...}]``) and, given a string, iterate
its characters, find no ``type == "text"`` part and render the message *empty* — no error, the
model is asked nothing. Every prompt lcbench renders goes through :func:`chat_text`, which finds
once per template which form keeps a probe text (string first, then parts) and refuses a template
that keeps neither.
"""

from __future__ import annotations

from typing import Any

from .errors import UserError

_PROBE = "\u2063lcbench-chat-probe\u2063"
_FORMS: dict[str, str] = {}  # chat template text -> "string" | "parts"
_SYSTEM: dict[str, bool] = {}  # chat template text -> renders a system message
_PLAIN_PROMPT = "the task's plain prompt (--task-args chat=false; LongBench: chat=never)"


def _as_parts(messages: list[dict]) -> list[dict]:
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
            for m in messages]


def _keeps_probe(tokenizer: Any, messages: list[dict]) -> bool:
    try:
        return _PROBE in tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                       enable_thinking=False)
    except Exception:  # jinja's TemplateError, or a template indexing a string as a dict
        return False


def _key(tokenizer: Any) -> str:
    template = tokenizer.chat_template
    return template if isinstance(template, str) else repr(template)


def content_form(tokenizer: Any) -> str:
    """``"string"`` or ``"parts"``: how the tokenizer's chat template must be given a message's text
    for the text to appear in the prompt. A :class:`UserError` when neither form keeps it."""
    key = _key(tokenizer)
    if key not in _FORMS:
        probe = [{"role": "user", "content": _PROBE}]
        if _keeps_probe(tokenizer, probe):
            _FORMS[key] = "string"
        elif _keeps_probe(tokenizer, _as_parts(probe)):
            _FORMS[key] = "parts"
        else:
            raise UserError("the model's chat template drops the text of a user message, given either as a string "
                            "or as [{'type': 'text', 'text': ...}] parts, so every prompt would reach the model empty. "
                            f"Fix: {_PLAIN_PROMPT}, or a tokenizer whose chat template renders user text.")
    return _FORMS[key]


def accepts_system(tokenizer: Any) -> bool:
    """Whether the chat template renders a system message. Gemma-1/2's and Mistral-7B-Instruct
    v0.x's raise ("System role not supported"); Gemma-3's folds it into the first user message
    itself."""
    key = _key(tokenizer)
    if key not in _SYSTEM:
        try:
            text = chat_text(tokenizer, [{"role": "system", "content": _PROBE + "s"}, {"role": "user", "content": "x"}])
            _SYSTEM[key] = _PROBE + "s" in text
        except UserError:
            _SYSTEM[key] = False
    return _SYSTEM[key]


def chat_text(tokenizer: Any, messages: list[dict], **template_kwargs: Any) -> str:
    """``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`` with each
    string content given in the form the template reads (:func:`content_form`). A template that
    raises on these messages (its ``raise_exception``: roles that must alternate, no system role) is
    a :class:`UserError` carrying the template's own words.

    ``enable_thinking=False`` unless the caller says otherwise, as kvpress's pipeline renders every
    prompt (``kvpress/pipeline.py``, ``enable_thinking: bool = False``): a reasoning model's template
    (Qwen3, GLM-4.5, SmolLM3) then opens the answer with an empty thinking block, and the model
    answers within the task's ``max_new_tokens`` instead of spending them on its reasoning. Templates
    that do not read the variable render as before."""
    from jinja2 import TemplateError

    template_kwargs.setdefault("enable_thinking", False)
    if content_form(tokenizer) == "parts":
        messages = _as_parts(messages)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    except TemplateError as exc:
        roles = ", ".join(m.get("role", "?") for m in messages)
        raise UserError(f"the model's chat template refuses the messages [{roles}]: {exc}. Fix: {_PLAIN_PROMPT}, "
                        f"or a tokenizer whose chat template accepts them.") from None
