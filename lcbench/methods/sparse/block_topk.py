"""Block-sparse top-k prefill: each query block attends the key blocks with the highest pooled scores.

The estimate is the one block-sparse prefill methods share (MInference's ``block_sparse``
pattern, Jiang et al., arXiv:2407.02490; FlexPrefill, SeerAttention refine it): mean-pool the
queries and keys of every block, score block pairs by the pooled dot product (averaged over the
query heads of each KV head), and let query block i keep, besides its diagonal block and the first
(sink) block, its top ``⌈ρ·(i+1)⌉`` causal key blocks; ρ is searched so the density meets
``1 − ratio``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kernel import BlockPattern
from .prefill import BLOCK_SIZE, SparsePrefill, densest_within


def pooled_block_scores(query: torch.Tensor, key: torch.Tensor, groups: int, block_size: int) -> torch.Tensor:
    """(B, Hkv, nb, nb) pooled query-block · key-block scores, averaged over each KV head's query heads."""
    B, Hq, L, D = query.shape
    nb = math.ceil(L / block_size)
    pad = nb * block_size - L
    sizes = torch.full((nb,), float(block_size), device=query.device)
    sizes[-1] = block_size - pad

    def pool(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x.float(), (0, 0, 0, pad)) if pad else x.float()
        return x.reshape(x.shape[0], x.shape[1], nb, block_size, D).sum(3) / sizes[:, None]

    q, k = pool(query), pool(key)  # (B, Hq, nb, D), (B, Hkv, nb, D)
    q = q.reshape(B, Hq // groups, groups, nb, D)
    return torch.einsum("bhgid,bhjd->bhij", q, k) / groups


class BlockTopK(SparsePrefill):
    name = "block_topk"
    family = "sparse_attention"
    paper = "Jiang et al., MInference 1.0 (block-sparse pattern), NeurIPS 2024 (arXiv:2407.02490)"
    summary = "per query block, the top key blocks by mean-pooled block scores"
    tolerance = 0.05
    defaults = {"block_size": 64}
    params = (BLOCK_SIZE,)

    def pattern(self, query, key, groups, scaling):
        B, Hkv, L, _ = key.shape
        bs = self.args["block_size"]
        nb = math.ceil(L / bs)
        scores = pooled_block_scores(query, key, groups, bs)
        i = torch.arange(nb, device=key.device)[:, None]
        j = torch.arange(nb, device=key.device)[None, :]
        scores = scores.masked_fill(j > i, float("-inf"))
        scores = scores.masked_fill((j == i) | (j == 0), float("inf"))
        rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)  # rank of block j in row i
        row = torch.arange(1, nb + 1, device=key.device, dtype=torch.float32)[:, None]
        forced = torch.where(row > 1, 2.0, 1.0)  # the diagonal and the sink block rank first

        def build(rho: float) -> BlockPattern:
            keep = forced + torch.ceil(rho * row)
            return BlockPattern((rank < keep) & (j <= i), bs, L, window=self.window)

        return densest_within(self.target_density(), build, 0.0, 1.0, integer=False)
