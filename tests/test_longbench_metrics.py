"""LongBench scorers pinned on hand-checked inputs, including the upstream quirks.

The expected values below were worked out by hand from LongBench's metrics.py and the rouge 1.0.1
source. The same scorers were also checked against the upstream libraries (rouge 1.0.1,
fuzzywuzzy 0.18 with and without python-Levenshtein) on all 237 MiniLongBench example predictions
and 21,000 random pairs, and agreed everywhere; those libraries are not lcbench dependencies.
"""

from __future__ import annotations

import pytest

from lcbench.tasks.longbench import metrics as M
from lcbench.tasks.longbench.metrics import ScoreOptions
from lcbench.tasks.longbench.rouge_l import rouge_l, sentences

FIXED = ScoreOptions(fixed=True)


def f_lcs(p: float, r: float) -> float:
    """rouge 1.0.1's F formula, with its 1e-8."""
    return 2.0 * ((p * r) / (p + r + 1e-8))


def test_normalizers():
    assert M.normalize_answer("The Cat, a dog!  An  apple.") == "cat dog apple"
    assert M.normalize_answer("Theatre") == "theatre"  # articles only as whole words
    assert M.normalize_zh_answer("北京， 是 首都！") == "北京是首都"
    assert M.normalize_zh_answer("A《B》") == "a《b"  # upstream's set has 》 but not 《


def test_qa_f1():
    # "cat sat on mat" vs "cat on mat": 3 common, P=3/4, R=1
    assert M.qa_f1_score("The cat sat on the mat.", "a cat on mat") == pytest.approx(2 * 0.75 / 1.75, abs=1e-15)
    assert M.qa_f1_score("dog", "cat") == 0.0
    assert M.qa_f1_score("", "cat") == 0.0


def test_qa_f1_zh():
    # jieba: 北京/是/中国/的/首都 vs 中国/的/首都 → 3 common, P=3/5, R=1
    assert M.qa_f1_zh_score("北京是中国的首都", "中国的首都") == pytest.approx(2 * 0.6 / 1.6, abs=1e-15)
    # jieba keeps 首都北京 as one word: nothing in common
    assert M.qa_f1_zh_score("北京是中国的首都", "首都北京") == 0.0


def test_rouge_sentences_and_summary_level_lcs():
    assert sentences(" a  b. .c\td..") == ["a b", "", "c d"]
    # hyp sentences "the cat sat" / "the dog ran", ref "the cat ran": LCS word sets {the, cat} and
    # {the, ran}; union 3 of 3 distinct reference words, 3 of 5 distinct hypothesis words
    assert M.rouge_score("the cat sat. the dog ran", "the cat ran") == f_lcs(3 / 5, 1.0)
    # distinct words, not lengths: "a a" vs "a a" is not 1.0
    assert M.rouge_score("a a", "a a") == f_lcs(1.0, 1.0)
    assert M.rouge_score("A cat", "a cat") == f_lcs(0.5, 0.5)  # no lowercasing


def test_rouge_zero_on_empty_text():
    assert M.rouge_score("", "the cat") == 0.0
    assert M.rouge_score("...", "the cat") == 0.0  # no sentence → ValueError upstream → 0
    assert M.rouge_score("the cat", "") == 0.0
    assert rouge_l("", "x").f is None


def _long_pair(k: int) -> tuple[str, str]:
    """hyp = "zz w1 … wk", ref = "zz": the package's LCS backtrack makes k + 2 recursive calls."""
    return "zz " + " ".join(f"w{i}" for i in range(1, k + 1)), "zz"


@pytest.mark.parametrize("k,quirk", [(989, False), (990, True)])
def test_rouge_recursion_quirk(k, quirk):
    hyp, ref = _long_pair(k)
    true_f = f_lcs(1 / (k + 1), 1.0)
    assert rouge_l(hyp, ref).max_recursion == k + 2
    # `python eval.py` has 9 frames below the first _recon call; the limit is 1000 frames
    assert M.rouge_score(hyp, ref) == (0.0 if quirk else true_f)
    assert M.rouge_score(hyp, ref, FIXED) == true_f


def test_rouge_zh_recursion_quirk_is_one_frame_earlier():
    # rouge_zh_score adds one frame, so the threshold is one call lower than rouge_score's
    hyp, ref = _long_pair(989)
    zh_hyp, zh_ref = hyp.replace("zz", "中"), "中"
    assert M.rouge_zh_score(zh_hyp, zh_ref) == 0.0
    assert M.rouge_zh_score(zh_hyp, zh_ref, FIXED) == f_lcs(1 / 990, 1.0)


def test_rouge_zh_uses_jieba_words():
    # 今天天气/很/好 vs 今天天气/不错: one common word of 3 and 2
    assert M.rouge_zh_score("今天天气很好", "今天天气不错") == f_lcs(1 / 3, 1 / 2)


def test_classification_removal_loop_quirk():
    classes = ["Other", "location", "Other location", "City"]
    # matches: Other, location, Other location. Upstream removes "Other", which makes the loop
    # skip "location"; the gold label stays with one wrong companion → 1/2
    assert M.classification_score("Other location", "Other location", all_classes=classes) == 0.5
    assert M.classification_score("Other location", "Other location", all_classes=classes, opts=FIXED) == 1.0
    # four classes named, none inside the gold "City" → 1/4
    assert M.classification_score("City or Other location", "City", all_classes=classes) == 0.25
    assert M.classification_score("City", "City", all_classes=classes) == 1.0
    assert M.classification_score("nothing", "City", all_classes=classes) == 0.0


def test_retrieval_and_count():
    assert M.retrieval_score("Paragraph 3, or maybe paragraph 12 or 3", "Paragraph 3") == 2 / 3
    assert M.retrieval_score("I do not know", "Paragraph 3") == 0.0
    assert M.retrieval_zh_score("答案是段落5和段落15", "段落5") == 0.5
    assert M.retrieval_zh_score("段落5", "段落5") == 1.0
    assert M.count_score("There are 7 unique paragraphs out of 10", 7) == 0.5
    assert M.count_score("seven", "7") == 0.0


def test_code_sim_first_clean_line_and_backends():
    pred = "\n```python\n# the next line\nx = foo(1)\ny = 2\n"
    assert M.code_sim_score(pred, "x = foo(2)") == 0.9  # 2*9/20
    assert M.code_sim_score("# only comments\n// and more", "x") == 0.0
    assert M.code_sim_score("", "") == 1.0  # fuzz.ratio: equal strings → 100 before the empty check
    # the backends differ: InDel (python-Levenshtein) finds the LCS "ab" → 2*2/6; difflib's greedy
    # matcher takes the first "b" and then nothing else → 2*1/6
    assert M.code_sim_score("bab", "acb") == 0.67
    assert M.code_sim_score("bab", "acb", ScoreOptions(code_sim_backend="difflib")) == 0.33
    assert M.fuzz_ratio("abc", "abd") == 67


def test_score_prediction_max_over_answers_and_first_line():
    assert M.score_prediction("qa_f1_score", "Dover", ["Calais", "Dover"], None) == 1.0
    pred = "\n\nLocation\nCity"
    classes = ["City", "Location"]
    assert M.score_prediction("classification_score", pred, ["City"], classes, take_first_line=True) == 0.0
    assert M.score_prediction("classification_score", pred, ["City"], classes) == 0.5
