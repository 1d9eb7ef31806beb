"""Finch: the question is the observation window, chunk by chunk under a bounded cache.

Corallo & Papotti, "FINCH: Prompt-guided Key-Value Cache Compression for Large Language Models",
TACL 12 (2024), doi:10.1162/tacl_a_00716, arXiv:2408.00167. The context is read in chunks; each chunk is prefilled
after the cache kept so far, *followed by the question*, and the attention of the question's
tokens over the cached keys decides which context tokens stay; the question's own KV is then
dropped and the next chunk follows, so the cache never exceeds the budget plus one chunk. The last
chunk is followed by the question for real, whose KV stays for decoding.

Read against NVIDIA kvpress 0.5.5 ``kvpress/presses/finch_press.py`` (FinchPress, the reference
implementation the paper's authors contributed), whose positions this method keeps exactly on a
fixed one-chunk input (tests/test_finch.py): the window is every question token (kvpress finds it
after a delimiter token; lcbench's query-aware mode protects the question as the prefill's tail);
each window query's attention over the keys (softmax over every key it sees, causal inside the
question) is multiplied by the number of keys before it (``normalize_scores``: later queries spread
over more keys), averaged over the window queries and then over the query heads of each KV head;
the top ``keep_count`` slots are kept per KV head together with the question.

The paper's sequential chunks are lcbench's engine capability, not this file: run
``--query-aware --prefill-chunk N --compress-chunks`` (engine/chunked.py: each intermediate pass is
chunk + question, compressed with the question protected, the question then cropped). With one
chunk (no ``--prefill-chunk``) it is kvpress's FinchPress. lcbench deviations: keys keep their
true positions (kvpress's ``rerotate_keys`` moves kept keys to positions 0..K−1; lcbench never
re-rotates, as for every method), and kvpress's ``chunk_length`` (top-k chosen per chunk of one
pass) is not offered — the paper's chunking is the sequential one above. Needs ``--query-aware``:
without the question in the prefill there is no window (the engine refuses the run, exit 2).
"""

from __future__ import annotations

import torch

from ...engine.attention import grouped_scores
from ...errors import UserError
from ...params import Param
from ..base import Needs
from .scoring import ScoringDrop
from .select import context_slots


def question_attention(queries: torch.Tensor, keys: torch.Tensor, question: int, groups: int, scaling: float,
                       valid: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
    """(B, Hkv, L) Finch's scores: the attention of the last ``question`` queries (B, Hq, q, D) over
    the ``L`` stored keys (B, Hkv, L, D; the queries are the newest slots), causal inside the question,
    each row multiplied by the number of keys before its query when ``normalize``, averaged over the
    question's queries and the ``groups`` query heads of each KV head."""
    b, hkv, L, _ = keys.shape
    q = queries[:, :, -question:]
    logits = grouped_scores(q, keys, groups, scaling).view(b, hkv, groups, question, L)
    rows = torch.arange(L - question, L, device=keys.device)  # the slot of each question query
    allowed = torch.arange(L, device=keys.device)[None, :] <= rows[:, None]  # (question, L)
    if valid is not None:
        allowed = allowed & valid[:, :, None, None, :]
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    if normalize:  # kvpress: attn_weights * arange(k_len - window, k_len)
        probs = probs * rows.to(probs.dtype)[:, None]
    return probs.mean(3).mean(2)


class Finch(ScoringDrop):
    name = "finch"
    family = "kv_dropping"
    paper = ("Corallo & Papotti, FINCH: Prompt-guided Key-Value Cache Compression for Large Language Models, "
             "TACL 2024 (arXiv:2408.00167)")
    summary = ("the question's attention over the cache picks the context tokens (--query-aware); chunk by chunk "
               "with --prefill-chunk N --compress-chunks")
    params = (Param("normalize_scores", bool, True, "multiply each question query's attention by the number of keys "
                    "before it (kvpress's normalize_scores)"),)
    needs = Needs(queries=True)
    needs_question = True

    def scores(self, layer, seen):
        if seen.protected <= 0:
            raise UserError("method 'finch' scores the context by the question's attention, but the question is not "
                            "part of the prefill. Fix: add --query-aware (and, for the paper's chunked reading, "
                            "--prefill-chunk N --compress-chunks).")
        keys, _ = layer.dense()
        scaling = float(getattr(seen.module, "scaling", keys.shape[-1] ** -0.5))
        scores = question_attention(seen.queries, keys, seen.protected, seen.num_groups, scaling, layer.valid,
                                    self.args["normalize_scores"])
        return scores[..., : context_slots(layer, seen)]
