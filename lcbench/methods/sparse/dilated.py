"""Dilated and strided sparse prefill: attention sinks plus a dilated local window.

The two static baselines of MInference (Jiang et al., NeurIPS 2024, arXiv:2407.02490, Table 2:
"StreamingLLM w/ dilated" and "StreamingLLM w/ strided"); upstream ``attn_type`` ``dilated1`` and
``dilated2`` in github.com/microsoft/MInference (``minference/modules/minference_forward.py``,
``dialted``), read at commit fb56c917f618e8645f1cfc37535afd7424d78f0d. The dilated window follows
Longformer's dilated sliding window (Beltagy et al., arXiv:2004.05150) and LongNet's dilated
attention (Ding et al., arXiv:2307.02486); the strided variant Sparse Transformer's strided
pattern (Child et al., arXiv:1904.10509).

- ``variant=dilated`` (``dilated1``: 1K initial tokens + an 8K local window with interval 1):
  every query attends the sink tokens and, within a local span, every ``(interval + 1)``-th
  diagonal.
- ``variant=strided`` (``dilated2``: 1K initial + 2K dense local + 4K more local with interval 1):
  sinks, a dense local window of a third of the span, then dilated diagonals out to the span.

lcbench dilates at block granularity (upstream at token granularity, via its vertical-slash
kernel): key block j is attended by query block i when i − j is a multiple of ``interval + 1``
within the span, so the block kernel skips the work it leaves out; the diagonal block is always
computed. The span is sized from ``--ratio`` for the densest pattern within ``1 − ratio``; the
dilated variant computes at most about ``1 / (interval + 1)`` of the pairs, so a density target
above what its widest span reaches (beyond the tolerance) is refused with the ratio it can meet.
"""

from __future__ import annotations

import math

import torch

from ...errors import CompressionShortfall
from ...params import Param
from .kernel import BlockPattern
from .prefill import BLOCK_SIZE, SparsePrefill, densest_within


def dilated_blocks(nb: int, sink_blocks: int, span_blocks: int, dense_blocks: int, interval: int,
                   device=None) -> torch.Tensor:
    """(nb, nb) bool: sink blocks, block offsets below ``dense_blocks``, and offsets below
    ``span_blocks`` that are multiples of ``interval + 1``; causal."""
    i = torch.arange(nb, device=device)[:, None]
    j = torch.arange(nb, device=device)[None, :]
    d = i - j
    keep = (j < sink_blocks) | (d < dense_blocks) | ((d < span_blocks) & (d % (interval + 1) == 0))
    return keep & (d >= 0)


class Dilated(SparsePrefill):
    name = "dilated"
    family = "sparse_attention"
    paper = ("Jiang et al., MInference 1.0 (baselines StreamingLLM w/ dilated and w/ strided), NeurIPS 2024 "
             "(arXiv:2407.02490); dilated window: Beltagy et al., Longformer (arXiv:2004.05150), Ding et al., "
             "LongNet (arXiv:2307.02486); strided: Child et al., Sparse Transformers (arXiv:1904.10509)")
    summary = "sinks + a dilated local window (variant=dilated) or dense local + dilated beyond (variant=strided)"
    tolerance = 0.05
    defaults = {"block_size": 64, "sink_tokens": 64}
    params = (
        BLOCK_SIZE,
        Param("sink_tokens", int, None, "initial tokens every query attends (upstream 1024)", min=0),
        Param("variant", str, "dilated", "dilated: sinks + dilated window; strided: sinks + dense local + dilated",
              choices=("dilated", "strided")),
        Param("interval", int, 1, "blocks skipped between attended ones (upstream 1)", min=1),
    )

    def pattern(self, query, key, groups, scaling):
        B, Hkv, L, _ = key.shape
        bs = self.args["block_size"]
        nb = math.ceil(L / bs)
        sink = math.ceil(self.args["sink_tokens"] / bs)
        strided = self.args["variant"] == "strided"
        step = self.args["interval"]

        def build(span: float) -> BlockPattern:
            span = int(span)
            dense = max(1, round(span / 3)) if strided else 1  # upstream dilated2: 2K dense of a 6K span
            blocks = dilated_blocks(nb, sink, span, dense, step, key.device)
            return BlockPattern(blocks[None, None].expand(B, Hkv, nb, nb), bs, L, window=self.window)

        target = self.target_density()
        pattern = densest_within(target, build, 1, (step + 1) * nb, integer=True)
        if pattern.density() < target - self.tolerance:  # even the widest span is sparser than asked
            raise CompressionShortfall(
                f"method 'dilated' (variant={self.args['variant']}, interval={step}) computes at most "
                f"{pattern.density():.3f} of the attention pairs at {L} tokens (one block diagonal in {step + 1}), "
                f"but --ratio {self.ratio} asks for density {target:.3f}. Fix: request "
                f"--ratio >= {1 - pattern.density() - self.tolerance:.2f}, or use variant=strided (its dense "
                f"local window reaches higher densities).")
        return pattern
