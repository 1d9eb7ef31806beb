"""Ada-KV: head-wise adaptive budgets.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference" (arXiv:2407.11550). A layer keeps ``H · k`` tokens in all (``k`` =
the uniform budget of :func:`.select.context_budget`), chosen by one top-k over the scores of *all* its KV heads, so heads
whose attention is concentrated give budget to heads whose attention is spread; every head keeps
at least its ``alpha_safeguard · k`` best tokens. The scorer is another dropping method's score
(SnapKV by default, as in the paper's Ada-SnapKV). Heads then hold different numbers of tokens:
the layer becomes a :class:`~lcbench.cache.ragged.RaggedLayer`, whose stored bytes fall with
the kept tokens (no padding is stored).
"""

import torch

from ...cache.ragged import RaggedLayer
from ...params import Param
from ..base import Stage
from .expected_attention import ExpectedAttention
from .knorm import KNorm
from .select import align, context_budget, context_slots
from .snapkv import KERNEL_SIZE, WINDOW_SIZE, SnapKV
from .tova import TOVA

SCORERS: dict[str, type] = {"snapkv": SnapKV, "tova": TOVA, "knorm": KNorm, "expected_attention": ExpectedAttention}


def headwise_keep(scores: torch.Tensor, k: int, floor: int) -> torch.Tensor:
    """(B, H, n) bool: per row, ``H·k`` slots in all — each head's ``floor`` best, then the best
    of the rest over all heads together."""
    b, h, n = scores.shape
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if floor > 0:
        keep.scatter_(-1, scores.topk(floor, dim=-1).indices, True)
    rest = scores.masked_fill(keep, float("-inf")).reshape(b, h * n)
    extra = h * k - h * floor
    if extra > 0:
        flat = keep.reshape(b, h * n)
        flat.scatter_(-1, rest.topk(extra, dim=-1).indices, True)
        keep = flat.view(b, h, n)
    return keep


class AdaKV(Stage):
    name = "adakv"
    family = "kv_dropping"
    paper = ("Feng et al., Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for "
             "Efficient LLM Inference (arXiv:2407.11550)")
    summary = "head-wise budgets: one top-k over all heads of a layer (with a per-head floor); ragged storage"
    defaults = {"scorer": "snapkv", "alpha_safeguard": 0.2}
    stages = ("cache",)
    params = (
        Param("scorer", str, None, "the per-token scores to allocate over", choices=tuple(SCORERS)),
        Param("alpha_safeguard", float, None, "each head keeps at least this share of the uniform budget", min=0, max=1),
        WINDOW_SIZE,
        KERNEL_SIZE,
    )

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        scorer_cls = SCORERS[self.args["scorer"]]
        accepted = {p.name for p in scorer_cls.params}
        self.scorer = scorer_cls(ratio, **{k: v for k, v in self.args.items() if k in accepted})
        self.needs = self.scorer.needs

    def begin_sample(self):
        self.scorer.begin_sample()

    def compress_layer(self, layer, seen):
        n = context_slots(layer, seen)
        if self.ratio <= 0 or n <= 1:
            return layer
        scores = align(self.scorer.scores(layer, seen)[..., : seen.context_length], layer, seen).float()
        if layer.valid is not None:
            scores = scores.masked_fill(~layer.valid[..., :n], float("-inf"))
        k = context_budget(layer, seen, self.ratio)
        keep = headwise_keep(scores, k, max(1, int(k * self.args["alpha_safeguard"])))
        tail = torch.ones((*keep.shape[:2], seen.protected), dtype=torch.bool, device=keep.device)
        return RaggedLayer.from_layer(layer, torch.cat([keep, tail], dim=-1))
