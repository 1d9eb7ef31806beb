"""LongBench's scorers (THUDM/LongBench@2e00731 ``LongBench/metrics.py``, ``eval.py``), with their
normalizations, reproduced exactly; MiniLongBench uses the same file.

Upstream quirks are the default (``fixed=False``) and each has a named fix (``fixed=True``):

- ``classification_score`` removes items from the list it iterates over, so a class right after a
  removed one escapes removal. Fix: drop every class that is a strict substring of the gold label.
- ``rouge_score`` returns 0.0 on *any* exception; besides the legitimate empty-text ``ValueError``,
  the ``rouge`` package's recursive LCS reconstruction raises ``RecursionError`` on long sentence
  pairs (Chinese summaries have no ``"."``, so a whole vcsum answer is one sentence). Fix: score
  those pairs with their true ROUGE-L.

``code_sim_score`` uses ``fuzzywuzzy.fuzz.ratio``, whose value depends on its backend:
``python-Levenshtein`` when installed (InDel ratio; reproduces MiniLongBench's reference scores)
or ``difflib.SequenceMatcher``. Both are offered (``code_sim_backend``), Levenshtein by default.
"""

from __future__ import annotations

import difflib
import functools
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from .protocol import longbench_protocol
from .rouge_l import rouge_l

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_EN_PUNCT = frozenset(string.punctuation)


@dataclass(frozen=True)
class ScoreOptions:
    """How to score: upstream quirks (default) or their fixes, and the code_sim backend."""

    fixed: bool = False
    code_sim_backend: str = "levenshtein"  # or "difflib"


def normalize_answer(s: str) -> str:
    """Lower, drop ASCII punctuation, replace the articles a/an/the by a space, collapse spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _EN_PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


@functools.lru_cache(maxsize=1)
def _zh_punct() -> frozenset[str]:
    return frozenset(string.punctuation + longbench_protocol()["zh_punctuation"])


def normalize_zh_answer(s: str) -> str:
    """Lower, drop ASCII and Chinese punctuation, remove all whitespace."""
    punct = _zh_punct()
    return "".join("".join(ch for ch in s.lower() if ch not in punct).split())


def f1_tokens(prediction: list[str], ground_truth: list[str]) -> float:
    """Token-multiset F1; 0 when nothing overlaps."""
    same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if same == 0:
        return 0.0
    precision = 1.0 * same / len(prediction)
    recall = 1.0 * same / len(ground_truth)
    return (2 * precision * recall) / (precision + recall)


def _jieba_words(text: str) -> list[str]:
    import jieba

    return list(jieba.cut(text, cut_all=False))


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    return f1_tokens(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """jieba words, each normalized, empty ones dropped, then F1."""
    pred = [t for t in (normalize_zh_answer(w) for w in _jieba_words(prediction)) if t]
    gold = [t for t in (normalize_zh_answer(w) for w in _jieba_words(ground_truth)) if t]
    return f1_tokens(pred, gold)


def _rouge(prediction: str, ground_truth: str, metric: str, opts: ScoreOptions) -> float:
    result = rouge_l(prediction, ground_truth)
    if result.f is None:  # the package's ValueError on a text with no sentence → 0.0
        return 0.0
    if not opts.fixed:
        limits = longbench_protocol()["rouge"]
        if limits["frames_before_lcs"][metric] + result.max_recursion > limits["recursion_limit"]:
            return 0.0  # RecursionError inside the package → LongBench's bare except → 0.0
    return result.f


def rouge_score(prediction: str, ground_truth: str, opts: ScoreOptions = ScoreOptions(), **_) -> float:
    return _rouge(prediction, ground_truth, "rouge_score", opts)


def rouge_zh_score(prediction: str, ground_truth: str, opts: ScoreOptions = ScoreOptions(), **_) -> float:
    """Both texts become jieba words joined by spaces, then :func:`rouge_score`."""
    return _rouge(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(ground_truth)),
                  "rouge_zh_score", opts)


def classification_score(prediction: str, ground_truth: str, all_classes: list[str] | None = None,
                         opts: ScoreOptions = ScoreOptions(), **_) -> float:
    """1/len(matches) if the gold class is among the classes named in the prediction."""
    matches = [c for c in (all_classes or []) if c in prediction]
    if opts.fixed:
        matches = [c for c in matches if not (c in ground_truth and c != ground_truth)]
    else:
        # upstream removes from the list it is iterating over, which skips the next element
        for term in matches:
            if term in ground_truth and term != ground_truth:
                matches.remove(term)
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _share_of(numbers: list[str], target: str) -> float:
    return 0.0 if not numbers else sum(1 for n in numbers if n == target) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
    """Share of the numbers in the prediction equal to the gold paragraph id."""
    gold = re.findall(r"Paragraph (\d+)", ground_truth)[0]
    return _share_of(re.findall(r"\d+", prediction), gold)


def retrieval_zh_score(prediction: str, ground_truth: str, **_) -> float:
    gold = re.findall(r"段落(\d+)", ground_truth)[0]
    return _share_of(re.findall(r"\d+", prediction), gold)


def count_score(prediction: str, ground_truth: str, **_) -> float:
    return _share_of(re.findall(r"\d+", prediction), str(ground_truth))


def fuzz_ratio(a: str, b: str, backend: str = "levenshtein") -> int:
    """``fuzzywuzzy.fuzz.ratio`` 0.18: 100 if equal, 0 if either is empty, else
    ``int(round(100 * ratio))`` with the InDel ratio of python-Levenshtein (computed here with
    rapidfuzz, which python-Levenshtein wraps) or difflib's ``SequenceMatcher(None, a, b)``."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    if backend == "levenshtein":
        from rapidfuzz.distance import Indel

        ratio = Indel.normalized_similarity(a, b)
    elif backend == "difflib":
        ratio = difflib.SequenceMatcher(None, a, b).ratio()
    else:
        raise ValueError(f"unknown code_sim backend {backend!r}")
    return int(round(100 * ratio))


def code_sim_score(prediction: str, ground_truth: str, opts: ScoreOptions = ScoreOptions(), **_) -> float:
    """The first line without a backtick, ``#`` or ``//`` (after leading newlines), compared with
    the gold line by :func:`fuzz_ratio` / 100."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz_ratio(line, ground_truth, opts.code_sim_backend) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1_score": qa_f1_score,
    "qa_f1_zh_score": qa_f1_zh_score,
    "rouge_score": rouge_score,
    "rouge_zh_score": rouge_zh_score,
    "classification_score": classification_score,
    "retrieval_score": retrieval_score,
    "retrieval_zh_score": retrieval_zh_score,
    "count_score": count_score,
    "code_sim_score": code_sim_score,
}

# metrics whose upstream behaviour differs from the fixed one on some inputs
QUIRKY = frozenset({"rouge_score", "rouge_zh_score", "classification_score"})


def first_line(prediction: str) -> str:
    """``eval.py`` for trec/triviaqa/samsum/lsht: ``pred.lstrip('\\n').split('\\n')[0]``."""
    return prediction.lstrip("\n").split("\n")[0]


def score_prediction(metric: str, prediction: str, answers: list[str], all_classes: list[str] | None,
                     opts: ScoreOptions = ScoreOptions(), take_first_line: bool = False) -> float:
    """One row's score in [0, 1]: the best metric value over the gold answers (``eval.py scorer``)."""
    if take_first_line:
        prediction = first_line(prediction)
    fn = METRICS[metric]
    best = 0.0
    for gold in answers:
        best = max(best, fn(prediction, gold, all_classes=all_classes, opts=opts))
    return best
