"""The shared part of every prompt compressor: ``--ratio`` as a token budget in the target model's
tokenizer, the ratio-0 identity, and the statistics each record carries.

``--ratio r`` keeps ``round((1 − r)·(n + f)) − f`` of the context's ``n`` target-model tokens, where
``f`` are the tokens the engine measures with the context that no text stage can shorten (chat
template, system text, the question in query-aware mode; ``TextInput.fixed_tokens``); every
compressor returns a context of at most that many tokens (as close to it as its units allow).
``text_ratio`` in the records is over the context text alone.
The engine times the text stage (``text_s``) and measures its memory (``text_peak_memory_mb``);
the records also get ``text_tokens_original``, ``text_tokens_kept`` and ``text_ratio``.
"""

from __future__ import annotations

import dataclasses
from abc import ABCMeta, abstractmethod

from ..base import Stage, TextInput, keep_count
from .units import count_tokens


class PromptCompressor(Stage, metaclass=ABCMeta):
    """Base of the text-stage methods: subclasses implement :meth:`compress`."""

    stages = ("text",)

    def begin_sample(self) -> None:
        self._stats: dict[str, float] = {}

    @abstractmethod
    def compress(self, text: TextInput, budget: int) -> str:
        """The context of ``text`` shortened to at most ``budget`` target-model tokens."""

    def compress_text(self, text: TextInput) -> TextInput:
        if self.ratio <= 0 or not text.context:
            return text
        original = count_tokens(text.tokenizer, text.context)
        fixed = text.fixed_tokens  # kept anyway: the budget is over context + fixed, as the engine measures
        budget = max(1, min(original, keep_count(original + fixed, self.ratio) - fixed))
        context = self.compress(text, budget) if budget < original else text.context
        kept = count_tokens(text.tokenizer, context)
        self._stats = {"text_tokens_original": original, "text_tokens_kept": kept,
                       "text_ratio": 1.0 - kept / original}
        return dataclasses.replace(text, context=context)

    def sample_stats(self) -> dict[str, float]:
        return dict(getattr(self, "_stats", {}))
