"""Semantic compression: topic chunks of the context, each summarised by a generator (abstractive).

Fei et al., "Extending Context Window of Large Language Models via Semantic Compression",
Findings of ACL 2024 (arXiv:2312.09571). No official implementation was read; this follows the
paper's description:

1. *Topic-based chunking*: the sentences form a graph whose edges are the similarities of
   neighbouring sentences (TF-IDF cosine, or a sentence-transformers ``embedding_model``); the text
   is cut where that similarity is lowest — at the weakest edge once a chunk holds at least
   ``chunk_tokens`` target tokens, and always before it reaches twice that — so chunks follow the
   topics.
2. *Refinement*: each chunk is rewritten by a pre-trained generator — ``generator=target`` (the
   evaluated model, prompted to summarise; any causal LM by name or folder the same way) or any
   Hugging Face sequence-to-sequence model (e.g. a BART summariser, detected from its config) —
   greedily, allowed the chunk's share of the budget in new tokens.
3. The summaries are assembled in the original order and fitted to the budget in the target
   tokenizer (each summary's tail dropped first). Generation time is compression time (the
   engine times the whole text stage).

Abstractive output is not a subsequence of the context, and a generator may stop early (EOS),
so the achieved ratio can exceed the requested one (never fall short of it).
"""

from __future__ import annotations

import math

import torch

from ...errors import UserError
from ...params import Param
from .base import PromptCompressor
from .dspc import tfidf_similarity
from .extractive import embedding_scores
from .lm import load_compressor
from .units import Span, count_tokens, render, select_within_budget, sentence_spans, token_spans

SUMMARY_PROMPT = "Summarize the following text in about {words} words, keeping names and numbers.\n\nText: {text}\n\nSummary:"
_SEQ2SEQ: dict[str, tuple] = {}


def neighbour_similarity(pieces: list[str], embedding_model: str) -> list[float]:
    """Similarity of each sentence to the next (one fewer than the sentences)."""
    if len(pieces) < 2:
        return []
    if embedding_model:
        return [embedding_scores(embedding_model, [a], b)[0] for a, b in zip(pieces, pieces[1:])]
    return [tfidf_similarity([a, b], b)[0] for a, b in zip(pieces, pieces[1:])]


def topic_chunks(sentences: list[Span], sizes: list[int], similarity: list[float], chunk_tokens: int) -> list[Span]:
    """Consecutive sentences grouped into chunks cut at the weakest neighbour similarity once a
    chunk holds ``chunk_tokens`` tokens (and before it holds ``2 × chunk_tokens``)."""
    chunks, start = [], 0
    while start < len(sentences):
        acc, end = 0, start
        while end < len(sentences) and acc < chunk_tokens:
            acc += sizes[end]
            end += 1
        limit, best, cut = acc, None, end
        k = end  # candidate cuts: after sentence k-1, while the chunk stays under 2 × chunk_tokens
        while k <= len(sentences) and limit <= 2 * chunk_tokens:
            weight = similarity[k - 1] if k - 1 < len(similarity) else math.inf  # the end: only when nothing else
            if best is None or weight < best:
                best, cut = weight, k
            if k == len(sentences):
                break
            limit += sizes[k]
            k += 1
        chunks.append((sentences[start][0], sentences[cut - 1][1]))
        start = cut
    return chunks


class Semantic(PromptCompressor):
    name = "semantic"
    family = "prompt_compression"
    paper = ("Fei et al., Extending Context Window of Large Language Models via Semantic Compression, "
             "Findings of ACL 2024 (arXiv:2312.09571)")
    summary = "topic chunks by neighbour-sentence similarity, each summarised by a generator (abstractive)"
    defaults = {"generator": "target", "window": 4096, "chunk_tokens": 256, "embedding_model": ""}
    params = (
        Param("generator", str, None, "the model that rewrites each chunk: 'target', a causal LM or a "
              "sequence-to-sequence model (registered name, hub id or folder)"),
        Param("window", int, None, "most tokens a causal generator conditions on at once", min=1),
        Param("chunk_tokens", int, None, "target tokens a topic chunk holds at least", min=1),
        Param("embedding_model", str, None, "sentence-transformers model for sentence similarity; empty: TF-IDF"),
    )

    def compress(self, text, budget):
        context, tok = text.context, text.tokenizer
        sentences = sentence_spans(context)
        pieces = [context[s:e] for s, e in sentences]
        sizes = [count_tokens(tok, p) for p in pieces]
        chunks = topic_chunks(sentences, sizes, neighbour_similarity(pieces, self.args["embedding_model"]),
                              self.args["chunk_tokens"])
        total = sum(sizes) or 1
        summaries = []
        for s, e in chunks:
            share = max(1, int(budget * count_tokens(tok, context[s:e]) / total))
            summaries.append(self.summarise(text, context[s:e], share).strip())
        out = "\n".join(x for x in summaries if x) + "\n"
        return fit(out, tok, budget, summaries)

    def summarise(self, text, chunk: str, tokens: int) -> str:
        """The generator's rewrite of ``chunk`` in at most about ``tokens`` new tokens."""
        name = self.args["generator"]
        seq2seq = seq2seq_generator(name) if name != "target" else None
        words = max(1, int(tokens * 0.75))
        if seq2seq is not None:
            model, tokenizer = seq2seq
            enc = tokenizer(chunk, return_tensors="pt", truncation=True).to(model.device)
            with torch.inference_mode():
                ids = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=1, do_sample=False, num_beams=1)
            return tokenizer.decode(ids[0], skip_special_tokens=True)
        lm = load_compressor(name, text, self.args["window"])
        prompt = self.instruction(chunk, words)
        ids, _ = lm.encode(prompt)
        keep = max(1, lm.window - tokens - 1)  # a chunk longer than the window is read from its end
        if len(ids) > keep:
            prompt = lm.tokenizer.decode(ids[-keep:])
        return lm.generate(prompt, tokens, stop="\n\n")

    def instruction(self, chunk: str, words: int) -> str:
        """The causal generator's prompt to rewrite ``chunk`` in about ``words`` words."""
        return SUMMARY_PROMPT.format(words=words, text=chunk.strip())


def seq2seq_generator(name: str):
    """(model, tokenizer) when ``name`` is a sequence-to-sequence model, else None (cached)."""
    if name in _SEQ2SEQ:
        return _SEQ2SEQ[name]
    from ...models.loading import MODELS

    if name in MODELS:
        _SEQ2SEQ[name] = None
        return None
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UserError(f"semantic: could not load the generator '{name}': {str(exc).splitlines()[0]} Fix: pass "
                        f"generator=target, a registered model, or a local model folder.") from None
    if not getattr(config, "is_encoder_decoder", False):
        _SEQ2SEQ[name] = None
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _SEQ2SEQ[name] = (AutoModelForSeq2SeqLM.from_pretrained(name).to(device).eval(), AutoTokenizer.from_pretrained(name))
    return _SEQ2SEQ[name]


def fit(out: str, tokenizer, budget: int, summaries: list[str]) -> str:
    """``out`` within ``budget`` target tokens, each summary's last tokens dropped first."""
    if count_tokens(tokenizer, out) <= budget:
        return out
    enc = tokenizer(out, add_special_tokens=False, return_offsets_mapping=True)
    spans = token_spans(enc["offset_mapping"], len(out))
    starts, pos = [], 0
    for x in summaries:
        if x:
            starts.append((pos, pos + len(x)))
            pos += len(x) + 1
    scores = []
    for s, _ in spans:
        a, b = next(((a, b) for a, b in starts if a <= s < b + 1), (0, max(1, len(out))))
        scores.append(1.0 - (s - a) / max(1, b - a))  # earlier in its summary: kept first
    return render(out, spans, select_within_budget(out, spans, scores, tokenizer, budget))
