"""Key-norm eviction.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
EMNLP 2024 (arXiv:2406.11430): keys with a *low* L2 norm draw high attention, so the tokens
with the lowest key norm are kept (score = −‖k‖₂, computed in float32).
"""

import torch

from .scoring import ScoringDrop
from .select import context_slots


class KNorm(ScoringDrop):
    name = "knorm"
    family = "kv_dropping"
    paper = ("Devoto et al., A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression, "
             "EMNLP 2024 (arXiv:2406.11430)")
    summary = "keep the keys with the lowest L2 norm"

    def scores(self, layer, seen):
        keys, _ = layer.dense()
        n = context_slots(layer, seen)
        return -torch.linalg.vector_norm(keys[:, :, :n].float(), dim=-1)
