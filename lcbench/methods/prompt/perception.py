"""Perception Compressor: guiding-question retrieval, dual-slope ratios, semi-guided iterative
token compression (built on lcbench's LLMLingua pieces).

Tang et al., "Perception Compressor: A Training-Free Prompt Compression Framework in Long Context
Scenarios", Findings of NAACL 2025 (arXiv:2409.19272); read against the official implementation
github.com/Twilightaaa/PerceptionCompressor at commit 85438b6342e1e52252846eeabe37479e282ee8b8
(``PerceptionCompressor.py``):

1. *Perception retriever*: guiding questions for the question (the paper asks an LLM "Please
   provide n most helpful guiding questions to address the original question"; upstream reads them
   from a file made offline — here the compressor LM writes ``guiding_questions`` of them, greedy,
   one a line) plus the question itself, each weighted by its cosine similarity to the question
   (upstream: mean-pooled BERT embeddings; here TF-IDF vectors, or a sentence-transformers
   ``embedding_model``). A chunk's score is the weighted sum of the perplexities of
   ``"Question: {q} We can get the answer to this question in the given documents."`` after the
   chunk (lower is more relevant). Chunks (whole sentences, about ``chunk_tokens`` compressor tokens)
   are kept in rank order until they pass ``coarse_factor`` × the budget, and reordered from the
   most to the least relevant (``reorder=sort``, upstream's choice; ``original`` keeps text order).
2. *Dual-slope ratio allocator*: the kept text is cut into segments of ``segment_size`` tokens; the
   keep rate falls linearly over the segments by ``k1`` either side of the rate that meets the
   budget, and the open-book share rises linearly by ``k2`` either side of ``tau_o``
   (upstream's ``get_dynamic_compress_ratio`` for both, with opposite signs).
3. *Semi-guided iterative compression*: in each segment, conditioned on what was kept so far (as
   LLMLingua's iterative pass), the open-book share of the kept tokens is chosen by contrastive
   loss (``loss − loss given the question before the kept text``), the rest by plain loss among
   the remaining tokens; only kept tokens join the conditioning. The result is fitted to the
   budget in the target tokenizer.

It needs the question, so it runs only with ``--query-aware``.
"""

from __future__ import annotations

import math

import torch

from ...errors import UserError
from ...params import Param
from .base import PromptCompressor
from .dspc import tfidf_similarity
from .extractive import embedding_scores
from .llmlingua import Tokens, fine_rate, finish
from .lm import CompressorLM, load_compressor
from .selective_context import COMPRESSOR, WINDOW

GUIDING_PROMPT = "Please provide {n} most helpful guiding questions to address the original question: {question}\n1."
RESTRICT = " We can get the answer to this question in the given documents."


def linear_deltas(n: int, spread: float) -> list[float]:
    """``+spread`` for the first of ``n`` segments falling linearly to ``−spread`` for the last."""
    return [spread * (1 - 2 * i / (n - 1)) if n > 1 else 0.0 for i in range(n)]


def guiding_questions(lm: CompressorLM, question: str, n: int, max_tokens: int) -> list[str]:
    """Up to ``n`` guiding questions written by the compressor (one per numbered line)."""
    if n <= 0:
        return []
    text = lm.generate(GUIDING_PROMPT.format(n=n, question=question.strip()), max_tokens)
    lines = [line.strip().lstrip("0123456789.)-: ").strip() for line in text.split("\n")]
    return [line for line in lines if line][:n]


def semi_guided_scores(lm: CompressorLM, ids: list[int], order: list[int], rates: list[float],
                       open_book: list[float], segment_size: int, question: list[int]):
    """Per-token scores (−inf outside ``order``) and kept flags of the semi-guided pass; segment
    ``k`` keeps ``rates[k]`` of its tokens, ``open_book[k]`` of those by contrastive loss."""
    scores = [float("-inf")] * len(ids)
    kept = [False] * len(ids)
    plain, guided = lm.session(), lm.session(question)
    for k, start in enumerate(range(0, len(order), segment_size)):
        segment = order[start: start + segment_size]
        seg_ids = [ids[t] for t in segment]
        loss = torch.nan_to_num(plain.score(seg_ids), posinf=1e4)
        contrast = torch.nan_to_num(loss - guided.score(seg_ids), nan=0.0)
        n_keep = min(len(segment), round(rates[k] * len(segment)))
        n_open = min(n_keep, round(n_keep * open_book[k]))
        top = set(contrast.topk(n_open).indices.tolist()) if n_open else set()
        rest = [j for j in loss.argsort(descending=True).tolist() if j not in top]
        top |= set(rest[: n_keep - n_open])
        for j, t in enumerate(segment):
            scores[t], kept[t] = float(contrast[j] if j in top else loss[j]), j in top
        keep_ids = [ids[t] for j, t in enumerate(segment) if j in top]
        plain.commit(keep_ids)
        guided.commit(keep_ids)
    return scores, kept


class Perception(PromptCompressor):
    name = "perception"
    family = "prompt_compression"
    paper = ("Tang et al., Perception Compressor: A Training-Free Prompt Compression Framework in Long Context "
             "Scenarios, Findings of NAACL 2025 (arXiv:2409.19272)")
    summary = ("guiding-question retrieval and reordering, dual-slope keep/open-book ratios, semi-guided iterative "
               "token compression (needs --query-aware)")
    defaults = {"compressor": "target", "window": 4096, "chunk_tokens": 128, "coarse_factor": 1.5,
                "segment_size": 100, "k1": 0.2, "tau_o": 0.5, "k2": 0.2, "guiding_questions": 3,
                "guide_tokens": 64, "embedding_model": "", "reorder": "sort"}
    params = (
        COMPRESSOR, WINDOW,
        Param("chunk_tokens", int, None, "compressor tokens per retrieved chunk (whole sentences)", min=1),
        Param("coarse_factor", float, None, "the retriever keeps chunks up to this many times the final budget", min=1),
        Param("segment_size", int, None, "tokens per segment of the semi-guided pass", min=1),
        Param("k1", float, None, "keep-rate slope: first segment +k1, last −k1", min=0, max=1),
        Param("tau_o", float, None, "mean open-book share (kept by contrastive loss)", min=0, max=1),
        Param("k2", float, None, "open-book slope: first segment −k2, last +k2", min=0, max=1),
        Param("guiding_questions", int, None, "guiding questions the compressor writes (0: the question alone)", min=0),
        Param("guide_tokens", int, None, "most tokens generated for the guiding questions", min=1),
        Param("embedding_model", str, None, "sentence-transformers model weighting the guiding questions; empty: TF-IDF"),
        Param("reorder", str, None, "order of kept chunks: sort (most relevant first) or original", choices=("sort", "original")),
    )

    def compress(self, text, budget):
        if not text.questions:
            raise UserError(
                "perception is question-aware: it retrieves and compresses by the question, which the text stage sees "
                "only with --query-aware. Fix: add --query-aware, or use llmlingua (question-agnostic).")
        a = self.args
        lm = load_compressor(a["compressor"], text, a["window"])
        question = "\n".join(text.questions)
        tokens = Tokens(lm, text.context, a["chunk_tokens"])
        ranked = self.retrieve(lm, tokens, question)
        kept, total, limit = [], 0, budget * a["coarse_factor"]
        for c in ranked:  # upstream's budget_control: whole chunks in rank order past the budget
            kept.append(c)
            total += len(tokens.chunk_tokens(c))
            if total >= limit:
                break
        chunk_order = kept if a["reorder"] == "sort" else sorted(kept)
        order = [t for c in chunk_order for t in tokens.chunk_tokens(c)]
        base = fine_rate(text, tokens, sorted(order), budget)
        n_segments = max(1, math.ceil(len(order) / a["segment_size"]))
        rates = [min(1.0, max(0.0, base + d)) for d in linear_deltas(n_segments, a["k1"])]
        open_book = [min(1.0, max(0.0, a["tau_o"] - d)) for d in linear_deltas(n_segments, a["k2"])]
        q_ids, _ = lm.encode(question)
        scores, keep = semi_guided_scores(lm, tokens.ids, order, rates, open_book, a["segment_size"], q_ids)
        return finish(text, tokens, scores, keep, budget, keep_order=order if a["reorder"] == "sort" else None)

    def retrieve(self, lm: CompressorLM, tokens: Tokens, question: str) -> list[int]:
        """Chunk indices from the most to the least relevant (weighted guided perplexity)."""
        a = self.args
        queries = guiding_questions(lm, question, a["guiding_questions"], a["guide_tokens"]) + [question.strip()]
        if a["embedding_model"]:
            weights = embedding_scores(a["embedding_model"], queries, question)
        else:
            weights = tfidf_similarity(queries, question)
        conditions = [lm.encode("\n\nQuestion: " + q + RESTRICT)[0] for q in queries]
        cap = max(1, lm.window // 2)
        relevance = []
        for c in range(len(tokens.chunks)):
            session = lm.session([tokens.ids[t] for t in tokens.chunk_tokens(c)][-cap:])  # the chunk read once
            relevance.append(sum(w * float(session.score(cond).mean()) for w, cond in zip(weights, conditions)))
        return sorted(range(len(tokens.chunks)), key=lambda c: relevance[c])
