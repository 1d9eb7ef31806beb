"""LLMLingua and LongLLMLingua: coarse-to-fine prompt compression with a small causal LM.

LLMLingua (Jiang et al., EMNLP 2023, arXiv:2310.05736):
1. *Budget controller* (coarse): the context is cut into chunks of about ``chunk_tokens``
   compressor tokens (whole sentences); chunks are ranked by perplexity under the compressor and
   the most perplexing kept until ``coarse_factor`` × the final budget.
2. *Iterative token-level compression* (fine): the kept text is scored in segments of
   ``segment_size`` tokens, each token's surprisal conditioned on the *already compressed* text
   before it (so what was dropped no longer explains what follows); in each segment the most
   surprising tokens are kept at the rate that meets the budget, and only they are appended to the
   conditioning state.
3. The result is fitted to the budget in the target model's tokenizer (ties broken by surprisal).
The paper's distribution alignment (instruction-tuning the small LM on the target's outputs) is
not done: the compressor is used as given (by default the target model itself, which needs none).

LongLLMLingua (Jiang et al., ACL 2024, arXiv:2310.06839) makes both steps question-aware:
chunks are ranked by how well they predict the question (mean surprisal of the question followed
by ``question_suffix``, conditioned on the chunk; lower is better); tokens by *contrastive*
surprisal ``s(x_i | x_<i) − s(x_i | question, x_<i)`` (how much the question explains them);
better-ranked chunks get a larger keep rate (``dynamic_delta`` either side of the mean, the
paper's dynamic compression ratio); ``reorder=sort`` puts chunks in rank order (the paper's
document reordering). Its subsequence recovery (a post-processing of the *answer*) does not apply
to a text stage. It needs the question, so it runs only with ``--query-aware``.
"""

from __future__ import annotations

import math

import torch

from ...errors import UserError
from ...params import Param
from .base import PromptCompressor
from .lm import CompressorLM, load_compressor
from .selective_context import COMPRESSOR, WINDOW
from .units import chunk_spans, count_tokens, owner_of, render, select_within_budget, sentence_spans, token_spans

KEPT_FIRST = 1e6  # added to the scores of tokens the iterative pass kept, so the final fit keeps them first


class Tokens:
    """The context as compressor tokens, with the sentence chunks they belong to."""

    def __init__(self, lm: CompressorLM, context: str, chunk_tokens: int):
        self.ids, offsets = lm.encode(context)
        self.spans = token_spans(offsets, len(context))
        sentences = sentence_spans(context)
        per_sentence = [0] * len(sentences)
        for s in owner_of(sentences, self.spans):
            per_sentence[s] += 1
        self.chunks = chunk_spans(context, sentences, per_sentence, chunk_tokens) if sentences else []
        self.chunk_of = owner_of(self.chunks, self.spans)

    def chunk_tokens(self, chunk: int) -> list[int]:
        return [t for t, c in enumerate(self.chunk_of) if c == chunk]


def iterative_scores(lm: CompressorLM, ids: list[int], order: list[int], rates: list[float],
                     segment_size: int, question: list[int] | None = None) -> tuple[list[float], list[bool]]:
    """LLMLingua's iterative pass over the tokens ``order`` (indices into ``ids``, ascending):
    per segment, score each token given the compressed text so far (contrastively against the
    same state prefixed by ``question`` when given), keep the top ``rates`` share, commit only
    those. Returns per-token scores (−inf outside ``order``) and kept flags."""
    scores = [float("-inf")] * len(ids)
    kept = [False] * len(ids)
    plain = lm.session()
    conditioned = lm.session(question) if question is not None else None
    for k in range(0, len(order), segment_size):
        segment = order[k: k + segment_size]
        seg_ids = [ids[t] for t in segment]
        s = plain.score(seg_ids)
        if conditioned is not None:
            s = torch.nan_to_num(s - conditioned.score(seg_ids), nan=float("inf"))
        n_keep = min(len(segment), round(sum(rates[t] for t in segment)))
        top = set(s.topk(n_keep).indices.tolist()) if n_keep else set()
        keep_ids = [ids[t] for j, t in enumerate(segment) if j in top]
        for j, t in enumerate(segment):
            scores[t], kept[t] = float(s[j]), j in top
        plain.commit(keep_ids)
        if conditioned is not None:
            conditioned.commit(keep_ids)
    return scores, kept


def finish(text, tokens: Tokens, scores: list[float], kept: list[bool], budget: int,
           keep_order: list[int] | None = None) -> str:
    """Fit the iterative pass's choice to the budget in the target tokenizer."""
    final = [s + KEPT_FIRST if k else s for s, k in zip(scores, kept)]
    chosen = select_within_budget(text.context, tokens.spans, final, text.tokenizer, budget, keep_order)
    return render(text.context, tokens.spans, chosen)


COARSE = (
    COMPRESSOR, WINDOW,
    Param("chunk_tokens", int, None, "compressor tokens per coarse chunk (whole sentences)", min=1),
    Param("coarse_factor", float, None, "the coarse step keeps this many times the final budget", min=1),
    Param("segment_size", int, None, "tokens per segment of the iterative token-level pass", min=1),
)


class LLMLingua(PromptCompressor):
    name = "llmlingua"
    family = "prompt_compression"
    paper = ("Jiang et al., LLMLingua: Compressing Prompts for Accelerated Inference of Large Language "
             "Models, EMNLP 2023 (arXiv:2310.05736)")
    summary = "budget controller over chunks + iterative token-level compression by perplexity"
    defaults = {
        "compressor": "target",
        "window": 4096,
        "chunk_tokens": 128,
        "coarse_factor": 2.0,
        "segment_size": 200,
    }
    params = COARSE

    def compress(self, text, budget):
        lm = load_compressor(self.args["compressor"], text, self.args["window"])
        tokens = Tokens(lm, text.context, self.args["chunk_tokens"])
        info = lm.surprisal(tokens.ids)
        finite = torch.where(torch.isinf(info), torch.nan, info)
        perplexity = [float(finite[tokens.chunk_tokens(c)].nanmean()) for c in range(len(tokens.chunks))]
        perplexity = [p if not math.isnan(p) else float("inf") for p in perplexity]
        chunks = self.coarse(text, tokens, perplexity, budget)
        order = [t for t, c in enumerate(tokens.chunk_of) if c in chunks]
        rate = fine_rate(text, tokens, order, budget)
        scores, kept = iterative_scores(lm, tokens.ids, order, [rate] * len(tokens.ids), self.args["segment_size"])
        return finish(text, tokens, scores, kept, budget)

    def coarse(self, text, tokens: Tokens, chunk_scores: list[float], budget: int) -> set[int]:
        """Chunks kept by the budget controller: the best-scored within ``coarse_factor`` × budget."""
        total = count_tokens(text.tokenizer, text.context)
        coarse_budget = min(total, int(round(budget * self.args["coarse_factor"])))
        kept = set(select_within_budget(text.context, tokens.chunks, chunk_scores, text.tokenizer, coarse_budget))
        return kept or {max(range(len(chunk_scores)), key=chunk_scores.__getitem__)}  # the fine step trims it


def fine_rate(text, tokens: Tokens, order: list[int], budget: int) -> float:
    """Share of the coarse-kept compressor tokens that meets ``budget`` target tokens."""
    kept_text = render(text.context, tokens.spans, order)
    target_per_compressor = count_tokens(text.tokenizer, kept_text) / max(1, len(order))
    return min(1.0, budget / max(1e-9, target_per_compressor) / max(1, len(order)))


class LongLLMLingua(LLMLingua):
    name = "longllmlingua"
    family = "prompt_compression"
    paper = ("Jiang et al., LongLLMLingua: Accelerating and Enhancing LLMs in Long Context Scenarios via "
             "Prompt Compression, ACL 2024 (arXiv:2310.06839)")
    summary = ("question-aware coarse ranking, contrastive token scores, dynamic ratios, reordering (needs "
               "--query-aware)")
    defaults = {
        "compressor": "target",
        "window": 4096,
        "chunk_tokens": 128,
        "coarse_factor": 2.0,
        "segment_size": 200,
        "question_suffix": "We can get the answer to this question in the given documents.",
        "dynamic_delta": 0.25,
        "reorder": "original",
    }
    params = COARSE + (
        Param("question_suffix", str, None, "appended to the question when ranking chunks (the paper's restrict prompt)"),
        Param("dynamic_delta", float, None, "keep-rate spread between the best and the worst ranked chunk (each side)",
              min=0, max=1),
        Param("reorder", str, None, "order of kept chunks: original, or sort (by relevance)", choices=("original", "sort")),
    )

    def compress(self, text, budget):
        if not text.questions:
            raise UserError(
                "longllmlingua is question-aware: it ranks the context by the question, which the text stage "
                "sees only with --query-aware. Fix: add --query-aware, or use llmlingua (question-agnostic).")
        lm = load_compressor(self.args["compressor"], text, self.args["window"])
        tokens = Tokens(lm, text.context, self.args["chunk_tokens"])
        question, _ = lm.encode("\n".join(text.questions))
        condition, _ = lm.encode("\n".join(text.questions) + " " + self.args["question_suffix"])
        relevance = [-float(lm.surprisal(condition, prefix=[tokens.ids[t] for t in tokens.chunk_tokens(c)]).mean())
                     for c in range(len(tokens.chunks))]
        chunks = self.coarse(text, tokens, relevance, budget)
        ranked = sorted(chunks, key=lambda c: -relevance[c])
        rank = {c: i for i, c in enumerate(ranked)}
        order = [t for t, c in enumerate(tokens.chunk_of) if c in chunks]
        base = fine_rate(text, tokens, order, budget)
        spread = self.args["dynamic_delta"]
        rates = [min(1.0, max(0.0, base + spread * (1 - 2 * rank[c] / max(1, len(ranked) - 1)))) if c in rank else 0.0
                 for c in tokens.chunk_of]
        scores, kept = iterative_scores(lm, tokens.ids, order, rates, self.args["segment_size"], question)
        keep_order = None
        if self.args["reorder"] == "sort":
            keep_order = sorted(order, key=lambda t: (rank[tokens.chunk_of[t]], t))
        return finish(text, tokens, scores, kept, budget, keep_order)
