"""RULER's post-processing and metrics (NVIDIA/RULER@c3f5e3b ``scripts/eval/evaluate.py`` and
``scripts/eval/synthetic/constants.py``; shared/specs/suites.md §2.5).

Per sample the score is on RULER's 0–100 scale; RULER's reported number per task is the mean of
these, rounded to two decimals.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(prediction: str) -> str:
    """``strip()``, every control character (``[\\x00-\\x1f]``) to a newline, ``strip()`` again."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """100 × the fraction of references found (case-insensitive substring) in the prediction."""
    pred = prediction.lower()
    return 100.0 * sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """100 if any reference is found (case-insensitive substring) in the prediction, else 0."""
    pred = prediction.lower()
    return 100.0 * max(r.lower() in pred for r in references)


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}
