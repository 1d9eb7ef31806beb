"""Key-norm eviction.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
EMNLP 2024 (arXiv:2406.11430): keys with a *low* L2 norm draw high attention, so the tokens
with the lowest key norm are kept (score = −‖k‖₂, computed in float32).
"""

import torch

from ..presets import from_preset
from .scoring import ScoringDrop
from .select import context_slots


@from_preset("kv_dropping.toml")
class KNorm(ScoringDrop):
    name = "knorm"

    def scores(self, layer, seen):
        keys, _ = layer.dense()
        n = context_slots(layer, seen)
        return -torch.linalg.vector_norm(keys[:, :, :n].float(), dim=-1)
