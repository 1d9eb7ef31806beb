"""The common shape of a token-dropping method: a score per context slot and KV head, then the
shared top-k selection of :mod:`.select` (higher score = kept)."""

from __future__ import annotations

from abc import abstractmethod

import torch

from ...cache.layer import KVLayer
from ..base import LayerObservation, Stage
from .select import keep_top


class ScoringDrop(Stage):
    """Subclasses implement :meth:`scores`; :meth:`budget` may give a layer its own token count."""

    stages = ("cache",)

    @abstractmethod
    def scores(self, layer: KVLayer, seen: LayerObservation) -> torch.Tensor:
        """(B, H_kv, n) importance of the ``n`` context slots of the compressing pass."""

    def budget(self, layer: KVLayer, seen: LayerObservation) -> int | None:
        """Context tokens this layer keeps per head; ``None`` = :func:`.select.context_budget`."""
        return None

    def compress_layer(self, layer: KVLayer, seen: LayerObservation) -> KVLayer:
        if self.ratio <= 0:
            return layer
        return keep_top(layer, self.scores(layer, seen), self.ratio, seen, keep=self.budget(layer, seen))
