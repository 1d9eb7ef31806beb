"""RetrievalAttention: each decoding step attends the static tokens and the context keys a vector
search retrieves for its query.

Liu et al., "RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval"
(arXiv:2409.10516), as shipped in MInference (github.com/microsoft/MInference, read at commit
fb56c917f618e8645f1cfc37535afd7424d78f0d: ``minference/modules/retr_attn.py``, ``VectorDB_KV_Cache``
and ``retr_attn``). Upstream keeps ``start_size`` = 128 initial and ``recent_size`` = 512 recent
context tokens (and every generated token) in GPU memory, puts the other context keys in a vector
index on the CPU, and at each decoding step retrieves each query head's ``top_k`` = 2000 keys by
inner product (its ``FlatIndex``: an exact search), merging the two attentions by their
log-sum-exp — which equals one softmax over the union. Here the search is exact too (the
highest query·key products, no index) and ``--ratio`` sets the budget: with ``B`` = (1 − ratio) ×
context tokens, the initial tokens, the recent window and the retrieved keys take upstream's
shares of 128 / 512 / 2000 (``start_share``, ``recent_share``). The question prefill stays dense
(upstream's prefill), so ``attention_density`` is the decoding steps'. With grouped queries a KV
head retrieves for the mean of its group's queries (upstream searches per query head). The whole
cache stays in memory; the selection is a mask through the engine's dense attention.
"""

from __future__ import annotations

import torch

from ...params import Param
from ..base import keep_count
from .retrieval import ContextRetrieval


class RetrievalAttention(ContextRetrieval):
    name = "retr_attn"
    family = "sparse_attention"
    paper = ("Liu et al., RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval, "
             "2024 (arXiv:2409.10516)")
    summary = "decode attends initial + recent tokens and the context keys with the highest query·key (exact search)"
    tolerance = 0.05
    dense_question = True  # upstream's prompt prefill is dense
    defaults = {"start_share": 128 / 2640, "recent_share": 512 / 2640}
    params = (
        Param("start_share", float, None, "share of the budget for the initial tokens (upstream 128 of 2640)",
              min=0.0, max=1.0),
        Param("recent_share", float, None, "share of the budget for the recent window (upstream 512 of 2640)",
              min=0.0, max=1.0),
    )

    def learn(self, query, key, scaling, groups, layer_idx):
        context = key.shape[2]
        budget = keep_count(context, self.ratio)
        start = int(budget * self.args["start_share"])
        recent = int(budget * self.args["recent_share"])
        top_k = budget - start - recent
        if top_k <= 0 or context - start - recent <= top_k:
            return None
        return start, recent, top_k, context

    def keep(self, learned, query, key, valid_queries, scaling):
        start, recent, top_k, context = learned
        b, hq, n, d = query.shape
        total, hkv = key.shape[2], key.shape[1]
        q = query.float().reshape(b, hkv, hq // hkv, n, d).mean(2)  # (B, Hkv, q, D)
        middle = key[:, :, start:context - recent].float()
        best = torch.matmul(q, middle.transpose(-1, -2)).topk(top_k, dim=-1).indices + start
        keep = torch.zeros(b, hkv, n, total, dtype=torch.bool, device=query.device)
        keep[..., :start] = True
        keep[..., context - recent:] = True  # the recent window and everything after the context
        return keep.scatter_(-1, best, True)
