"""SnapKV: keep the context tokens the last window of queries attends to.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024
(arXiv:2404.14469). Scores: attention of the last ``window_size`` prompt queries to each key,
summed over the window, max-pooled over ``kernel_size`` neighbours, averaged over the query
heads of each KV group (GQA); top-k per KV head; the window itself is always kept.
"""

import torch
import torch.nn.functional as F

from ...params import Param
from ..base import Needs, Stage
from .select import group_mean, keep_top


class SnapKV(Stage):
    name = "snapkv"
    family = "kv_dropping"
    summary = "window-of-last-queries attention, pooled, top-k per KV head"
    paper = "Li et al., SnapKV: LLM Knows What You are Looking for Before Generation, NeurIPS 2024 (arXiv:2404.14469)"
    stages = ("cache",)
    params = (
        Param("window_size", int, 64, "last prompt queries whose attention scores the keys"),
        Param("kernel_size", int, 5, "max-pooling width over neighbouring keys"),
    )

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        self.needs = Needs(window=self.args["window_size"])

    def compress_layer(self, layer, seen):
        attn = seen.window_attention  # (B, Hq, w, L)
        n = seen.context_length
        w = attn.shape[2]
        scores = attn[..., :n].sum(2)  # (B, Hq, n)
        k = self.args["kernel_size"]
        if k > 1:
            scores = F.max_pool1d(scores, kernel_size=k, padding=k // 2, stride=1)[..., :n]
        scores = group_mean(scores, seen.num_groups)
        if not seen.protected:  # query-agnostic: the observation window is the context's tail
            scores[..., max(0, n - w):] = float("inf")
        return keep_top(layer, scores, self.ratio, seen)
