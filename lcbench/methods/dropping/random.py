"""Random eviction: the floor every scoring method must beat (kvpress's RandomPress baseline)."""

import torch

from ...params import Param
from .scoring import ScoringDrop


class RandomDrop(ScoringDrop):
    """Keeps a uniformly random subset of the context tokens per KV head (seeded per sample)."""

    name = "random"
    family = "kv_dropping"
    latent_cache = True  # selects slots by the observation / quantizes the cached numbers (MLA latents too)
    paper = "baseline used by kvpress (NVIDIA, 2024) and most KV-dropping papers"
    summary = "uniformly random token eviction (a floor)"
    defaults = {"seed": 0}
    params = (Param("seed", int, None, "seed of the random scores"),)

    def begin_sample(self):
        self._gen = torch.Generator().manual_seed(self.args["seed"])

    def scores(self, layer, seen):
        if not hasattr(self, "_gen"):
            self.begin_sample()
        b, h, _ = layer.positions.shape
        return torch.rand((b, h, seen.context_length), generator=self._gen).to(layer.positions.device)
