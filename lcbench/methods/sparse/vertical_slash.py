"""Vertical-slash sparse prefill, after MInference (Jiang et al., NeurIPS 2024, arXiv:2407.02490).

The pattern is estimated from the last ``last_queries`` queries: their attention over all keys
(causal), summed over those queries, scores every key column (*vertical* lines) and, summed along
diagonals, every query−key offset (*slash* lines). The first ``sink_columns`` columns and the
``local_slashes`` nearest diagonals are always taken (MInference forces them the same way; a
target density below what they cost is not met, and the engine's ratio check says so). The
top verticals are computed as single key columns; the top slashes as the key blocks covering
them (offset o covers block-diagonals ⌊o/b⌋ and, if o is not a multiple of b, the next), as
MInference's kernel does. Scores are averaged over the query heads of each KV head (GQA).
The numbers of verticals and slashes keep the ratio ``slash_per_vertical`` and are scaled until the
density meets ``1 − ratio``.
"""

from __future__ import annotations

import math

import torch

from ...params import Param
from .kernel import BlockPattern
from .prefill import BLOCK_SIZE, SparsePrefill, densest_within


def last_query_scores(query: torch.Tensor, key: torch.Tensor, groups: int, scaling: float,
                      last: int, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical (B, Hkv, L) and slash (B, Hkv, L, indexed by offset query−key) scores from the
    attention of the last ``last`` queries, averaged over each KV head's query heads."""
    B, Hq, L, D = query.shape
    Hkv = key.shape[1]
    w = min(last, L)
    q = query[:, :, L - w:].float().reshape(B, Hkv, groups, w, D)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", q, key.float()) * scaling
    rows = torch.arange(L - w, L, device=key.device)[:, None]
    cols = torch.arange(L, device=key.device)[None, :]
    hidden = cols > rows if window is None else (cols > rows) | (cols <= rows - window)
    probs = scores.masked_fill(hidden, float("-inf")).softmax(-1).mean(2)  # (B, Hkv, w, L)
    vertical = probs.sum(2)
    offset = (rows - cols).clamp(min=0).expand(B, Hkv, w, L)
    slash = torch.zeros(B, Hkv, L, device=key.device).scatter_add_(
        2, offset.reshape(B, Hkv, -1), probs.reshape(B, Hkv, -1))
    return vertical, slash


def slash_blocks(offsets: torch.Tensor, nb: int, block_size: int) -> torch.Tensor:
    """(B, Hkv, nb, nb) bool: the key blocks covering the slash lines at ``offsets`` (B, Hkv, S)."""
    B, Hkv, _ = offsets.shape
    diag = torch.zeros(B, Hkv, nb + 1, dtype=torch.bool, device=offsets.device)
    first = offsets // block_size
    diag.scatter_(2, first.clamp(max=nb), True)
    diag.scatter_(2, torch.where(offsets % block_size > 0, first + 1, first).clamp(max=nb), True)
    i = torch.arange(nb, device=offsets.device)[:, None]
    j = torch.arange(nb, device=offsets.device)[None, :]
    gap = (i - j).clamp(min=0)  # block-diagonal index of (i, j)
    return diag[:, :, gap.reshape(-1)].reshape(B, Hkv, nb, nb) & (j <= i)


class VerticalSlash(SparsePrefill):
    name = "vertical_slash"
    family = "sparse_attention"
    paper = ("Jiang et al., MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic "
             "Sparse Attention, NeurIPS 2024 (arXiv:2407.02490)")
    summary = "vertical key columns + slash diagonals estimated from the last queries' attention"
    tolerance = 0.05
    defaults = {
        "block_size": 64,
        "last_queries": 64,
        "sink_columns": 30,
        "local_slashes": 100,
        "slash_per_vertical": 6.096,
    }
    params = (
        BLOCK_SIZE,
        Param("last_queries", int, None, "last queries whose attention estimates the pattern", min=1),
        Param("sink_columns", int, None, "first key columns always attended", min=0),
        Param("local_slashes", int, None, "nearest diagonals always attended", min=0),
        Param("slash_per_vertical", float, None, "slash lines per vertical line (MInference default 6096/1000)", min=0),
    )

    def pattern(self, query, key, groups, scaling):
        B, Hkv, L, _ = key.shape
        bs = self.args["block_size"]
        nb = math.ceil(L / bs)
        vertical, slash = last_query_scores(query, key, groups, scaling, self.args["last_queries"],
                                             self.window)
        vertical[..., : self.args["sink_columns"]] = float("inf")
        slash[..., : self.args["local_slashes"]] = float("inf")
        v_order = vertical.argsort(dim=-1, descending=True)
        s_order = slash.argsort(dim=-1, descending=True)
        per = self.args["slash_per_vertical"]

        def build(scale: float) -> BlockPattern:  # the forced lines always, then the top scored ones
            n_v = min(L, self.args["sink_columns"] + int(round(scale * L)))
            n_s = max(1, min(L, self.args["local_slashes"] + int(round(scale * L * per))))
            blocks = slash_blocks(s_order[..., :n_s], nb, bs)
            columns = v_order[..., :n_v].sort(dim=-1).values
            return BlockPattern(blocks, bs, L, columns, window=self.window)

        return densest_within(self.target_density(), build, 0.0, 1.0, integer=False)
