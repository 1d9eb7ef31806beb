"""Compressing each sample of a cross-sample prefill as if it were alone.

When several samples' contexts are prefilled together (left-padded rows), the compressing pass
splits each layer back into its rows and runs *that sample's own copies* of the chain's cache
stages on its unpadded row with the observations it would have made alone
(:class:`PerRowCompression`), so budgets, pooling edges, quantization groups and per-sample state
are those of a one-sample run; the kept rows are stacked again (:mod:`.row_stack`).
"""

from __future__ import annotations

import copy

import torch

from ..methods.base import LayerObservation, Needs, Stage
from ..methods.budget import compress
from .row_stack import row_layers, stack_rows


def row_observation(seen: LayerObservation, row: int, offset: int, length: int, needs: Needs) -> LayerObservation:
    """What row ``row`` (its ``length`` real tokens start at slot ``offset``) would have observed
    alone: its keys only, and the last ``min(window, length)`` window queries."""
    window = min(needs.window, length) if needs.window else None

    def own(t: torch.Tensor | None, keys_last: bool = False, queries_dim: int | None = None):
        if t is None:
            return None
        t = t[row:row + 1]
        if keys_last:
            t = t[..., offset:]
        if queries_dim is not None and window is not None:
            t = t.narrow(queries_dim, t.shape[queries_dim] - window, window)
        return t

    return LayerObservation(
        layer_idx=seen.layer_idx, num_layers=seen.num_layers, num_groups=seen.num_groups,
        context_length=length - seen.protected, protected=seen.protected,
        window_attention=own(seen.window_attention, keys_last=True, queries_dim=2),
        window_queries=own(seen.window_queries, queries_dim=2),
        attention_sum=own(seen.attention_sum, keys_last=True),
        queries=None if seen.queries is None else seen.queries[row:row + 1, :, offset:],
        extra=dict(seen.extra), module=seen.module,
        positions=None if seen.positions is None else seen.positions[row:row + 1, offset:])


class PerRowCompression(Stage):
    """The cache stage of a cross-sample prefill: splits each layer into its samples' rows, runs
    each sample's own copies of the chain's cache stages on its row, and stacks the results."""

    name = "per-row"
    stages = ("cache",)

    def __init__(self, row_stages: list[list[Stage]], lengths: list[int], needs: Needs):
        super().__init__(0.0)
        self.row_stages = row_stages
        self.lengths = lengths
        self.needs = needs

    def compress_layer(self, layer, seen):
        width = layer.seq_len()
        rows = row_layers(layer)
        kept = []
        for j, (stages, n) in enumerate(zip(self.row_stages, self.lengths)):
            n = min(n, width)  # a sliding-window layer kept only its last `width` slots (engine/attention.py)
            row, row_seen = rows[j], row_observation(seen, j, width - n, n, self.needs)
            for stage in stages:
                row = compress(stage, row, row_seen)
            kept.append(row)
        return stack_rows(kept)


def fresh_copies(stages: list[Stage]) -> list[Stage]:
    """Per-sample copies of ``stages``, each reset with ``begin_sample`` (state never shared)."""
    out = [copy.deepcopy(stage) for stage in stages]
    for stage in out:
        stage.begin_sample()
    return out
