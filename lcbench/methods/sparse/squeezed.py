"""Squeezed Attention: k-means clusters of the fixed context's keys; queries attend only the keys
whose cluster's estimated attention clears a calibrated threshold.

Hooper et al., "Squeezed Attention: Accelerating Long Context Length LLM Inference", ACL 2025
(arXiv:2411.09688); official code github.com/SqueezeAILab/SqueezedAttention, read at commit
4a50c64eca2f20232a4e998d754d030ce3a7f6e6 (``squeezedattention/clustering.py``: ``run_clustering``,
``run_global_threshold``; ``run_offline_clustering.sh``).

*Offline* (here: the context pass, before any question): per layer and KV head, the context's keys
— less the last ``observation_window`` tokens — are clustered by k-means on their L2-normalised
values (k-means++, seed 0, as upstream; scikit-learn), ``percent_clusters`` % of them as clusters
(upstream's example: 5); each centroid is the mean of its cluster's raw keys. A key's attention
from a query ``q`` is estimated from its cluster: ``exp(q·c_k/√d) / Σ_j n_j exp(q·c_j/√d)`` (``n_j``
keys in cluster j). One global threshold over all layers and heads is calibrated on the observation
window's queries: the ``ratio`` quantile of their mean estimated scores (upstream saves the 0.5,
0.7, 0.8, 0.9 quantiles; ``--ratio`` picks the quantile, so about that share of the clustered keys
is skipped).

*Online* (question prefill and every decoding step): each query keeps the context keys whose
estimated attention clears the threshold, plus the observation window and everything after the
context. ``threshold=global`` is upstream's calibrated threshold, whose density for the question's
queries can fall far from the calibration's (measured: on a random tiny model, density 0.40 at
ratio 0.75); ``threshold=per_query`` (the default, so ``--ratio`` is met as for every lcbench
method) keeps, per query, the ``1 − ratio`` share of the clustered keys with the highest estimated
attention — the same ranking, the budget per query instead of per model; the whole KV cache is kept (``attention_density`` is what was attended). With grouped
queries a key's estimate for its KV head is the mean over the group's query heads (upstream's
models have one query head per KV head). Upstream's hierarchical (two-level) lookup and kernels are not
reproduced: the selection is applied as a mask over the whole cache (a reference latency).
Layers with the model's own sliding window attend as the model does, counted as dense.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...params import Param
from .retrieval import ContextRetrieval


def kmeans_clusters(keys: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head of ``keys`` (H, n, D): labels (H, n) of a k-means over the L2-normalised keys and
    centroids (H, clusters, D) as the means of each cluster's raw keys (upstream ``run_clustering``)."""
    from sklearn.cluster import KMeans

    labels, centroids = [], []
    for head in keys.float():
        fitted = KMeans(n_clusters=clusters, init="k-means++", max_iter=300, n_init=1, random_state=0).fit(
            F.normalize(head, dim=-1).cpu().numpy())
        lab = torch.as_tensor(fitted.labels_, dtype=torch.long)
        cent = torch.zeros(clusters, head.shape[-1])
        cent.index_add_(0, lab, head.cpu())
        cent /= torch.bincount(lab, minlength=clusters).clamp(min=1)[:, None]
        labels.append(lab)
        centroids.append(cent)
    return torch.stack(labels), torch.stack(centroids)


def estimated_attention(query: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor,
                        scaling: float) -> torch.Tensor:
    """(..., q, clusters) each cluster's estimated per-key attention for queries (..., q, D): the
    softmax over keys with every key replaced by its centroid (upstream ``run_global_threshold``)."""
    s = torch.matmul(query.float(), centroids.transpose(-1, -2)) * scaling
    s = s - s.amax(-1, keepdim=True)  # the same ratio, without overflow
    return s.exp() / (counts[..., None, :] * s.exp()).sum(-1, keepdim=True)


class Squeezed(ContextRetrieval):
    name = "squeezed"
    family = "sparse_attention"
    paper = ("Hooper et al., Squeezed Attention: Accelerating Long Context Length LLM Inference, ACL 2025 "
             "(arXiv:2411.09688)")
    summary = "queries attend the context keys whose k-means cluster's estimated attention clears a threshold"
    tolerance = 0.1  # the observation window and the question are always attended
    defaults = {"percent_clusters": 5.0, "observation_window": 100, "threshold": "per_query"}
    params = (
        Param("percent_clusters", float, None, "clusters as a percentage of the clustered keys (upstream 5)",
              min=0.01, max=100.0),
        Param("observation_window", int, None, "last context tokens that calibrate the threshold and stay attended "
              "(upstream 100)", min=1),
        Param("threshold", str, None, "per_query: each query keeps its top (1 - ratio) share by estimated attention; "
              "global: upstream's one calibrated threshold", choices=("per_query", "global")),
    )

    def begin_sample(self) -> None:
        super().begin_sample()
        self._calibration: list[np.ndarray] = []
        self._threshold: float | None = None

    def learn(self, query, key, scaling, groups, layer_idx):
        """The layer's clusters (labels, centroids, sizes) and the observation window's mean
        estimated scores for the global threshold; None for a context too short to cluster."""
        context = key.shape[2]
        clustered = context - self.args["observation_window"]
        clusters = max(1, int(self.args["percent_clusters"] / 100 * clustered))
        if clustered < 2 or clusters >= clustered:
            return None
        labels, centroids = kmeans_clusters(key[0, :, :clustered], clusters)  # (Hkv, n), (Hkv, k, D)
        counts = torch.stack([torch.bincount(lab, minlength=clusters) for lab in labels]).float()
        window_q = query[0, :, clustered:].float()  # (Hq, w, D)
        per_kv = window_q.reshape(key.shape[1], groups * window_q.shape[1], -1)
        est = estimated_attention(per_kv, centroids.to(per_kv.device), counts.to(per_kv.device), scaling)
        per_key = est.gather(-1, labels.to(est.device)[:, None, :].expand(-1, est.shape[1], -1)).mean(1)  # (Hkv, n)
        self._calibration.append(per_key.flatten().cpu().numpy())
        return labels, centroids, counts, clustered

    def _threshold_value(self) -> float:
        """The ``ratio`` quantile of the observation window's mean estimated scores, over every
        clustered layer and head (computed once all layers were clustered)."""
        if self._threshold is None:
            self._threshold = float(np.quantile(np.concatenate(self._calibration), self.ratio))
        return self._threshold

    def keep(self, learned, query, key, valid_queries, scaling):
        labels, centroids, counts, clustered = learned
        b, hq, n, d = query.shape
        hkv = centroids.shape[0]
        groups = hq // hkv
        q = query.float().reshape(b, hkv, groups * n, d)
        est = estimated_attention(q, centroids.to(q.device), counts.to(q.device), scaling)
        per_key = est.gather(-1, labels.to(q.device)[None, :, None, :].expand(b, -1, groups * n, -1))
        per_key = per_key.reshape(b, hkv, groups, n, clustered).mean(2)  # the group's query heads together
        if self.args["threshold"] == "global":
            cut = torch.tensor(self._threshold_value(), device=q.device)
        else:  # per query: the score of its (1 − ratio)·n-th best key
            cut = per_key.topk(max(1, round((1.0 - self.ratio) * clustered)), dim=-1).values[..., -1:]
        rest = torch.ones(b, hkv, n, key.shape[2] - clustered, dtype=torch.bool, device=q.device)
        return torch.cat([per_key >= cut, rest], dim=-1)  # (B, Hkv, q, total)
