"""Random eviction: the floor every scoring method must beat (kvpress's RandomPress baseline)."""

import torch

from ...params import Param
from ..presets import from_preset
from .scoring import ScoringDrop


@from_preset("kv_dropping.toml")
class RandomDrop(ScoringDrop):
    """Keeps a uniformly random subset of the context tokens per KV head (seeded per sample)."""

    name = "random"
    params = (Param("seed", int, None, "seed of the random scores"),)

    def begin_sample(self):
        self._gen = torch.Generator().manual_seed(self.args["seed"])

    def scores(self, layer, seen):
        if not hasattr(self, "_gen"):
            self.begin_sample()
        b, h, _ = layer.positions.shape
        return torch.rand((b, h, seen.context_length), generator=self._gen).to(layer.positions.device)
