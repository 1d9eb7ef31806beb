"""SCOPE: generative prompt compression by chunking and summarisation (abstractive).

Zhang, Wang and Wang, "SCOPE: A Generative Approach for LLM Prompt Compression" (arXiv:2508.15813,
2025). No official implementation was found to read; this follows the paper's description of its
mechanism — split the prompt into semantically coherent chunks, rewrite the chunks to be more
concise with a generative model, reassemble them in order — and of its five techniques, with the
constants lcbench's own (parameters below):

1. *Optimised semantic chunking*: consecutive sentences stay in one chunk while each is similar
   enough to the one before (``similarity`` threshold over TF-IDF, or a sentence-transformers
   ``embedding_model``), up to ``max_chunk_tokens``.
2. *Outlier chunk handling*: a chunk under ``min_chunk_tokens`` is merged into the neighbour it is
   more similar to (the first and last into their only neighbour).
3. *Dynamic compression ratio*: the budget is shared out over the chunks by length weighted with
   relevance (TF-IDF similarity to the question in ``--query-aware`` mode, else to the whole
   context), ``1 + relevance_weight × relevance`` (relevance rescaled to [0, 1]), water-filled so
   no chunk is given more than it holds.
4. *Compression prioritisation*: a chunk whose share covers it is kept verbatim; only the others
   are rewritten, least relevant hardest.
5. *Keyword maintaining*: each rewritten chunk's ``keywords`` highest-TF-IDF terms are named in the
   generator's instruction (a sequence-to-sequence generator takes no instruction: there they are
   not enforced).

The generator is :class:`~.semantic.Semantic`'s (``target``, any causal LM, or a seq2seq model);
generation time is compression time. The result is fitted to the budget in the target tokenizer.
"""

from __future__ import annotations

from ...params import Param
from .dspc import tfidf_similarity
from .semantic import Semantic, fit, neighbour_similarity
from .units import Span, count_tokens, sentence_spans

KEYWORD_PROMPT = ("Rewrite the following text concisely in about {words} words. Keep these words: {keywords}."
                  "\n\nText: {text}\n\nConcise version:")


def threshold_chunks(sentences: list[Span], sizes: list[int], similarity: list[float], threshold: float,
                     max_tokens: int) -> list[list[int]]:
    """Sentence indices grouped into chunks: a sentence joins the open chunk while its similarity
    to the previous sentence is at least ``threshold`` and the chunk stays within ``max_tokens``."""
    chunks: list[list[int]] = []
    for i in range(len(sentences)):
        if chunks and similarity[i - 1] >= threshold and sum(sizes[j] for j in chunks[-1]) + sizes[i] <= max_tokens:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def merge_outliers(chunks: list[list[int]], sizes: list[int], similarity: list[float],
                   min_tokens: int) -> list[list[int]]:
    """Chunks under ``min_tokens`` merged, smallest first, into the neighbour whose boundary sentence
    is more similar to theirs."""
    chunks = [list(c) for c in chunks]
    while len(chunks) > 1:
        small = [k for k, c in enumerate(chunks) if sum(sizes[j] for j in c) < min_tokens]
        if not small:
            break
        k = min(small, key=lambda k: sum(sizes[j] for j in chunks[k]))
        left = similarity[chunks[k][0] - 1] if k > 0 else float("-inf")
        right = similarity[chunks[k][-1]] if k + 1 < len(chunks) else float("-inf")
        into = k - 1 if left >= right else k + 1
        chunks[min(k, into)] = chunks[min(k, into)] + chunks[max(k, into)]
        del chunks[max(k, into)]
    return chunks


def allocate(budget: int, sizes: list[int], weights: list[float]) -> list[int]:
    """``budget`` tokens shared out in proportion to ``size × weight``, no chunk above its size
    (what a capped chunk does not take goes to the others: water-filling)."""
    share = [0] * len(sizes)
    open_ = [k for k, n in enumerate(sizes) if n > 0]
    left = budget
    while open_ and left > 0:
        total = sum(sizes[k] * weights[k] for k in open_) or 1.0
        capped = [k for k in open_ if left * sizes[k] * weights[k] / total >= sizes[k]]
        if not capped:
            for k in open_:
                share[k] = int(left * sizes[k] * weights[k] / total)
            break
        for k in capped:
            share[k] = sizes[k]
            left -= sizes[k]
            open_.remove(k)
    return share


def first_tokens(tokenizer, text: str, n: int) -> str:
    """``text`` cut to its first ``n`` tokens (a generator's output may re-tokenize longer)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return text if len(enc["input_ids"]) <= n else text[: enc["offset_mapping"][n - 1][1]]


def keywords(chunks: list[str], n: int) -> list[list[str]]:
    """Each chunk's ``n`` terms of highest TF-IDF weight (fit over the chunks)."""
    if n <= 0 or not chunks:
        return [[] for _ in chunks]
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        vectorizer = TfidfVectorizer(stop_words="english")
        matrix = vectorizer.fit_transform(chunks).toarray()
    except ValueError:  # no terms at all
        return [[] for _ in chunks]
    terms = vectorizer.get_feature_names_out()
    return [[terms[i] for i in row.argsort()[::-1][:n] if row[i] > 0] for row in matrix]


class Scope(Semantic):
    name = "scope"
    family = "prompt_compression"
    paper = "Zhang, Wang and Wang, SCOPE: A Generative Approach for LLM Prompt Compression, 2025 (arXiv:2508.15813)"
    summary = ("similarity-threshold chunks, relevance-weighted per-chunk budgets; chunks over budget rewritten "
               "concisely by a generator keeping their keywords (abstractive)")
    defaults = {"generator": "target", "window": 4096, "embedding_model": "", "similarity": 0.1,
                "min_chunk_tokens": 32, "max_chunk_tokens": 256, "relevance_weight": 1.0, "keywords": 5}
    params = tuple(p for p in Semantic.params if p.name != "chunk_tokens") + (
        Param("similarity", float, None, "least similarity of a sentence to the previous one to stay in its chunk",
              min=-1.0, max=1.0),
        Param("min_chunk_tokens", int, None, "chunks smaller than this are merged into a neighbour", min=1),
        Param("max_chunk_tokens", int, None, "most target tokens a chunk holds (a longer sentence stays whole)", min=1),
        Param("relevance_weight", float, None, "how much relevance raises a chunk's share of the budget", min=0.0),
        Param("keywords", int, None, "terms of each rewritten chunk named in the instruction to keep", min=0),
    )

    def compress(self, text, budget):
        context, tok = text.context, text.tokenizer
        sentences = sentence_spans(context)
        pieces = [context[s:e] for s, e in sentences]
        sizes = [count_tokens(tok, p) for p in pieces]
        similarity = neighbour_similarity(pieces, self.args["embedding_model"])
        groups = threshold_chunks(sentences, sizes, similarity, self.args["similarity"], self.args["max_chunk_tokens"])
        groups = merge_outliers(groups, sizes, similarity, self.args["min_chunk_tokens"])
        chunks = [context[sentences[g[0]][0]:sentences[g[-1]][1]] for g in groups]
        chunk_sizes = [count_tokens(tok, c) for c in chunks]
        reference = " ".join(text.questions) if text.questions else context
        relevance = tfidf_similarity(chunks, reference)
        lo, hi = min(relevance), max(relevance)
        scaled = [(r - lo) / (hi - lo) if hi > lo else 1.0 for r in relevance]
        # one token of each chunk's share goes to the newline that joins it to the next
        shares = allocate(max(1, budget - len(chunks)), chunk_sizes,
                          [1.0 + self.args["relevance_weight"] * r for r in scaled])
        terms = keywords(chunks, self.args["keywords"])
        out = []
        rewritten = 0
        for chunk, size, share, words in zip(chunks, chunk_sizes, shares, terms):
            if share >= size:
                out.append(chunk.strip())  # covered by its share: kept as written
            elif share > 0:
                self._keywords = words
                out.append(first_tokens(tok, self.summarise(text, chunk, share).strip(), share))
                rewritten += 1
        self._scope_stats = {"scope_chunks": float(len(chunks)), "scope_rewritten": float(rewritten)}
        return fit("\n".join(x for x in out if x) + "\n", tok, budget, [x for x in out if x])

    def instruction(self, chunk: str, words: int) -> str:
        keep = getattr(self, "_keywords", [])
        if not keep:
            return super().instruction(chunk, words)
        return KEYWORD_PROMPT.format(words=words, keywords=", ".join(keep), text=chunk.strip())

    def sample_stats(self) -> dict[str, float]:
        return {**super().sample_stats(), **getattr(self, "_scope_stats", {})}

    def begin_sample(self) -> None:
        super().begin_sample()
        self._scope_stats = {}
