"""Static sparse-prefill patterns: A-shape and Tri-shape.

A-shape: every query attends the attention-sink tokens at the start and a local window of recent
tokens (StreamingLLM's pattern applied in prefill, as MInference's ``a_shape`` and SCBench
evaluate it). Tri-shape (SCBench, Li et al., arXiv:2412.10319) adds dense attention for the last
queries, so the tokens nearest to the question/answer see the whole context. The window is sized
from ``--ratio`` (density target ``1 − r``) at block granularity.
"""

from __future__ import annotations

import math

import torch

from ...params import Param
from .kernel import BlockPattern
from .prefill import BLOCK_SIZE, SparsePrefill, densest_within


def ashape_blocks(nb: int, sink_blocks: int, local_blocks: int, dense_last_blocks: int = 0,
                  device=None) -> torch.Tensor:
    """(nb, nb) bool: key block j is attended by query block i if j is a sink block, within the
    ``local_blocks`` most recent blocks, or i is one of the ``dense_last_blocks`` last blocks."""
    i = torch.arange(nb, device=device)[:, None]
    j = torch.arange(nb, device=device)[None, :]
    keep = (j < sink_blocks) | (i - j < local_blocks) | (i >= nb - dense_last_blocks)
    return keep & (j <= i)


class AShape(SparsePrefill):
    name = "ashape"
    family = "sparse_attention"
    paper = ("Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024 "
             "(arXiv:2309.17453); as a prefill pattern: Jiang et al., MInference 1.0, NeurIPS 2024 "
             "(arXiv:2407.02490)")
    summary = "prefill attends attention sinks + a local window (window sized from --ratio)"
    tolerance = 0.05
    defaults = {"block_size": 64, "sink_tokens": 64}
    params = (BLOCK_SIZE, Param("sink_tokens", int, None, "initial tokens every query attends (attention sinks)", min=0))

    def dense_last_blocks(self, length: int) -> int:
        return 0

    def pattern(self, query, key, groups, scaling):
        B, Hkv, L, _ = key.shape
        bs = self.args["block_size"]
        nb = math.ceil(L / bs)
        sink = math.ceil(self.args["sink_tokens"] / bs)
        last = self.dense_last_blocks(L)

        def build(local: float) -> BlockPattern:
            blocks = ashape_blocks(nb, sink, int(local), last, key.device)
            return BlockPattern(blocks[None, None].expand(B, Hkv, nb, nb), bs, L, window=self.window)

        return densest_within(self.target_density(), build, 1, nb, integer=True)


class TriShape(AShape):
    name = "trishape"
    family = "sparse_attention"
    paper = ("Li et al., SCBench: A KV Cache-Centric Analysis of Long-Context Methods, ICLR 2025 "
             "(arXiv:2412.10319)")
    summary = "A-shape prefill plus dense attention for the last queries"
    tolerance = 0.05
    defaults = {"block_size": 64, "sink_tokens": 64, "last_queries": 64}
    params = AShape.params + (Param("last_queries", int, None, "last queries that attend densely", min=0),)

    def dense_last_blocks(self, length: int) -> int:
        return math.ceil(self.args["last_queries"] / self.args["block_size"])
