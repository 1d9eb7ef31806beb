"""XAttention: block-sparse prefill whose blocks are scored by antidiagonal sums.

Xu et al., "XAttention: Block Sparse Attention with Antidiagonal Scoring", ICML 2025
(arXiv:2503.16428); official implementation github.com/mit-han-lab/x-attention, read at commit
e37988770b9d1bebd489eba011d615f35587ba08 (``xattn/src/Xattention.py:xattn_estimate``,
``xattn/src/utils.py:find_blocks_chunked``).

Every ``stride × stride`` tile of the attention matrix is summarised by its antidiagonal: query
``i·S + S−1−s`` against key ``j·S + s`` for s = 0…S−1 (upstream's ``inverse`` mode: keys strided
``k::S`` and queries ``S−1−q::S`` concatenated along the head dimension, so one matmul gives every
tile's antidiagonal sum). An antidiagonal crosses every row and column of its tile once, so both
vertical lines and slash diagonals raise it. The tile scores, scaled by ``scaling / S``, are
softmaxed over the (causal) tiles of each strided query row and summed into ``block_size`` blocks;
each query block keeps the first (sink) block and its diagonal block, then the highest-scoring
others until their cumulative share reaches ``threshold`` of the row's mass (the smallest such
set). ``--ratio`` sets the density target ``1 − r``; the threshold is searched for the densest
pattern within it (upstream fixes the threshold per model, 0.9 by default).

lcbench deviation: upstream estimates and selects per query head (KV heads repeated); here the
block scores are averaged over the query heads of each KV head, as lcbench's other patterns do,
so one gathered key set serves the group (:mod:`.kernel`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import UserError
from ...params import Param
from .kernel import BlockPattern
from .prefill import BLOCK_SIZE, SparsePrefill, densest_within
from .select import ThresholdCover


def antidiagonal_block_scores(query: torch.Tensor, key: torch.Tensor, groups: int, scaling: float,
                              block_size: int, stride: int, window: int | None = None) -> torch.Tensor:
    """(B, Hkv, nb, nb): per block pair, the softmaxed antidiagonal tile scores summed over the
    block (each strided query row's causal tiles sum to 1), averaged over each KV head's query heads."""
    B, Hq, L, D = query.shape
    Hkv = key.shape[1]
    nb = math.ceil(L / block_size)
    n = nb * block_size // stride  # strided rows (tiles per side)
    pad = nb * block_size - L
    q = F.pad(query.float(), (0, 0, 0, pad)) if pad else query.float()
    k = F.pad(key.float(), (0, 0, 0, pad)) if pad else key.float()
    k_r = torch.cat([k[:, :, s::stride] for s in range(stride)], dim=-1)  # (B, Hkv, n, S·D)
    q_r = torch.cat([q[:, :, stride - 1 - s::stride] for s in range(stride)], dim=-1)  # (B, Hq, n, S·D)
    q_r = q_r.reshape(B, Hkv, groups, n, stride * D)
    per = block_size // stride
    out = torch.zeros(B, Hkv, nb, nb, device=query.device)
    tile = torch.arange(n, device=query.device)
    real_tiles = math.ceil(L / stride)  # tiles holding at least one real key
    for start in range(0, n, 4096):  # bounded memory: strided rows in chunks
        rows = tile[start:start + 4096]
        s = torch.einsum("bhgid,bhjd->bhgij", q_r[:, :, :, rows], k_r) * (scaling / stride)
        hidden = (tile[None, :] > rows[:, None]) | (tile[None, :] >= real_tiles)
        if window is not None:  # a tile wholly outside the window holds no visible pair
            hidden = hidden | ((rows[:, None] - tile[None, :]) * stride >= window + stride - 1)
        p = s.masked_fill(hidden, float("-inf")).softmax(-1)
        p = p.masked_fill((rows >= real_tiles)[:, None], 0.0)  # padded query rows carry no mass
        p = p.mean(2)  # (B, Hkv, r, n)
        r = p.shape[2]
        p = p.reshape(B, Hkv, r // per, per, nb, per).sum((3, 5))
        out[:, :, start // per:start // per + r // per] = p
    return out


class XAttention(SparsePrefill):
    name = "xattention"
    family = "sparse_attention"
    paper = ("Xu et al., XAttention: Block Sparse Attention with Antidiagonal Scoring, ICML 2025 "
             "(arXiv:2503.16428)")
    summary = "blocks chosen by antidiagonal tile sums until a cumulative-mass threshold (searched from --ratio)"
    tolerance = 0.05
    defaults = {"block_size": 64, "stride": 8}
    params = (BLOCK_SIZE, Param("stride", int, None, "antidiagonal tile size (upstream 8 or 16); divides block_size", min=1))

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        if self.args["block_size"] % self.args["stride"]:
            raise UserError(f"method 'xattention': stride={self.args['stride']} does not divide "
                            f"block_size={self.args['block_size']}; each block must hold whole "
                            f"antidiagonal tiles. Fix: pick a stride that divides the block size (e.g. 8 with 64).")

    def block_scores(self, query, key, groups, scaling) -> torch.Tensor:
        return antidiagonal_block_scores(query, key, groups, scaling, self.args["block_size"], self.args["stride"],
                                         self.window)

    def pattern(self, query, key, groups, scaling):
        cover = self.ranking(self.block_scores(query, key, groups, scaling))
        return densest_within(self.target_density(), lambda t: self.select(cover, t, key.shape[2]),
                              0.0, 1.0, integer=False)

    @staticmethod
    def ranking(scores: torch.Tensor) -> ThresholdCover:
        """Each query block's causal blocks ranked by score, the sink and diagonal blocks forced."""
        nb = scores.shape[-1]
        i = torch.arange(nb, device=scores.device)[:, None]
        j = torch.arange(nb, device=scores.device)[None, :]
        return ThresholdCover(scores, (j == 0) | (j == i), j <= i)

    def select(self, cover: ThresholdCover, threshold: float, length: int) -> BlockPattern:
        """Per query block: the sink and diagonal blocks, then the fewest highest-scoring causal
        blocks whose cumulative share of the row's mass reaches ``threshold``."""
        return BlockPattern(cover(threshold), self.args["block_size"], length, window=self.window)
