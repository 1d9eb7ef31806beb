"""What a task hands the engine: samples of one shared context and one or more turns (DESIGN.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Turn:
    """One question about a sample's context.

    ``question`` is the *question part* of the prompt (the task's template after the context,
    already filled in); ``answer_prefix`` is text the assistant's reply starts with (RULER's
    answer prefixes), fed to the model but not part of the prediction. ``stop`` lists strings that
    end generation (the matched text is cut from the prediction).
    """

    question: str
    answers: list[str]
    max_new_tokens: int
    scorer: str
    answer_prefix: str = ""
    stop: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    # token ids that end generation like EOS but stay in the prediction (LongBench samsum passes
    # eos_token_id=[eos, id of "\n"] to generate), and HF's min_length: EOS and these ids are
    # masked until this many tokens are generated
    stop_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0


@dataclass(frozen=True)
class Sample:
    """One shared context and its turns.

    ``context`` is the *context part* of the prompt (template text up to the end of the context);
    ``system`` an optional system message; ``chat`` whether the model's chat template applies
    (LongBench lists datasets that are run without it). ``meta`` carries dataset, length bucket,
    depth and the like, copied into every record.

    ``question_message``: with a chat template, the question is its own user message after the
    context's (NIAH's providers send two user messages) instead of sharing one. ``prefix``: raw
    prompt text before the context part that no stage compresses, for samples whose task renders
    an upstream prompt layout itself (``chat=False``; RULER's model-template quirks).
    """

    id: str
    context: str
    turns: list[Turn]
    meta: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    chat: bool = True
    question_message: bool = False
    prefix: str = ""
