"""ROUGE-L as LongBench computes it: ``Rouge().get_scores([hyp], [ref], avg=True)["rouge-l"]["f"]``
of the PyPI package ``rouge`` 1.0.1 (pltrdy), written anew here so lcbench does not depend on it.

That package splits each text into sentences on ``"."`` (empty pieces dropped, whitespace runs
collapsed), words on ``" "``, and computes the *summary-level* ROUGE-L with ``exclusive=True``:
the LCS of every (reference sentence, hypothesis sentence) pair is reconstructed, the **set** of
their words is united over all pairs, and P/R divide that union's size by the number of
**distinct** words of the hypothesis/reference; ``F = 2PR / (P + R + 1e-8)``. No lowercasing or
stemming. Which LCS is reconstructed matters (it fixes the word set); the backtrack here breaks
ties as the package does (move up only when the cell above is strictly larger).

The package reconstructs the LCS recursively, one Python frame per backtrack step, so a long
sentence pair raises ``RecursionError`` (and LongBench then scores 0). :func:`rouge_l` reports
the deepest reconstruction so callers can reproduce that quirk exactly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RougeL:
    """``f`` (None when the package raises ``ValueError``: a text with no sentence) and the most
    recursive calls the package's LCS reconstruction would make for any sentence pair."""

    f: float | None
    max_recursion: int


def sentences(text: str) -> list[str]:
    """``[" ".join(s.split()) for s in text.split(".") if len(s) > 0]`` (rouge 1.0.1)."""
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _lcs_table(x: list[str], y: list[str]) -> list[list[int]]:
    table = [[0] * (len(y) + 1)]
    for i in range(1, len(x) + 1):
        prev, row, xi = table[i - 1], [0], x[i - 1]
        for j in range(1, len(y) + 1):
            row.append(prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1]))
        table.append(row)
    return table


def lcs_words(x: list[str], y: list[str]) -> tuple[set[str], int]:
    """The words of the LCS of ``x`` (reference) and ``y`` (hypothesis) as the package
    reconstructs it, and the number of recursive calls that reconstruction makes."""
    table = _lcs_table(x, y)
    i, j, calls, words = len(x), len(y), 1, set()
    while i > 0 and j > 0:
        calls += 1
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words, calls


def rouge_l(hypothesis: str, reference: str) -> RougeL:
    """Summary-level ROUGE-L F of rouge 1.0.1 for one hypothesis/reference pair."""
    hyp, ref = sentences(hypothesis), sentences(reference)
    if not hyp or not ref:
        return RougeL(None, 0)
    hyp_words = [s.split(" ") for s in hyp]
    ref_words = [s.split(" ") for s in ref]
    n = len({w for s in hyp_words for w in s})
    m = len({w for s in ref_words for w in s})
    union: set[str] = set()
    deepest = 0
    for r in ref_words:
        for h in hyp_words:
            words, calls = lcs_words(r, h)
            union |= words
            deepest = max(deepest, calls)
    llcs = len(union)
    recall, precision = llcs / m, llcs / n
    return RougeL(2.0 * ((precision * recall) / (precision + recall + 1e-8)), deepest)
