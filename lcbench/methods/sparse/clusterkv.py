"""ClusterKV: tokens recalled by semantic clusters of keys at every decoding step.

Liu et al., "ClusterKV: Manipulating LLM KV Cache in Semantic Space for Recallable Compression",
DAC 2025 (arXiv:2412.03213); official code github.com/sjtu-zhao-lab/ClusterKV, read at commit
cb66a2291c660dbc4f38de26514af7c4d54e8f31 (``accuracy/cluster_attention.py``: ``build_cluster``,
``cluster_attn_out``, ``forward_cluster``).

After the context is prefilled, each layer's context keys but the first ``sink`` tokens are
clustered per KV head by k-means in cosine space (upstream: cuVS k-means, ``dist_t=cosine``; here
scikit-learn's on the L2-normalised keys, :func:`.squeezed.kmeans_clusters`), ``tokens_per_cluster``
keys a cluster on average. At each decoding step a query head ranks the clusters of its KV head by
the dot product of the query with their centroids and recalls whole clusters in that order until
they hold ``budget − sink`` keys, cut to exactly that many (``cluster_attn_out``); it attends the
sinks, the recalled keys and every token after the context. Nothing is evicted (the full cache
stays: "recallable"), and ``attention_density`` is what the decoding steps attended. As upstream, the first
``dense_layers`` layers and the question prefill (``q_len > 1``) stay dense; the budget is
``(1 − ratio)`` of the context. With grouped queries a key is recalled for its KV head when the
group's mean query recalls it (upstream repeats centroids per query head).
"""

from __future__ import annotations

import torch

from ...params import Param
from ..base import keep_count
from .retrieval import ContextRetrieval
from .squeezed import kmeans_clusters


class ClusterKV(ContextRetrieval):
    name = "clusterkv"
    family = "sparse_attention"
    paper = ("Liu et al., ClusterKV: Manipulating LLM KV Cache in Semantic Space for Recallable Compression, "
             "DAC 2025 (arXiv:2412.03213)")
    summary = "each decoding step recalls whole key clusters (cosine k-means) ranked by query-centroid score"
    tolerance = 0.05
    dense_question = True  # upstream's prompt prefill is dense
    defaults = {"sink": 16, "tokens_per_cluster": 80, "dense_layers": 2}
    params = (
        Param("sink", int, None, "first tokens always attended (upstream's sink)", min=0),
        Param("tokens_per_cluster", int, None, "context keys per cluster on average (clusters = keys / this)", min=1),
        Param("dense_layers", int, None, "first layers that stay dense (upstream 2)", min=0),
    )

    def learn(self, query, key, scaling, groups, layer_idx):
        if layer_idx < self.args["dense_layers"]:
            return None
        context = key.shape[2]
        sink = min(self.args["sink"], context)
        budget = keep_count(context, self.ratio)
        clustered = context - sink
        clusters = max(1, clustered // self.args["tokens_per_cluster"])
        if budget <= sink or clustered <= budget - sink or clusters >= clustered:
            return None
        labels, centroids = kmeans_clusters(key[0, :, sink:], clusters)  # (Hkv, n), (Hkv, k, D)
        return labels, centroids, sink, budget - sink, context

    def keep(self, learned, query, key, valid_queries, scaling):
        """The sinks, the ``budget − sink`` keys of the clusters ranked first by query·centroid
        (whole clusters in rank order, the last one cut), and all after the context."""
        labels, centroids, sink, recall, context = learned
        b, hq, n, d = query.shape
        hkv, clustered = labels.shape
        q = query.float().reshape(b, hkv, hq // hkv, n, d).mean(2)  # (B, Hkv, q, D)
        rank = torch.matmul(q, centroids.to(q.device).transpose(-1, -2)).argsort(-1, descending=True)  # (B,Hkv,q,k)
        position = rank.argsort(-1)  # each cluster's place in the ranking
        key_place = position.gather(-1, labels.to(q.device)[None, :, None, :].expand(b, -1, n, -1))  # (B,Hkv,q,n)
        order = key_place.argsort(dim=-1, stable=True)[..., :recall]  # keys of the best clusters, in cluster order
        recalled = torch.zeros(b, hkv, n, clustered, dtype=torch.bool, device=q.device)
        recalled.scatter_(-1, order, True)
        head = torch.ones(b, hkv, n, sink, dtype=torch.bool, device=q.device)
        tail = torch.ones(b, hkv, n, key.shape[2] - context, dtype=torch.bool, device=q.device)
        return torch.cat([head, recalled, tail], dim=-1)
