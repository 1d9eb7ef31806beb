"""Random eviction: the floor every scoring method must beat."""

import torch

from ...params import Param
from ..base import Stage
from .select import keep_top


class RandomDrop(Stage):
    """Keeps a uniformly random subset of the context tokens per KV head (seeded)."""

    name = "random"
    family = "kv_dropping"
    summary = "uniformly random token eviction (a floor)"
    paper = "baseline used by kvpress (NVIDIA, 2024) and most KV-dropping papers"
    stages = ("cache",)
    params = (Param("seed", int, 0, "seed of the random scores"),)

    def begin_sample(self):
        self._gen = torch.Generator().manual_seed(self.args["seed"])

    def compress_layer(self, layer, seen):
        if not hasattr(self, "_gen"):
            self.begin_sample()
        b, h, _ = layer.positions.shape
        scores = torch.rand((b, h, seen.context_length), generator=self._gen).to(layer.positions.device)
        return keep_top(layer, scores, self.ratio, seen)
