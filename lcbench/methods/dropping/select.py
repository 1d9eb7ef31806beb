"""The shared selection step of every dropping method: keep the top-scoring context tokens per
row and KV head, always keep the protected tail (the question in query-aware mode), never keep
padding over a real token."""

from __future__ import annotations

import torch

from ...cache.layer import KVLayer
from ..base import LayerObservation, keep_count


def context_slots(layer: KVLayer, seen: LayerObservation) -> int:
    """Context slots the layer holds now (an earlier stage of the chain may have dropped some)."""
    return layer.seq_len() - seen.protected


def real_context_slots(layer: KVLayer, seen: LayerObservation) -> int:
    """Context slots holding real tokens (not padding), the most over rows and heads."""
    n = context_slots(layer, seen)
    return n if layer.valid is None else int(layer.valid[..., :n].sum(-1).max())


def context_budget(layer: KVLayer, seen: LayerObservation, ratio: float) -> int:
    """Context tokens to keep per head so that, with the protected tail (the question in
    query-aware mode) kept too, the layer holds ``keep_count(real + protected, ratio)`` tokens —
    the engine measures the ratio over both."""
    n_real = real_context_slots(layer, seen)
    return max(1, min(n_real, keep_count(n_real + seen.protected, ratio) - seen.protected))


def pass_slots(seen: LayerObservation, positions: torch.Tensor) -> torch.Tensor:
    """Slot indices, in the compressing pass, of tokens at true ``positions`` (B, H, n). A slot's
    index is its position unless a ``context_inputs`` stage (``pool``) prefilled other positions."""
    if seen.positions is None:
        return positions
    sorted_positions = seen.positions.to(positions.device)
    b, h, n = positions.shape
    flat = positions.reshape(b, h * n).contiguous()
    index = torch.searchsorted(sorted_positions.expand(b, -1).contiguous(), flat)
    return index.clamp(max=sorted_positions.shape[-1] - 1).reshape(b, h, n)


def align(scores: torch.Tensor, layer: KVLayer, seen: LayerObservation) -> torch.Tensor:
    """Scores (B, H, n) computed over the slots of the compressing pass, re-indexed to the slots
    the layer holds now: when an earlier stage already dropped tokens, each kept slot takes the
    score of its slot in the pass (found by its true position)."""
    n = context_slots(layer, seen)
    if scores.shape[-1] == n:
        return scores
    index = pass_slots(seen, layer.positions[..., :n]).clamp(max=scores.shape[-1] - 1)
    return scores.gather(-1, index.to(scores.device))


def keep_top(layer: KVLayer, scores: torch.Tensor, ratio: float, seen: LayerObservation,
             keep: int | None = None) -> KVLayer:
    """Keep ``keep`` (default :func:`context_budget`) context slots with the highest
    ``scores`` (B, H, Lc) in each row and KV head, plus the protected tail, and return the layer."""
    n_ctx = context_slots(layer, seen)
    if (ratio <= 0 and keep is None) or n_ctx <= 1:
        return layer
    scores = align(scores[..., : seen.context_length], layer, seen).float()
    if layer.valid is not None:
        scores = scores.masked_fill(~layer.valid[..., :n_ctx], float("-inf"))
    k = context_budget(layer, seen, ratio) if keep is None else max(1, min(n_ctx, keep))
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


def force_keep(scores: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
    """Scores with slots ``start:stop`` raised above every other (always kept)."""
    scores = scores.clone()
    scores[..., start:stop] = float("inf")
    return scores


def query_positions(seen: LayerObservation, device=None) -> torch.Tensor:
    """(q,) true positions of the queries of the compressing pass (its last ``q`` slots)."""
    total = seen.context_length + seen.protected
    q = seen.queries.shape[2] if seen.queries is not None else total
    if seen.positions is not None:
        return seen.positions[0, total - q: total].to(device)
    return torch.arange(total - q, total, device=device)
