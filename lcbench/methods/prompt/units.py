"""Units of a context (sentences, phrases, chunks, compressor tokens) as character spans, and the
budgeted selection every prompt compressor ends with.

Spans *partition* the text (each unit carries the whitespace that follows it), so the compressed
context is the kept spans concatenated, in their original order: nothing is re-decoded, and the
text between kept words stays as the author wrote it. The budget is counted in the *target
model's* tokenizer (DESIGN.md: the achieved ratio of a text stage is counted there).
"""

from __future__ import annotations

import re
from typing import Sequence

Span = tuple[int, int]

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+|[。！？；]+\s*|\n\s*")
_PHRASE_END = re.compile(r"[,;:()\"]\s*|—\s*")
_WORD = re.compile(r"\S+\s*")


def _split(text: str, start: int, end: int, pattern: re.Pattern) -> list[Span]:
    spans, last = [], start
    for m in pattern.finditer(text, start, end):
        if m.end() > last:
            spans.append((last, m.end()))
            last = m.end()
    if last < end:
        spans.append((last, end))
    return spans


def sentence_spans(text: str) -> list[Span]:
    """Sentences (ending at . ! ? 。 ！ ？ ； or a line break), with their trailing whitespace."""
    return _split(text, 0, len(text), _SENTENCE_END)


def phrase_spans(text: str, max_words: int) -> list[Span]:
    """Phrases: sentence parts between punctuation, cut into runs of at most ``max_words`` words
    (a dependency-free stand-in for the noun phrases Selective Context takes from spaCy)."""
    out: list[Span] = []
    for s, e in sentence_spans(text):
        for ps, pe in _split(text, s, e, _PHRASE_END):
            words = _split(text, ps, pe, _WORD)
            for k in range(0, len(words), max_words):
                group = words[k: k + max_words]
                out.append((group[0][0], group[-1][1]))
    return out


def chunk_spans(text: str, spans: Sequence[Span], sizes: Sequence[int], chunk_size: int) -> list[Span]:
    """Consecutive ``spans`` (e.g. sentences) grouped into chunks of at least ``chunk_size`` units of
    ``sizes`` (tokens or words) each; the last chunk takes the remainder."""
    out: list[Span] = []
    start, acc = None, 0
    for (s, e), n in zip(spans, sizes):
        start = s if start is None else start
        acc += n
        if acc >= chunk_size:
            out.append((start, e))
            start, acc = None, 0
    if start is not None:
        out.append((start, spans[-1][1]))
    return out


def token_spans(offsets: Sequence[Span], length: int) -> list[Span]:
    """Partition a text of ``length`` characters by tokens' ``(start, end)`` offsets: token i spans
    from its start to the next token's start (so it carries the whitespace between them)."""
    starts = [s for s, _ in offsets]
    if not starts:
        return []
    starts[0] = 0
    ends = starts[1:] + [length]
    return [(s, max(s, e)) for s, e in zip(starts, ends)]


def owner_of(spans: Sequence[Span], inner: Sequence[Span]) -> list[int]:
    """For each span of ``inner``, the index of the ``spans`` unit its start falls in."""
    out, j = [], 0
    for s, _ in inner:
        while j + 1 < len(spans) and spans[j][1] <= s:
            j += 1
        out.append(j)
    return out


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` in ``tokenizer`` (no special tokens)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def render(text: str, spans: Sequence[Span], chosen: Sequence[int]) -> str:
    """The chosen units in the given order, concatenated."""
    return "".join(text[spans[i][0]: spans[i][1]] for i in chosen)


def select_within_budget(text: str, spans: Sequence[Span], scores: Sequence[float], tokenizer,
                         budget: int, keep_order: Sequence[int] | None = None) -> list[int]:
    """Indices of the units to keep: the highest-scoring ones that fit in ``budget`` target tokens
    (greedily, skipping a unit that does not fit and trying smaller ones after it). Units scored
    ``-inf`` are never kept. The result is in original order, or ranked by ``keep_order`` (unit
    indices, e.g. chunks by relevance) when given. The count of the joined text is checked and
    units are dropped (lowest score first) or added until it fits as tightly as the units allow."""
    n = len(spans)
    ranked = sorted((i for i in range(n) if scores[i] != float("-inf")), key=lambda i: -scores[i])
    pieces = [text[s:e] for s, e in spans]
    costs = [len(ids) for ids in tokenizer(pieces, add_special_tokens=False)["input_ids"]] if pieces else []
    position = {i: k for k, i in enumerate(keep_order)} if keep_order is not None else None

    def ordered(chosen: set[int]) -> list[int]:
        return sorted(chosen, key=(lambda i: (position.get(i, n), i)) if position else None)

    chosen: set[int] = set()
    room = budget
    for _ in range(4):
        for i in ranked:
            if i not in chosen and costs[i] <= room:
                chosen.add(i)
                room -= costs[i]
        actual = count_tokens(tokenizer, render(text, spans, ordered(chosen)))
        while actual > budget and chosen:
            excess = actual - budget
            for i in reversed(ranked):  # drop the lowest-scored kept units covering the excess
                if i in chosen:
                    chosen.discard(i)
                    excess -= max(costs[i], 1)
                    if excess <= 0:
                        break
            actual = count_tokens(tokenizer, render(text, spans, ordered(chosen)))
        room = budget - actual
        if room <= 0 or not any(i not in chosen and costs[i] <= room for i in ranked):
            break
    return ordered(chosen)
