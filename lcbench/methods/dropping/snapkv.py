"""SnapKV: keep the context tokens the last window of queries attends to.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024
(arXiv:2404.14469). Scores: attention of the last ``window_size`` prompt queries to each key
outside the window, averaged over the window, pooled over ``kernel_size`` neighbours (average
pooling, the reference implementation's default; ``pooling=max`` is its other option), averaged
over the query heads of each KV group (GQA); top-k per KV head. The window is always kept.
"""

import torch
import torch.nn.functional as F

from ...params import Param
from ..base import Needs
from .scoring import ScoringDrop
from .select import group_mean


def window_scores(seen, window: int, kernel: int, pooling: str) -> torch.Tensor:
    """SnapKV's scores (B, H_kv, n) of the context slots; slots inside the window score +inf."""
    attn = seen.window_attention  # (B, Hq, w', L), w' ≥ window
    n = seen.context_length
    total = n + seen.protected
    w = min(window, attn.shape[2])
    m = max(0, min(n, total - w))  # candidate slots: context before the window
    scores = attn[:, :, -w:, :m].float().mean(2)  # (B, Hq, m)
    if kernel > 1 and m > 0:
        pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
        scores = pool(scores, kernel_size=kernel, padding=kernel // 2, stride=1)[..., :m]
    scores = group_mean(scores, seen.num_groups)
    inside = scores.new_full((*scores.shape[:2], n - m), float("inf"))
    return torch.cat([scores, inside], dim=-1)


# SnapKV's observation window and pooling, with the paper's defaults; methods that score with
# SnapKV's attention reuse these declarations (and their defaults) instead of repeating them
WINDOW_SIZE = Param("window_size", int, 64, "last prompt queries whose attention scores the keys", min=1)
KERNEL_SIZE = Param("kernel_size", int, 5, "pooling width over neighbouring keys", min=1)
POOLING = Param("pooling", str, "avg", "pooling of the scores: avg or max", choices=("avg", "max"))
SNAPKV_PARAMS = (WINDOW_SIZE, KERNEL_SIZE, POOLING)


class SnapKV(ScoringDrop):
    name = "snapkv"
    family = "kv_dropping"
    latent_cache = True  # selects slots by the observation / quantizes the cached numbers (MLA latents too)
    paper = ("Li et al., SnapKV: LLM Knows What You are Looking for Before Generation, NeurIPS 2024 "
             "(arXiv:2404.14469)")
    summary = "attention of the last window of queries, pooled, top-k per KV head; the window is kept"
    params = SNAPKV_PARAMS

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        self.needs = Needs(window=self.args["window_size"])

    def scores(self, layer, seen):
        return window_scores(seen, self.args["window_size"], self.args["kernel_size"], self.args["pooling"])
