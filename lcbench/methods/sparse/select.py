"""Threshold selection shared by the cumulative-attention sparse-prefill methods.

FlexPrefill (``score_cover_topk`` / ``score_cover_idx``) and XAttention (``find_blocks_chunked``)
both keep, per row of estimated attention mass, the smallest set of entries whose mass reaches a
fraction of the row's total: forced entries first (sink and diagonal blocks), then the others in
descending order while the mass taken *before* an entry is still below the requirement.
"""

from __future__ import annotations

import torch


def cover_threshold(scores: torch.Tensor, threshold: float, forced: torch.Tensor | None = None,
                    allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask like ``scores`` (…, n) of the smallest set per row reaching ``threshold`` × the
    row's total mass (over ``allowed`` entries): ``forced`` entries always, then the largest
    others in descending order, each taken while the mass before it is below the requirement."""
    scores = scores.double().clamp(min=0)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, 0.0)
    forced = torch.zeros_like(scores, dtype=torch.bool) if forced is None else forced.expand_as(scores)
    if allowed is not None:
        forced = forced & allowed
    required = threshold * scores.sum(-1, keepdim=True)
    base = scores.masked_fill(~forced, 0.0).sum(-1, keepdim=True)
    rest = scores.masked_fill(forced, -1.0)  # forced entries sort last and are never re-taken
    if allowed is not None:
        rest = rest.masked_fill(~allowed, -1.0)
    values, order = rest.sort(dim=-1, descending=True)
    before = base + values.clamp(min=0).cumsum(-1) - values.clamp(min=0)
    take = (before < required) & (values >= 0)
    mask = torch.zeros_like(take).scatter(-1, order, take)
    return mask | forced
