"""Expected Attention: score each token by the attention *future* queries are expected to pay it.

Devoto, Jeblick & Jégou, "Expected Attention: KV Cache Compression by Estimating Attention from
Future Queries Distribution" (arXiv:2510.00636; kvpress's ExpectedAttentionPress). The context's
pre-RoPE queries (sinks left out) are modelled as a Gaussian (mean μ, covariance Σ per query
head); the RoPE rotation averaged over the next ``n_future_positions`` positions, R̄, carries
them to the future: μ' = R̄μ, Σ' = R̄ΣR̄ᵀ. For a key k, E[exp(q·k/√d)] ∝ exp(μ'·k/√d +
kᵀΣ'k/2d); these are normalized over the keys (softmax), averaged over each KV group's query
heads and multiplied by the value norm ‖v‖ (``use_vnorm``). The first ``n_sink`` tokens are kept.
"""

import math

import torch

from ...params import Param
from ..base import Needs
from .rope import cos_sin, rotate, unrotate
from .scoring import ScoringDrop
from .select import context_slots, force_keep, group_mean, query_positions


def averaged_rotation(module, start: int, count: int, like: torch.Tensor) -> torch.Tensor:
    """(D, D) matrix M with ``x @ M`` = RoPE rotation averaged over positions start … start+count−1."""
    positions = torch.arange(start, start + count, device=like.device)
    cos, sin = cos_sin(module, positions, like)
    eye = torch.eye(like.shape[-1], device=like.device)
    return rotate(eye, cos.mean(0), sin.mean(0))


class ExpectedAttention(ScoringDrop):
    name = "expected_attention"
    family = "kv_dropping"
    paper = ("Devoto et al., Expected Attention: KV Cache Compression by Estimating Attention from "
             "Future Queries Distribution (arXiv:2510.00636)")
    summary = ("attention expected from future queries (Gaussian query statistics, averaged RoPE), times "
               "value norm")
    defaults = {
        "n_future_positions": 512,
        "n_sink": 4,
        "use_covariance": True,
        "use_vnorm": True,
        "epsilon": 0.0,
    }
    needs = Needs(queries=True)
    params = (
        Param("n_future_positions", int, None, "future positions the RoPE rotation is averaged over", min=0),
        Param("n_sink", int, None, "initial tokens kept and left out of the query statistics", min=0),
        Param("use_covariance", bool, None, "include the query covariance term"),
        Param("use_vnorm", bool, None, "multiply the scores by the value norms"),
        Param("epsilon", float, None, "added to the scores before the value-norm rescaling", min=0),
    )

    def scores(self, layer, seen):
        sink = self.args["n_sink"]
        queries = seen.queries.float()  # (B, Hq, q, D) after RoPE
        cos, sin = cos_sin(seen.module, query_positions(seen, queries.device), queries)
        pre = unrotate(queries, cos, sin)[:, :, sink:]
        mean = pre.mean(2)  # (B, Hq, D)
        total = seen.context_length + seen.protected
        rot = averaged_rotation(seen.module, total, self.args["n_future_positions"], queries)
        mean = mean @ rot
        keys, values = layer.dense()
        n = context_slots(layer, seen)
        d = keys.shape[-1]
        k = keys[:, :, sink:n].float().repeat_interleave(seen.num_groups, dim=1)  # (B, Hq, m, D)
        logits = (k @ mean[..., None])[..., 0] / math.sqrt(d)
        if self.args["use_covariance"]:
            centered = pre - pre.mean(2, keepdim=True)
            cov = centered.transpose(-1, -2) @ centered / max(1, pre.shape[2])
            cov = rot.T @ cov @ rot
            logits = logits + ((k @ cov) * k).sum(-1) / d / 2
        scores = group_mean(logits.softmax(-1), seen.num_groups)
        if self.args["use_vnorm"]:
            scores = (scores + self.args["epsilon"]) * values[:, :, sink:n].float().norm(dim=-1)
        scores = torch.cat([scores.new_zeros(*scores.shape[:2], min(sink, n)), scores], dim=-1)
        return force_keep(scores, 0, sink)
