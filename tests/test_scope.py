"""SCOPE (issue #16): similarity-threshold chunks, outliers merged, relevance-weighted budgets,
chunks their share covers kept verbatim, the rest rewritten keeping their keywords."""

import pytest

from lcbench.methods.prompt.scope import Scope, allocate, keywords, merge_outliers, threshold_chunks
from lcbench.methods.prompt.semantic import neighbour_similarity
from lcbench.methods.prompt.units import count_tokens, sentence_spans
from test_prompt_compression import compress, within
from test_prompt_methods import APPLES, SHIPS


def _parts(context, tok):
    sentences = sentence_spans(context)
    pieces = [context[s:e] for s, e in sentences]
    return sentences, [count_tokens(tok, p) for p in pieces], neighbour_similarity(pieces, "")


def test_chunks_follow_the_topics_and_outliers_join_their_closer_neighbour(tiny):
    tok = tiny[1]
    context = "".join(APPLES + SHIPS)
    sentences, sizes, similarity = _parts(context, tok)
    chunks = threshold_chunks(sentences, sizes, similarity, 0.1, 10_000)
    assert [c for c in chunks if 3 in c] == [[0, 1, 2, 3]] and [4, 5, 6, 7] in chunks  # cut between the topics
    assert threshold_chunks(sentences, sizes, similarity, 0.1, sizes[0] + sizes[1]) [0] == [0, 1]  # size cap
    merged = merge_outliers([[0, 1, 2, 3], [4], [5, 6, 7]], sizes, similarity, sizes[4] + 1)
    assert merged == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the lone ship sentence is closer to the ships


def test_budget_is_water_filled_by_length_and_relevance():
    assert allocate(10, [4, 4, 4], [1.0, 1.0, 1.0]) == [3, 3, 3]
    assert allocate(10, [4, 4, 4], [3.0, 1.0, 1.0]) == [4, 3, 3]  # the relevant chunk is capped at its size
    assert allocate(100, [4, 5], [1.0, 1.0]) == [4, 5]
    assert keywords(["apple apple orchard tree", "ship harbour ship"], 1) == [["apple"], ["ship"]]


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_the_budget_is_met(ratio, tiny):
    model, tok = tiny
    out, stats = compress("scope", ratio, "".join(APPLES + SHIPS) * 2, tok, model, min_chunk_tokens=8,
                          max_chunk_tokens=60)
    assert within(stats, ratio, above=Scope.tolerance), stats


def test_the_chunk_relevant_to_the_question_is_kept_and_the_other_rewritten_with_its_keywords(tiny, monkeypatch):
    model, tok = tiny
    prompts = []
    real = Scope.instruction
    monkeypatch.setattr(Scope, "instruction", lambda self, chunk, words: prompts.append(real(self, chunk, words))
                        or prompts[-1])
    context = "".join(APPLES + SHIPS)
    out, stats = compress("scope", 0.3, context, tok, model, questions=["Which ships pass the harbour lighthouse?"],
                          relevance_weight=4.0, min_chunk_tokens=8)
    assert "".join(SHIPS).strip() in out  # the relevant chunk's share covered it: kept as written
    assert stats["scope_rewritten"] == 1 and len(prompts) == 1  # the apples were rewritten, once
    assert "Keep these words:" in prompts[0] and "apple" in prompts[0].split("Keep these words:")[1]
