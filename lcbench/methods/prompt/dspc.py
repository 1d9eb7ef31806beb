"""DSPC: dual-stage progressive compression — TF-IDF sentence filtering, then token pruning.

Gao et al., "DSPC: Dual-Stage Progressive Compression Framework for Efficient Long-Context
Reasoning", 2025 (arXiv:2509.13723). No official implementation was found (none is linked from
the paper's abstract page); this follows the paper's description as far as it could be read here
(its abstract and a third-party summary — the exact formulas of stage 2 were not available):

1. *Semantic-related sentence filtering* (coarse): sentences are TF-IDF vectors (scikit-learn's
   ``TfidfVectorizer``; terms as :func:`~lcbench.methods.prompt.extractive.bm25_terms`, jieba for
   Chinese) scored by cosine similarity to the query — the question with ``--query-aware``,
   otherwise the whole context (the paper builds a query from the context's TF-IDF terms when a
   task has none). The best sentences are kept up to ``coarse_factor`` × the final budget.
2. *Token pruning* (fine): over the kept text, each compressor token gets three signals, each
   min-max normalised: **attention contribution** (the mean attention the token receives from the
   queries that see it, over the compressor's heads and layers, :mod:`.attend`), **cross-model
   loss difference** (``loss_compressor − loss_reference`` of the token, the reference model's
   losses mapped onto compressor tokens by character offsets: high where the evaluated model finds
   a token harder than a second model does; with ``reference`` empty the compressor's own loss is
   used, LLMLingua's signal) and **positional importance** (``|2t/(n−1) − 1|``: the beginning and
   the end of the context matter most, lost-in-the-middle). The weighted sum
   (``w_attention``, ``w_loss``, ``w_position``) ranks the tokens; the best that fit the budget in
   the target tokenizer are kept in order.
"""

from __future__ import annotations

import torch

from ...errors import UserError
from ...params import Param
from .attend import attention_pass
from .base import PromptCompressor
from .extractive import bm25_terms
from .lm import load_compressor
from .selective_context import COMPRESSOR, WINDOW
from .units import count_tokens, owner_of, render, select_within_budget, sentence_spans, token_spans


def tfidf_similarity(units: list[str], query: str) -> list[float]:
    """Cosine similarity of each unit's TF-IDF vector to the query's (fit on the units)."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
    except ImportError:
        raise UserError("dspc and perception need scikit-learn for TF-IDF. Fix: pip install scikit-learn.") from None
    vectorizer = TfidfVectorizer(analyzer=bm25_terms)
    try:
        matrix = vectorizer.fit_transform(units)
    except ValueError:  # no terms at all (e.g. only punctuation)
        return [0.0] * len(units)
    q = vectorizer.transform([query])  # rows are L2-normalised: the dot product is the cosine
    return [float(v) for v in (matrix @ q.T).toarray()[:, 0]]


def sentence_filter(context: str, query: str, tokenizer, budget: int) -> str:
    """Stage 1: the sentences most TF-IDF-similar to ``query`` that fit ``budget`` target tokens."""
    sentences = sentence_spans(context)
    scores = tfidf_similarity([context[s:e] for s, e in sentences], query)
    return render(context, sentences, select_within_budget(context, sentences, scores, tokenizer, budget))


def minmax(x: torch.Tensor) -> torch.Tensor:
    """``x`` scaled to [0, 1] (non-finite values count as the minimum; a constant signal is 0)."""
    x = torch.nan_to_num(x.float(), nan=0.0, posinf=float("nan"), neginf=float("nan"))
    finite = x[~torch.isnan(x)]
    if finite.numel() == 0:
        return torch.zeros_like(x)
    lo, hi = finite.min(), finite.max()
    x = torch.where(torch.isnan(x), lo, x)
    if hi - lo <= 1e-5 * max(1.0, float(hi.abs()), float(lo.abs())):  # constant up to float noise
        return torch.zeros_like(x)
    return (x - lo) / (hi - lo)


def position_importance(n: int) -> torch.Tensor:
    """1 at both ends of the context, 0 in its middle."""
    return (2 * torch.arange(n, dtype=torch.float32) / max(1, n - 1) - 1).abs()


class DSPC(PromptCompressor):
    name = "dspc"
    family = "prompt_compression"
    paper = ("Gao et al., DSPC: Dual-Stage Progressive Compression Framework for Efficient Long-Context "
             "Reasoning, 2025 (arXiv:2509.13723)")
    summary = ("TF-IDF sentence filtering, then token pruning by attention contribution, cross-model loss "
               "difference and position")
    defaults = {"compressor": "target", "window": 4096, "reference": "", "coarse_factor": 1.5,
                "w_attention": 1.0, "w_loss": 1.0, "w_position": 0.5}
    params = (
        COMPRESSOR, WINDOW,
        Param("reference", str, None, "second causal LM for the cross-model loss difference (name, hub id or "
              "folder); empty: the compressor's own token loss"),
        Param("coarse_factor", float, None, "stage 1 keeps this many times the final budget", min=1),
        Param("w_attention", float, None, "weight of the attention contribution", min=0),
        Param("w_loss", float, None, "weight of the (cross-model) loss signal", min=0),
        Param("w_position", float, None, "weight of positional importance", min=0),
    )

    def compress(self, text, budget):
        total = count_tokens(text.tokenizer, text.context)
        query = "\n".join(text.questions) if text.questions else text.context
        coarse_budget = min(total, int(round(budget * self.args["coarse_factor"])))
        kept = sentence_filter(text.context, query, text.tokenizer, coarse_budget) if coarse_budget < total else text.context
        if count_tokens(text.tokenizer, kept) <= budget:
            return kept
        return self.prune(text, kept, budget)

    def token_scores(self, text, lm, ids, offsets, kept: str) -> torch.Tensor:
        """Stage 2's combined score of each compressor token of ``kept``."""
        a = self.args
        window = max(1, lm.window)
        received, loss = [], []
        for k in range(0, len(ids), window):  # independent windows past the compressor's length
            p = attention_pass(lm, ids[k: k + window], received=a["w_attention"] > 0)
            received.append(p.received if p.received is not None else torch.zeros(len(p.surprisal)))
            loss.append(p.surprisal)
        loss_t = torch.cat(loss)
        if a["reference"]:
            loss_t = loss_t - self.reference_loss(text, kept, offsets)
        parts = [(a["w_attention"], torch.cat(received)), (a["w_loss"], loss_t), (a["w_position"], position_importance(len(ids)))]
        return sum(w * minmax(x) for w, x in parts if w > 0) if any(w > 0 for w, _ in parts) else torch.zeros(len(ids))

    def reference_loss(self, text, kept: str, offsets) -> torch.Tensor:
        """The reference model's token losses summed onto the compressor's tokens (by character)."""
        ref = load_compressor(self.args["reference"], text, self.args["window"])
        ref_ids, ref_offsets = ref.encode(kept)
        ref_loss = torch.nan_to_num(ref.surprisal(ref_ids), posinf=0.0)
        mine = token_spans(offsets, len(kept))
        out = torch.zeros(len(mine))
        for j, owner in enumerate(owner_of(mine, token_spans(ref_offsets, len(kept)))):
            out[owner] += ref_loss[j]
        return out

    def prune(self, text, kept: str, budget: int) -> str:
        lm = load_compressor(self.args["compressor"], text, self.args["window"])
        ids, offsets = lm.encode(kept)
        scores = self.token_scores(text, lm, ids, offsets, kept)
        spans = token_spans(offsets, len(kept))
        chosen = select_within_budget(kept, spans, scores.tolist(), text.tokenizer, budget)
        return render(kept, spans, chosen)
