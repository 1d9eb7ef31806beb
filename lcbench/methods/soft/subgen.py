"""SubGen: online clustering of the keys and ℓ2-norm sampling of the values; attention is
estimated from the samples, in memory sublinear in the context.

Zandieh, Han, Mirrokni and Karbasi, "SubGen: Token Generation in Sublinear Time and Memory"
(arXiv:2402.06082). No official implementation was found; this follows the paper's algorithm:

* **Softmax denominator** (the paper's ``UpdateSoftmaxNormalizer``): the keys, in arrival order,
  are clustered online — a key joins the nearest cluster centre within radius ``δ``, else it
  opens a new cluster with itself as the centre — and every cluster keeps a uniform reservoir
  sample of ``cluster_samples`` of its keys and its size ``n_i``. The denominator
  ``Σ_j exp(q·k_j)`` is estimated as ``Σ_i (n_i/|S_i|) Σ_{k∈S_i} exp(q·k)``.
* **Numerator** (``UpdateMatrixProduct``): key–value pairs sampled with probability
  ``‖v_j‖² / Σ‖v‖²`` (ℓ2 sampling; drawn with replacement), each weighted ``Σ‖v‖² / (s ‖v_j‖²)``, an
  unbiased estimate of ``Σ_j exp(q·k_j) v_j``.
* The output is their ratio. The layer (:class:`~lcbench.cache.subgen.SubGenLayer`) stores keys only
  for the cluster samples, key–value pairs for the value samples, and one float32 weight per
  sample; the engine's attention evaluates the estimator through its per-slot bias (the layer's
  docstring shows how), exactly up to a relative 1e-4 of the denominator.

lcbench's choices (the paper leaves them to the theory's constants): the radius is
``δ = delta ×`` the head's median distance of keys to their mean (scale-free); ``--ratio`` fixes
the memory: the bytes left for the context are split ``value_share`` to value samples and the rest
to cluster samples, which caps the number of clusters at ``(cluster slots) / cluster_samples`` —
once the cap is reached, a key farther than ``δ`` from every centre joins its nearest cluster (the
estimator stays unbiased for any partition; clustering only lowers its variance). The keys are
processed once, in arrival order, after the context's prefill (the paper's stream), one row and
head per vectorised lane. The ``sinks`` first and ``recent`` last context tokens are kept exactly
(4 and 64 by default, at most half of the context's budget: lcbench's defaults, not the paper's
stated algorithm, whose stream covers every token — ``sinks=0,recent=0`` is that algorithm).
Without them the attention sink's large share of the softmax is estimated from a cluster sample
and the estimate breaks down: SmolLM2-135M-Instruct on a 1K-token NIAH context at ratio 0.5 then
generated degenerate text (" demonstr carriers carriers …"), and fluent text with them. Tokens
appended after the context (question, answer) are kept exactly rather than streamed into the
sketch. Sampling is seeded (``seed``), so runs repeat.
"""

from __future__ import annotations

import torch

from ...cache.layer import DenseLayer
from ...cache.subgen import SubGenLayer
from ...errors import UserError
from ...params import Param
from ..base import Stage
from ..dropping.select import context_slots

WEIGHT_BYTES = 4  # one float32 logit weight per stored sample
EXACT_SHARE = 0.5  # at most this share of the context's budget goes to the exact sinks and recent tokens


def online_clusters(keys: torch.Tensor, radius: torch.Tensor, max_clusters: int, samples: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's streaming clustering of ``keys`` (G, n, D), one lane per row and head: returns
    each cluster's size (G, m) and its reservoir sample of token indices (G, m, samples), -1 where a
    cluster has fewer members than ``samples``. A key opens a cluster when no centre lies within
    ``radius`` (G,) of it and fewer than ``max_clusters`` exist, else joins the nearest centre;
    reservoir sampling keeps each cluster's sample uniform over its members."""
    g, n, d = keys.shape
    m = max_clusters
    centres = keys.new_zeros(g, m, d)
    active = torch.zeros(g, dtype=torch.long, device=keys.device)
    sizes = torch.zeros(g, m, dtype=torch.long, device=keys.device)
    reservoir = torch.full((g, m, samples), -1, dtype=torch.long, device=keys.device)
    lanes = torch.arange(g, device=keys.device)
    slots_of = torch.arange(m, device=keys.device)[None, :]
    coins = torch.rand(n, g, generator=generator).to(keys.device)
    picks = torch.randint(0, samples, (n, g), generator=generator).to(keys.device)
    for j in range(n):
        k = keys[:, j]
        dist = (centres - k[:, None, :]).norm(dim=-1).masked_fill(slots_of >= active[:, None], float("inf"))
        nearest_d, nearest = dist.min(-1)
        new = (nearest_d > radius) & (active < m)
        cluster = torch.where(new, active, nearest)
        centres[lanes[new], active[new]] = k[new]
        active = active + new.long()
        sizes[lanes, cluster] += 1
        count = sizes[lanes, cluster]
        fill = count <= samples
        replace = ~fill & (coins[j] * count.float() < samples)
        slot = torch.where(fill, count - 1, picks[j])
        put = fill | replace
        reservoir[lanes[put], cluster[put], slot[put]] = j
    return sizes, reservoir


def l2_samples(values: torch.Tensor, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` draws per lane of ``values`` (G, n, D) with probability ``‖v_j‖² / Σ‖v‖²``, with
    replacement (the paper's ℓ2 sampling), and each draw's weight ``Σ‖v‖² / (count ‖v_j‖²)``: then
    ``Σ_draws weight · f(j) v_j`` is an unbiased estimate of ``Σ_j f(j) v_j`` for any ``f``. A lane
    whose values are all zero draws uniformly (its products are zero whatever is drawn)."""
    norms = values.float().pow(2).sum(-1)
    total = norms.sum(-1, keepdim=True)
    zero = total <= 0
    safe = torch.where(zero, torch.ones_like(norms), norms)
    drawn = torch.multinomial(safe, count, replacement=True, generator=generator)
    weight = torch.where(zero, 0.0, total) / (count * safe.gather(1, drawn))
    return drawn, weight


class SubGen(Stage):
    name = "subgen"
    family = "soft_compression"
    token_budget = False  # it keeps weighted samples, not whole tokens
    # reference: a Python loop over the keys (the paper's stream), then a dense softmax
    reference_latency = True
    paper = ("Zandieh, Han, Mirrokni and Karbasi, SubGen: Token Generation in Sublinear Time and Memory "
             "(arXiv:2402.06082)")
    summary = ("online clustering of keys (reservoir samples per cluster) for the softmax denominator, ℓ2-norm "
               "sampling of values for the numerator; attention is their ratio")
    params = (
        Param("delta", float, 0.5, "cluster radius, as a share of the head's median key distance to the mean key",
              min=0.0),
        Param("cluster_samples", int, 2, "keys each cluster keeps (uniform reservoir sample)", min=1),
        Param("value_share", float, 0.5, "share of the kept bytes spent on ℓ2-sampled key-value pairs", min=0.05,
              max=0.95),
        Param("sinks", int, 4, "first context tokens kept exactly (lcbench's default; 0: the algorithm as stated)",
              min=0),
        Param("recent", int, 64, "last context tokens kept exactly (lcbench's default; 0: the algorithm as stated)",
              min=0),
        Param("seed", int, 0, "seed of the reservoir and ℓ2 sampling", min=0),
    )

    def begin_sample(self):
        self._clusters: list[float] = []

    def compress_layer(self, layer, seen):
        if self.ratio <= 0:
            return layer
        if layer.valid is not None:
            raise UserError("subgen compresses one sample's context at a time and got padded rows. Fix: run it "
                            "through lcbench's engine (each row is compressed alone) or without padding.")
        if getattr(layer, "bias", None) is not None:
            raise UserError("subgen cannot follow a merging stage (its slots' bias would be lost). Fix: use it alone "
                            "or after a plain token-dropping stage.")
        n = context_slots(layer, seen)
        keys, values = layer.dense()
        b, h, _, dk = keys.shape
        dv = values.shape[-1]
        elem = keys.element_size()
        protected = layer.seq_len() - n  # the question in query-aware mode: kept exactly, measured with the context
        allow = max(0, int(EXACT_SHARE * ((1 - self.ratio) * (n + protected) - protected)))
        front = min(self.args["sinks"], n, allow)
        back = min(self.args["recent"], n - front, allow - front)
        pool = n - front - back  # the context tokens the sketch stands for
        budget = (1 - self.ratio) * (n + protected) * (dk + dv) * elem - (front + back + protected) * (dk + dv) * elem
        s = int(self.args["value_share"] * budget // ((dk + dv) * elem + WEIGHT_BYTES))
        slots = int((1 - self.args["value_share"]) * budget // (dk * elem + WEIGHT_BYTES))
        t = self.args["cluster_samples"]
        slots = min(slots, pool)
        m = slots // t
        if pool < 2 or s < 1 or m < 1:
            if pool >= 2 and budget > 0:
                raise UserError(f"subgen: --ratio {self.ratio} leaves too few bytes for a sketch of this context "
                                f"({n} tokens). Fix: use a lower ratio or fewer exact sinks/recent tokens.")
            return layer
        gen = torch.Generator().manual_seed(self.args["seed"] * 1_000_003 + seen.layer_idx)
        mid_k = keys[:, :, front:front + pool].float().reshape(b * h, pool, dk)
        mid_v = values[:, :, front:front + pool].float().reshape(b * h, pool, dv)
        spread = (mid_k - mid_k.mean(1, keepdim=True)).norm(dim=-1).median(dim=-1).values
        sizes, reservoir = online_clusters(mid_k, self.args["delta"] * spread, m, t, gen)
        # cluster samples: keys and log(n_i / |S_i|)
        held = reservoir >= 0
        taken = held.sum(-1, keepdim=True).clamp(min=1)
        weight = (sizes[..., None].float() / taken).expand_as(reservoir)
        idx = reservoir.clamp(min=0).reshape(b * h, m * t)
        ckeys = mid_k.gather(1, idx[..., None].expand(-1, -1, dk))
        cbias = weight.clamp(min=1e-30).log().reshape(b * h, m * t).masked_fill(~held.reshape(b * h, -1), 0.0)
        # value samples: ℓ2 sampling with replacement, weight W / (s ‖v_j‖²), stored as v/ε with bias log(ε·weight)
        drawn, a = l2_samples(mid_v, s, gen)
        vmax = float(mid_v.abs().max()) if mid_v.numel() else 0.0
        eps = 1e-4 if values.dtype != torch.float16 else max(1e-4, 2.0 * vmax / 6.0e4)
        skeys = mid_k.gather(1, drawn[..., None].expand(-1, -1, dk))
        svalues = mid_v.gather(1, drawn[..., None].expand(-1, -1, dv)) / eps
        sbias = (a * eps).log()
        mid_pos = layer.positions[..., front:front + pool].reshape(b * h, pool)
        tail = DenseLayer()
        exact = torch.cat([torch.arange(front), torch.arange(n - back, layer.seq_len())]).to(keys.device)
        if exact.numel():
            tail.keys = keys[:, :, exact].contiguous()
            tail.values = values[:, :, exact].contiguous()
            tail.positions = layer.positions[..., exact].contiguous()
            tail.is_initialized = True
        if not hasattr(self, "_clusters"):
            self.begin_sample()
        self._clusters.append(float((sizes > 0).sum(-1).float().mean()))
        shape = lambda x: x.reshape(b, h, *x.shape[1:])  # noqa: E731
        return SubGenLayer(shape(ckeys).to(keys.dtype).contiguous(), shape(cbias).contiguous(),
                           shape(mid_pos.gather(1, idx)).contiguous(),
                           None if bool(held.all()) else shape(held.reshape(b * h, -1)).contiguous(),
                           shape(skeys).to(keys.dtype).contiguous(), shape(svalues).to(values.dtype).contiguous(),
                           shape(sbias).contiguous(), shape(mid_pos.gather(1, drawn)).contiguous(), tail, eps, dv)

    def sample_stats(self):
        clusters = getattr(self, "_clusters", [])
        return {"subgen_clusters": sum(clusters) / len(clusters)} if clusters else {}
