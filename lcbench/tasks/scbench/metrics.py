"""SCBench's scorers (microsoft/MInference@fb56c91 ``scbench/compute_scores.py``: ``get_score_one``
through ``Multiturnbench_to_Infinitebench``; spec §4.1). Each returns upstream's 0–1 value for one
prediction and its label, with the label exactly as ``eval_utils.get_ground_truth`` builds it.

Upstream quirk kept: the iterating scorers loop ``for gt in label``; a plain-string label
(many_shot, qa_chn, and vt if its answer is a string) is iterated **character by character**.
:func:`fixed_label` wraps such a label in a list — the fix lcbench reports next to the upstream
number. ``rougeLsum`` is computed with ``rouge_score`` directly (``evaluate.load("rouge")`` fetches
its script from the hub; it uses ``RougeScorer(use_stemmer=False)`` and the per-example F).
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from typing import Any

_CN_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_ZH_PUNCT = frozenset(string.punctuation + _CN_PUNCTUATION)


def normalize_zh_answer(text: str) -> str:
    """Lower-case, drop English and Chinese punctuation and all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCT).split())


def f1(prediction: list[str], reference: list[str]) -> float:
    common = Counter(prediction) & Counter(reference)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def first_int_match(prediction: str) -> str:
    """The first run of digits in the prediction ('' if none)."""
    return next((item for item in re.split("[^0-9]", prediction) if item != ""), "")


def kv_retrieval(pred: str, label: Any) -> float:
    return float(label in pred)


def string_match_all(pred: str, label: Any) -> float:
    return round(sum(1.0 if r.lower() in pred.lower() else 0.0 for r in label) / len(label), 2)


def longdialogue_qa_eng(pred: str, label: Any) -> float:
    pred = pred.strip().upper()
    return float(any(item.upper() in pred for item in label))


def longbook_qa_chn(pred: str, label: Any) -> float:
    """Character-level F1 after ``normalize_zh_answer``, the best over the label's items."""
    norm = list(normalize_zh_answer(pred))
    return max([f1(norm, list(normalize_zh_answer(gt))) for gt in label] + [0.0])


def longbook_choice_eng(pred: str, label: Any) -> float:
    pred = pred.strip()
    if pred == "":
        return 0.0
    if pred[0] in "ABCD":
        return float(pred[0] in label)
    if pred in label:
        return 1.0
    for ch in ["\n", '"', "'", ".", ",", "?", "!", "{", "}"]:
        pred = pred.replace(ch, " ")
    while "  " in pred:
        pred = pred.replace("  ", " ")
    for prefix in ["answer is:", "answer:", "answer is", "option is"]:
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return 0.0
        after = pred[idx + len(prefix) + 1:]
        return float(any(after.startswith(s) for s in label))
    for word in pred.split():
        if word in "ABCD":
            return float(word in label)
    return 0.0


def math_find(pred: str, label: Any) -> float:
    if isinstance(label, list):
        label = label[0]
    first = re.search(r"\d+\.\d+|\d+", pred)
    if first is None:
        return 0.0
    if isinstance(label, float):
        return float(float(first.group(0).strip()) == label)
    return float(int(float(first.group(0).strip())) == label)


def passkey(pred: str, label: Any) -> float:
    if isinstance(label, list):
        label = label[0]
    return float(label == first_int_match(pred))


@functools.lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=False)


def rouge_lsum(pred: str, label: Any) -> float:
    return _rouge().score(label, pred)["rougeLsum"].fmeasure


SCORERS = {"kv_retrieval": kv_retrieval, "string_match_all": string_match_all,
           "longdialogue_qa_eng": longdialogue_qa_eng, "longbook_qa_chn": longbook_qa_chn,
           "longbook_choice_eng": longbook_choice_eng, "math_find": math_find, "passkey": passkey,
           "rouge_lsum": rouge_lsum}
ITERATING = frozenset({"string_match_all", "longdialogue_qa_eng", "longbook_qa_chn"})


def fixed_label(metric: str, label: Any) -> Any:
    """The label the scorer was meant to see: a string wrapped in a list for the iterating scorers;
    for passkey the label as a string (an int label can never equal the matched digits)."""
    if metric in ITERATING and isinstance(label, str):
        return [label]
    if metric == "passkey" and not isinstance(label, (str, list)):
        return str(label)
    return label


def has_quirk(metric: str, label: Any) -> bool:
    """Whether upstream's scorer mis-reads this label (so ``score_fixed`` may differ)."""
    return fixed_label(metric, label) is not label
