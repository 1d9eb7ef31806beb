"""The shared selection step of every dropping method: keep the top-scoring context tokens per
row and KV head, always keep the protected tail (the question in query-aware mode), never keep
padding over a real token."""

from __future__ import annotations

import torch

from ...cache.layer import KVLayer
from ..base import LayerObservation, keep_count


def keep_top(layer: KVLayer, scores: torch.Tensor, ratio: float, seen: LayerObservation) -> KVLayer:
    """Keep ``keep_count(context, ratio)`` context slots with the highest ``scores`` (B, H, Lc) in
    each row and KV head, plus the protected tail, and return the layer."""
    n_ctx = seen.context_length
    if ratio <= 0 or n_ctx <= 1:
        return layer
    scores = scores[..., :n_ctx].float()
    if layer.valid is not None:
        scores = scores.masked_fill(~layer.valid[..., :n_ctx], float("-inf"))
        n_real = int(layer.valid[..., :n_ctx].sum(-1).max())
    else:
        n_real = n_ctx
    k = keep_count(n_real, ratio)
    index = scores.topk(k, dim=-1).indices
    if seen.protected:
        b, h, _ = index.shape
        tail = torch.arange(n_ctx, n_ctx + seen.protected, device=index.device).expand(b, h, -1)
        index = torch.cat([index, tail], dim=-1)
    layer.select(index)
    return layer


def group_mean(per_query_head: torch.Tensor, groups: int) -> torch.Tensor:
    """Average a (B, Hq, ...) statistic over the query heads of each KV head → (B, Hkv, ...)."""
    b, hq = per_query_head.shape[:2]
    return per_query_head.reshape(b, hq // groups, groups, *per_query_head.shape[2:]).mean(2)
