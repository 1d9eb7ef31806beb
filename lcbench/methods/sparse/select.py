"""Threshold selection shared by the cumulative-attention sparse-prefill methods.

FlexPrefill (``score_cover_topk`` / ``score_cover_idx``) and XAttention (``find_blocks_chunked``)
both keep, per row of estimated attention mass, the smallest set of entries whose mass reaches a
fraction of the row's total: forced entries first (sink and diagonal blocks), then the others in
descending order while the mass taken *before* an entry is still below the requirement.
"""

from __future__ import annotations

import torch


class ThresholdCover:
    """The ranking of ``scores`` (…, n) done once, so the set at any threshold is one comparison
    (the methods search the threshold that meets a density target). ``forced`` entries are always
    kept; only ``allowed`` entries count toward a row's mass or can be kept."""

    def __init__(self, scores: torch.Tensor, forced: torch.Tensor | None = None,
                 allowed: torch.Tensor | None = None):
        scores = scores.double().clamp(min=0)
        allowed = torch.ones_like(scores, dtype=torch.bool) if allowed is None else allowed.expand_as(scores)
        scores = scores.masked_fill(~allowed, 0.0)
        forced = torch.zeros_like(allowed) if forced is None else forced.expand_as(scores) & allowed
        self.forced = forced
        self.total = scores.sum(-1, keepdim=True)
        base = scores.masked_fill(~forced, 0.0).sum(-1, keepdim=True)
        rest = scores.masked_fill(forced | ~allowed, -1.0)  # never re-taken, sorted last
        values, self.order = rest.sort(dim=-1, descending=True)
        self.live = values >= 0
        taken = values.clamp(min=0)
        self.before = base + taken.cumsum(-1) - taken  # mass kept before each ranked entry

    def __call__(self, threshold: float) -> torch.Tensor:
        take = (self.before < threshold * self.total) & self.live
        return torch.zeros_like(take).scatter(-1, self.order, take) | self.forced


def cover_threshold(scores: torch.Tensor, threshold: float, forced: torch.Tensor | None = None,
                    allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask like ``scores`` (…, n) of the smallest set per row reaching ``threshold`` × the
    row's total mass (over ``allowed`` entries): ``forced`` entries always, then the largest
    others in descending order, each taken while the mass before it is below the requirement."""
    return ThresholdCover(scores, forced, allowed)(threshold)
