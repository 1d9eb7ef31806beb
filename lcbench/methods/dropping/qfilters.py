"""Q-Filters: score keys by their projection on the principal direction of the queries.

Godey et al., "Q-Filters: Leveraging QK Geometry for Efficient KV Cache Compression"
(arXiv:2503.02812). For each KV head the queries (post-RoPE, all query heads of its group) share
a privileged direction u — the first right singular vector of the query matrix, oriented so
that E⟨q, u⟩ > 0 — and ⟨q, k⟩ ≈ ⟨q, u⟩⟨k, u⟩, so keys with a large ⟨k, u⟩ draw attention and are
kept. The published filters are downloaded from the Hugging Face hub; lcbench estimates them on
the fly instead: from the queries of the compressing passes of the first
``calibration_samples`` samples of a run (accumulated ``QᵀQ``), then frozen. With 0 they are
re-estimated from every sample's own context.
"""

import torch

from ...params import Param
from ..base import Needs
from .scoring import ScoringDrop
from .select import context_slots


class QFilters(ScoringDrop):
    name = "qfilters"
    family = "kv_dropping"
    paper = ("Godey et al., Q-Filters: Leveraging QK Geometry for Efficient KV Cache Compression "
             "(arXiv:2503.02812)")
    summary = "project keys on the principal direction of the queries (filters estimated on the fly)"
    defaults = {"calibration_samples": 1}
    needs = Needs(queries=True)
    params = (Param("calibration_samples", int, None, "samples whose queries estimate the filters (0: every sample)", min=0),)

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        self._gram: dict[int, torch.Tensor] = {}  # per layer: (H_kv, D, D) Σ qqᵀ
        self._sum: dict[int, torch.Tensor] = {}  # per layer: (H_kv, D) Σ q
        self._samples = 0

    @property
    def cross_sample_state(self) -> bool:
        """Filters calibrated on earlier samples carry over unless ``calibration_samples=0``."""
        return self.args["calibration_samples"] != 0

    def begin_sample(self):
        self._samples += 1
        if self.args["calibration_samples"] == 0:
            self._gram.clear()
            self._sum.clear()

    def calibrating(self) -> bool:
        limit = self.args["calibration_samples"]
        return limit == 0 or self._samples <= limit or not self._gram

    def filters(self, layer_idx: int) -> torch.Tensor:
        """(H_kv, D) unit filters of a layer from the statistics gathered so far."""
        _, vectors = torch.linalg.eigh(self._gram[layer_idx])
        u = vectors[..., -1]  # top eigenvector of QᵀQ = first right singular vector of Q
        sign = torch.sign((u * self._sum[layer_idx]).sum(-1, keepdim=True))
        return u * torch.where(sign == 0, torch.ones_like(sign), sign)

    def scores(self, layer, seen):
        keys, _ = layer.dense()
        b, h, _, d = keys.shape
        if self.calibrating():
            q = seen.queries.float().reshape(b, h, -1, d)  # a KV head's query heads, stacked
            gram = torch.einsum("bhnd,bhne->hde", q, q)
            total = q.sum(dim=(0, 2))
            i = seen.layer_idx
            self._gram[i] = self._gram[i] + gram if i in self._gram else gram
            self._sum[i] = self._sum[i] + total if i in self._sum else total
        u = self.filters(seen.layer_idx).to(keys.device)
        n = context_slots(layer, seen)
        return (keys[:, :, :n].float() * u[None, :, None, :]).sum(-1)
