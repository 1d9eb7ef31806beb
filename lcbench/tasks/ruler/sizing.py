"""Sizing a generated prompt to a token budget in the *target* model's tokenizer.

RULER (``scripts/data/synthetic/*.py`` at HEAD) estimates tokens per haystack unit, binary-searches
the largest haystack whose prompt plus ``tokens_to_generate`` fits ``max_seq_length``, then shrinks
samples that overflow by ``incremental`` units. lcbench keeps the idea — the largest haystack that
fits, counted on the full prompt as the model sees it (chat template included) — but fits every
sample to within one unit: a galloping search from the previous sample's size, so each prompt
lands within one haystack unit (a word, a sentence, a document) of the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...errors import UserError


class PromptCounter:
    """Token count of a one-turn prompt exactly as the engine renders it: the user message through
    the tokenizer's chat template (generation prompt added) followed by the answer prefix, or the
    plain text with the tokenizer's special tokens when there is no chat template."""

    def __init__(self, tokenizer: Any, chat: bool):
        self.tokenizer = tokenizer
        self.chat = bool(chat and getattr(tokenizer, "chat_template", None))

    def text(self, user: str, answer_prefix: str = "") -> str:
        if self.chat:
            rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                          add_generation_prompt=True)
            return rendered + answer_prefix
        return user + answer_prefix

    def __call__(self, user: str, answer_prefix: str = "") -> int:
        ids = self.tokenizer(self.text(user, answer_prefix), add_special_tokens=not self.chat)["input_ids"]
        return len(ids)


def fit_units(count: Callable[[int], int], budget: int, start: int, lower: int, upper: int | None,
              what: str) -> int:
    """The largest ``n`` in ``[lower, upper]`` with ``count(n) <= budget`` (``count`` grows with ``n``),
    found by galloping from ``start`` and bisecting; a UserError when even ``lower`` overflows."""
    cache: dict[int, int] = {}

    def fits(n: int) -> bool:
        if n not in cache:
            cache[n] = count(n)
        return cache[n] <= budget

    top = upper if upper is not None else 1 << 40
    start = min(max(start, lower), top)
    if fits(start):
        good, step = start, 1
        while good + step <= top and fits(good + step):
            good += step
            step *= 2
        if good + step <= top:
            bad = good + step
        elif good == top or fits(top):
            return top
        else:
            bad = top
    else:
        bad, step = start, 1
        while bad - step >= lower and not fits(bad - step):
            bad -= step
            step *= 2
        if bad - step >= lower:
            good = bad - step
        elif bad != lower and fits(lower):
            good = lower
        else:
            raise UserError(
                f"{what}: even the smallest haystack ({lower} units, {cache.get(lower, count(lower))} tokens) does "
                f"not fit the budget of {budget} tokens. Fix: request a longer context length."
            )
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def estimate_units(count: Callable[[int], int], budget: int, probe: int) -> int:
    """Units that should fill ``budget``, from the tokens of a ``probe``-unit prompt (RULER's
    tokens-per-haystack estimate)."""
    per_unit = max(count(probe), 1) / probe
    return max(1, int(budget / per_unit))
