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

from ...chat import chat_text
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
            rendered = chat_text(self.tokenizer, [{"role": "user", "content": user}])
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


def upstream_units(count_for: Callable[[int], Callable[[int], int]], budget: int, n_samples: int, incremental: int,
                   estimate: int, lower: int, upper: int | None, what: str) -> list[int]:
    """RULER's own sizing (``sizing=upstream``; ``niah.py``/``variable_tracking.py``/``qa.py``/
    ``common_words_extraction.py`` ``generate_samples`` at c3f5e3b): one binary search for the largest
    haystack that fits a search instance (``count_for(-1)``), then every sample starts there and
    drops a whole ``incremental`` step while it overflows. So most samples fall well under the
    nominal length (essay NIAH: 500 words a step). ``count_for(i)`` counts sample ``i``'s tokens."""
    search = count_for(-1)
    try:
        best = fit_units(search, budget, estimate, max(lower, min(incremental, upper or incremental)), upper, what)
    except UserError:
        best = incremental  # upstream: `optimal_num_haystack or incremental`
    out = []
    for index in range(n_samples):
        count, n = count_for(index), best
        while count(n) > budget and n > incremental:
            n -= incremental
        if count(n) > budget:  # upstream would loop forever here
            raise UserError(f"{what}: sample {index} does not fit the budget of {budget} tokens even at {n} units "
                            f"(upstream sizing). Fix: request a longer context length, or sizing=fill.")
        out.append(n)
    return out


def upstream_fwe_units(count_for: Callable[[int], Callable[[int], int]], budget: int, n_samples: int,
                       wordlen: int) -> list[int]:
    """``freq_words_extraction.py`` ``sys_kwext``: from ``budget // coded_wordlen`` words grow by
    ``budget // 32`` while the prompt is under the budget, step back once; each sample then drops
    ``budget // 32`` words while it overflows."""
    step = max(1, budget // 32)
    search = count_for(-1)
    n = budget // wordlen
    while search(n) < budget:
        n += step
    n -= step
    out = []
    for index in range(n_samples):
        count, m = count_for(index), n
        while count(m) > budget and m > step:
            m -= step
        out.append(m)
    return out
