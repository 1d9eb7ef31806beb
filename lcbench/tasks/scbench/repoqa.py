"""RepoQA scoring as SCBench runs it (microsoft/MInference@fb56c91 ``scbench/repo_qa_utils.py``, after
evalplus/repoqa): the answer's first fenced code block (its first function when tree-sitter parses
it) is compared by BLEU (``method4`` smoothing, whitespace tokens) with every gold function of the
same repository; the turn is correct when the best match is the gold function and its similarity
is at least 0.8 (pass@1 over turns).

tree-sitter (``tree_sitter==0.21.3`` + ``tree_sitter_languages``, as upstream's requirements) is
optional: without it the whole first code block is compared, which can only lower the similarity
of answers that wrap the function in other code. The record says which path was taken.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from .protocol import PROTOCOL

_REPOQA = PROTOCOL["repoqa"]
_BLOCK = re.compile(_REPOQA["code_block_regex"], re.DOTALL | re.MULTILINE)


@functools.lru_cache(maxsize=None)
def _function_query(lang: str):
    """(parser, query) for ``lang`` from tree_sitter_languages, or None when unavailable."""
    try:
        import warnings

        from tree_sitter_languages import get_language, get_parser

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return get_parser(lang), get_language(lang).query(_REPOQA["function_query"][lang])
    except Exception:  # not installed, unknown language, incompatible tree_sitter
        return None


def tree_sitter_available(lang: str = "python") -> bool:
    return _function_query(lang) is not None


def sanitize_output(output: str, lang: str) -> str:
    """Upstream ``sanitize_output``: the first function of the first parseable code block, else the
    first code block, else the stripped output."""
    output = output.strip()
    blocks = _BLOCK.findall(output)
    if not blocks:
        return output
    parsed = _function_query(lang)
    if parsed is not None:
        parser, query = parsed
        for block in blocks:
            data = bytes(block, "utf8")
            try:
                captures = query.captures(parser.parse(data).root_node)
            except Exception:  # upstream skips blocks tree-sitter cannot handle
                continue
            for node, _ in captures:
                return data[node.start_byte:node.end_byte].decode("utf8")
    return blocks[0]


def similarity(candidate: str, reference: str) -> float:
    """``sentence_bleu([ref.split()], cand.split(), smoothing_function=method4)`` on ``\\s+`` tokens."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    cand = re.split(r"\s+", candidate.strip())
    ref = re.split(r"\s+", reference.strip())
    return float(sentence_bleu([ref], cand, smoothing_function=SmoothingFunction().method4))


def evaluate(output: str, gold_name: str, needles: list[dict[str, Any]], lang: str) -> tuple[bool, str | None, float]:
    """(correct at the 0.8 threshold, best-matching function name, its similarity)."""
    candidate = sanitize_output(output, lang)
    best_name, best = None, 0.0
    for needle in needles:
        sim = similarity(candidate, needle["needle"])
        if sim > best:
            best, best_name = sim, needle["name"]
    return best_name == gold_name and best >= _REPOQA["threshold"], best_name, best
