"""How a RULER prompt reaches the model, including upstream's quirks with a model template.

RULER wraps each task in a model template *before* generating (``scripts/data/prepare.py``:
``template = model_template.format(task_template=...) + answer_prefix``), and two generators then
treat that whole string as the task template (NVIDIA/RULER@c3f5e3b):

- ``niah.py`` ``generate_input_output``: with one value asked for (``num_needle_q * num_needle_v == 1``)
  the rewrite ``Some→A, are all→is, are→is, answers→answer`` runs over the *wrapped* template, so it
  also changes the model template's own text (a system prompt saying "You are ..." becomes "You
  is ...").
- ``common_words_extraction.py`` ``generate_input_output``: each solved example is
  ``template.format(example) + ' ' + answer`` with the wrapped template, so with a chat model the
  example is an earlier chat turn (its own user message, generation prompt and answer), joined to
  the real prompt by ``"\\n"``.

lcbench uses the tokenizer's chat template for the model template (``apply_chat_template`` of one
user message, generation prompt added). ``quirks=upstream`` (the default) reproduces both quirks
by rendering that template around the task text itself: the sample then carries the rendered
wrapper as its ``prefix`` and question suffix and runs with ``chat=False`` (the engine adds the
tokenizer's BOS, which is stripped from the rendered text, so the ids equal the chat path's).
``quirks=fixed`` keeps the chat template intact and the example inside the user message. Where a
quirk changes nothing (no wrapper text to rewrite, no chat template) the chat path is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...chat import chat_text
from .niah import singularize
from .protocol import Rendered
from .sizing import PromptCounter

_MARK = "\u2063<ruler:user>\u2063"


@dataclass(frozen=True)
class Parts:
    """A sample's prompt as the engine gets it."""

    prefix: str
    context: str
    question: str
    answer_prefix: str
    chat: bool


def chat_wrapper(tokenizer: Any) -> tuple[str, str] | None:
    """(text before, text after) the user message in the tokenizer's chat template, generation
    prompt included; None without a chat template or when the template alters the message."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = chat_text(tokenizer, [{"role": "user", "content": _MARK}])
    pre, sep, post = text.partition(_MARK)
    return (pre, post) if sep and _MARK not in post else None


def _strip_bos(tokenizer: Any, text: str) -> str:
    """``text`` without its leading BOS when the tokenizer adds one itself (the engine's plain path
    tokenizes with special tokens), so the ids have one BOS, as the chat path's do."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        ids = tokenizer("x", add_special_tokens=True)["input_ids"]
        if ids and ids[0] == tokenizer.bos_token_id and len(ids) > len(tokenizer("x", add_special_tokens=False)["input_ids"]):
            return text[len(bos):]
    return text


class Layout:
    """Turns a generator's :class:`Rendered` into :class:`Parts` and counts its tokens."""

    def __init__(self, tokenizer: Any, chat: bool, kind: str, singular: bool, quirks: str):
        self.tokenizer = tokenizer
        self.counter = PromptCounter(tokenizer, chat)
        wrapper = chat_wrapper(tokenizer) if chat else None
        self.mode = "chat" if self.counter.chat else "plain"
        self.pre = self.post = ""
        if wrapper is not None and quirks == "upstream":
            pre, post = wrapper
            if kind == "niah" and singular and (singularize(pre), singularize(post)) != (pre, post):
                self.mode, self.pre, self.post = "singular_wrapper", singularize(pre), singularize(post)
            elif kind == "common_words_extraction":
                self.mode, self.pre, self.post = "example_turn", pre, post

    @property
    def quirk(self) -> str | None:
        """The upstream quirk this layout reproduces, for the record."""
        return None if self.mode in ("chat", "plain") else self.mode

    def parts(self, r: Rendered) -> Parts:
        if self.mode in ("chat", "plain"):
            return Parts("", r.head + r.context, r.tail, r.answer_prefix, self.mode == "chat")
        if self.mode == "singular_wrapper":
            return Parts(_strip_bos(self.tokenizer, self.pre), r.head + r.context, r.tail + self.post,
                         r.answer_prefix, False)
        shots = [self.pre + user + self.post + r.answer_prefix + " " + answer for user, answer in r.meta["shots"]]
        prefix = "\n".join(shots) + "\n" + self.pre
        return Parts(_strip_bos(self.tokenizer, prefix), r.meta["task_head"] + r.context, r.tail + self.post,
                     r.answer_prefix, False)

    def count(self, r: Rendered) -> int:
        """Tokens of the prompt as the engine renders it (answer prefix included)."""
        if self.mode in ("chat", "plain"):
            return self.counter(r.user, r.answer_prefix)
        p = self.parts(r)
        return len(self.tokenizer(p.prefix + p.context + p.question + p.answer_prefix,
                                  add_special_tokens=True)["input_ids"])
