"""Extractive compression: keep the sentences (or chunks) that best match the question.

Retrieval-based compression as the LongLLMLingua and RECOMP papers compare with (BM25 and
embedding rankers): the context is split into sentences, or into chunks of about ``chunk_words``
words made of whole sentences; each is scored against the question with BM25 (``rank_bm25``'s
Okapi BM25) or, when ``embedding_model`` names a sentence-transformers model (name or path), by
cosine similarity of embeddings. The best units that fit the budget are kept in their original
order. Without the question (query-agnostic mode, the default) units are scored against the
whole context — its distinct words for BM25, its mean embedding — i.e. by centrality.
"""

from __future__ import annotations

import re

from ...errors import UserError
from ...params import Param
from .base import PromptCompressor
from .units import chunk_spans, render, select_within_budget, sentence_spans

_CJK = re.compile(r"[\u4e00-\u9fff]")
_WORD = re.compile(r"\w+")


def bm25_terms(text: str) -> list[str]:
    """Lower-cased word terms; Chinese text is segmented with jieba."""
    if _CJK.search(text):
        import jieba

        return [w.lower() for w in jieba.lcut(text) if _WORD.search(w)]
    return _WORD.findall(text.lower())


def bm25_scores(units: list[str], query: str) -> list[float]:
    from rank_bm25 import BM25Okapi

    docs = [bm25_terms(u) or [""] for u in units]
    return [float(s) for s in BM25Okapi(docs).get_scores(bm25_terms(query))]


_EMBEDDERS: dict = {}  # loaded sentence-transformers models, by name


def embedding_scores(model_name: str, units: list[str], query: str | None) -> list[float]:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise UserError("extractive: embedding_model needs sentence-transformers. Fix: pip install "
                        "'lcbench[embeddings]' (or leave embedding_model empty to rank with BM25).") from None
    try:
        model = _EMBEDDERS.get(model_name) or SentenceTransformer(model_name, device="cpu")
    except (OSError, ValueError) as exc:
        raise UserError(f"extractive: could not load the embedding model '{model_name}': "
                        f"{str(exc).splitlines()[0]} Fix: pass a local sentence-transformers folder or a "
                        f"reachable model id as embedding_model.") from None
    _EMBEDDERS[model_name] = model
    units_emb = model.encode(units, convert_to_tensor=True, normalize_embeddings=True)
    if query is None:
        target = units_emb.mean(0)
    else:
        target = model.encode([query], convert_to_tensor=True, normalize_embeddings=True)[0]
    return (units_emb @ target).tolist()



class Extractive(PromptCompressor):
    name = "extractive"
    family = "prompt_compression"
    paper = ("Robertson & Zaragoza, The Probabilistic Relevance Framework: BM25 and Beyond, 2009; as a "
             "compression baseline in LongLLMLingua (arXiv:2310.06839)")
    summary = ("keep the sentences/chunks that best match the question (BM25, or sentence-transformers "
               "embeddings)")
    defaults = {"chunk_words": 0, "embedding_model": ""}
    params = (
        Param("chunk_words", int, None, "words per chunk of whole sentences; 0 ranks single sentences", min=0),
        Param("embedding_model", str, None, "sentence-transformers model (name or path); empty: BM25"),
    )

    def compress(self, text, budget):
        context = text.context
        units = sentence_spans(context)
        if self.args["chunk_words"] > 0:
            words = [len(context[s:e].split()) for s, e in units]
            units = chunk_spans(context, units, words, self.args["chunk_words"])
        pieces = [context[s:e] for s, e in units]
        query = "\n".join(text.questions) if text.questions else None
        if self.args["embedding_model"]:
            scores = embedding_scores(self.args["embedding_model"], pieces, query)
        else:
            scores = bm25_scores(pieces, query if query is not None else " ".join(sorted(set(bm25_terms(context)))))
        chosen = select_within_budget(context, units, scores, text.tokenizer, budget)
        return render(context, units, chosen)
