"""LagKV: score each stretch of the context against the stretch that follows it.

Liang et al., "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important"
(arXiv:2504.04704). After ``n_sink`` sink tokens the context is cut into partitions of
``lag_size`` tokens; each partition is scored against the *next* one (its lag reference): every
key and value channel is min-max normalized by the reference partition's range, a token's score is
the spread (standard deviation over channels) of its normalized key and of its normalized value,
softmaxed within the partition and averaged over keys and values. Tokens are then ranked within
their partition (every partition competes for the budget on the same footing); the sinks and the
last, reference-less stretch (one partition plus the remainder) are always kept first. A context
shorter than ``n_sink + 2·lag_size`` has no partition to score: the sinks and then the most recent
tokens are kept. Read against kvpress 0.5.5 ``kvpress/presses/lagkv_press.py`` (LagKVPress,
``cross_scoring=False``), whose positions this method keeps exactly (tests/test_kvpress_presses.py).
"""

import torch

from ...params import Param
from .scoring import ScoringDrop
from .select import context_slots


def lag_spread(x: torch.Tensor) -> torch.Tensor:
    """(B, H, P, lag, D) partitions → (B, H, P−1, lag): each partition but the last normalized by the
    channel range of the next, spread over channels, softmaxed over the partition's tokens."""
    ref, part = x[:, :, 1:], x[:, :, :-1]
    lo, hi = ref.amin(dim=-2, keepdim=True), ref.amax(dim=-2, keepdim=True)
    return ((part - lo) / (hi - lo)).std(dim=-1).softmax(dim=-1)


def lagkv_scores(keys: torch.Tensor, values: torch.Tensor, n_sink: int, lag: int) -> torch.Tensor:
    """(B, H, n) LagKV scores of keys/values (B, H, n, D): ranks in [0, 1) within each scored
    partition, 1 for the sinks and the unscored tail."""
    b, h, n, d = keys.shape
    if n < n_sink + 2 * lag:  # nothing to score: the sinks, then recency
        scores = torch.ones((b, h, n), device=keys.device)
        if n > n_sink:
            scores[..., n_sink:] = torch.arange(n - n_sink, device=keys.device) / (n - n_sink)
        return scores
    end = n_sink + (n - n_sink) // lag * lag  # partitions [n_sink, end); the last one is only a reference
    body = slice(n_sink, end)
    shape = (b, h, -1, lag, d)
    spread = (lag_spread(keys[:, :, body].float().reshape(shape))
              + lag_spread(values[:, :, body].float().reshape(shape))) / 2
    ranks = spread.argsort(dim=-1).argsort(dim=-1).float() / lag  # rank within the partition
    scores = torch.ones((b, h, n), device=keys.device)
    scores[..., n_sink: end - lag] = ranks.reshape(b, h, -1)
    return scores


class LagKV(ScoringDrop):
    name = "lagkv"
    family = "kv_dropping"
    paper = ("Liang et al., LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important "
             "(arXiv:2504.04704)")
    summary = "min-max normalize each partition by the next one; keep the tokens with the widest spread"
    params = (
        Param("n_sink", int, 4, "initial tokens always kept (attention sinks)", min=0),
        Param("lag_size", int, 128, "tokens per partition (each scored against the next)", min=2),
    )

    def scores(self, layer, seen):
        keys, values = layer.dense()
        n = context_slots(layer, seen)
        return lagkv_scores(keys[:, :, :n], values[:, :, :n], self.args["n_sink"], self.args["lag_size"])
