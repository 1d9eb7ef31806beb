"""EMS: a Global-Local importance score, head-wise budgets, and evict-then-merge with a zero class.

Li et al., "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on
Global-Local Importance" (arXiv:2412.08521). No official implementation was found (searched the
code index for the title, "Global-Local score" and "zero-class"; none is linked from the paper's
abstract page), and only the paper's abstract could be read here, so this module implements what
the abstract states, with each detail it leaves open chosen by lcbench and said so below.

What the abstract states, and how it is done here:

* **Global-Local score.** "combines accumulated attention scores from both global and local KV
  tokens", because accumulated attention alone is biased by the causal mask and a local window
  by positional encoding. *Global*: the attention each key received summed over every prefill
  query (H2O's accumulated attention), divided by the number of queries that can see that key
  (``L − j`` for slot ``j``), so early keys are not favoured merely for being visible to more
  queries. *Local*: the mean attention from the last ``window_size`` queries (SnapKV's window,
  which is always kept; ``window_size=64``, SnapKV's default). Each is normalised to sum to 1 over a head's context slots and the score
  is ``global_weight · global + (1 − global_weight) · local``, averaged over the query heads of each
  KV head (GQA). (The normalisation by visible queries, the per-head normalisation and the convex
  combination are lcbench's reading; ``global_weight=0.5`` is lcbench's default.)
* **Head-wise budgets.** "accounts for the sparsity and redundancy of KV tokens across different
  heads": a layer keeps ``H · k`` tokens in all (``k`` the uniform budget of ``--ratio``), chosen by
  one top-k over the scores of all its KV heads with a per-head floor of ``alpha_safeguard · k``
  (Ada-KV's allocation, :func:`.adakv.headwise_keep`: lcbench's choice of how the head-wise
  budgets are set; ``alpha_safeguard=0.2`` is Ada-KV's default), stored ragged
  (:class:`~lcbench.cache.ragged.RaggedLayer`) so bytes fall with the tokens kept.
* **Evict-then-merge with a zero class.** The kept tokens of a head are its class centres. Each
  token not kept is assigned to the centre whose key is most cosine-similar; if that similarity
  is at least ``merge_threshold`` (redundancy) it is *merged*: the centre's key and value become
  the score-weighted average of itself and the tokens merged into it; otherwise (sparsity) it is
  assigned to the *zero class*, an extra bin that is discarded, i.e. evicted. Because every head
  scatters into the same ``n + 1`` bins, heads with different budgets and different numbers of
  merged tokens are compressed in one batched operation — the role the abstract gives the
  zero-class mechanism. (``merge_threshold=0.5`` is lcbench's default.)

Not implemented: the paper's fused kernel for the Global-Local score (scores are computed by
lcbench's chunked observation, :func:`lcbench.engine.attention.attention_sum`), and any decode-time
compression. ``--prefill-chunk`` is refused, as for H2O: the global score needs every query's
attention. A run records ``ems_merged_fraction`` (of the tokens not kept, the share merged rather
than evicted) and ``ems_head_budget_min/max`` (context tokens per KV head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...cache.layer import DenseLayer
from ...cache.ragged import RaggedLayer
from ...errors import UserError
from ...params import Param
from ..base import Needs, Stage
from .adakv import headwise_keep
from .select import align, context_budget, context_slots, force_keep, group_mean
from .snapkv import WINDOW_SIZE

EPS = 1e-6  # keeps every merge weight positive (weights are first scaled to a head maximum of 1)
SIM_ELEMENTS = 2**24  # float32 similarities computed at a time (rows × centres × heads)


def global_local_scores(seen, window: int, global_weight: float) -> torch.Tensor:
    """(B, H_kv, n) Global-Local scores of the ``n`` context slots of the pass (finite)."""
    n = seen.context_length
    attn_sum = seen.attention_sum.float()  # (B, Hq, L)
    L = attn_sum.shape[-1]
    visible = (L - torch.arange(n, device=attn_sum.device)).clamp(min=1).float()
    glob = attn_sum[..., :n] / visible
    w = min(window, seen.window_attention.shape[2])
    local = seen.window_attention[:, :, -w:, :n].float().mean(2)
    glob = glob / glob.sum(-1, keepdim=True).clamp(min=1e-12)
    local = local / local.sum(-1, keepdim=True).clamp(min=1e-12)
    return group_mean(global_weight * glob + (1.0 - global_weight) * local, seen.num_groups)


def evict_then_merge(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor,
                     valid: torch.Tensor | None, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge every context slot not kept into its most similar kept slot of the same head when the
    keys' cosine similarity is ≥ ``threshold``, else into the zero class (evicted).

    ``keys``/``values`` (B, H, L, D); ``keep`` (B, H, n) the kept context slots (n ≤ L, the rest of
    the layer is a protected tail that is neither merged nor a centre); ``weights`` (B, H, n) ≥ 0.
    Returns the new keys, values (kept slots hold the merged states; other slots unchanged) and the
    (B, H, n) mask of merged slots."""
    B, H, L, D = keys.shape
    n = keep.shape[-1]
    candidates = ~keep
    if valid is not None:
        candidates = candidates & valid[..., :n]
    counts = keep.sum(-1)  # (B, H) centres per head
    K = max(1, int(counts.max()))
    order = keep.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :K]  # centres first
    real_centre = torch.arange(K, device=keys.device)[None, None, :] < counts[..., None]
    unit = F.normalize(keys[:, :, :n].float(), dim=-1)
    centres = unit.gather(2, order[..., None].expand(-1, -1, -1, D))
    best_sim = torch.empty(B, H, n, device=keys.device)
    best = torch.empty(B, H, n, dtype=torch.long, device=keys.device)
    step = max(1, SIM_ELEMENTS // max(1, B * H * K))
    for a in range(0, n, step):
        b = min(n, a + step)
        sim = (unit[:, :, a:b] @ centres.transpose(-1, -2)).masked_fill_(~real_centre[:, :, None, :], float("-inf"))
        best_sim[..., a:b], best[..., a:b] = sim.max(-1)
    merged = candidates & (best_sim >= threshold)
    zero_class = n  # the extra bin evicted tokens are scattered into, then discarded
    target = torch.where(merged, order.gather(2, best), torch.full_like(best, zero_class))
    w = weights.float().clamp(min=0)
    w = w / w.amax(-1, keepdim=True).clamp(min=1e-30) + EPS  # per head relative to its largest weight
    w_keep, w_move = w * keep, w * candidates
    den = torch.zeros(B, H, n + 1, device=keys.device)
    den[..., :n] = w_keep
    den.scatter_add_(2, target, w_move)
    out = []
    for x in (keys, values):
        x32 = x[:, :, :n].float()
        dx = x.shape[-1]
        num = torch.zeros(B, H, n + 1, dx, device=x.device)
        num[:, :, :n] = x32 * w_keep[..., None]
        num.scatter_add_(2, target[..., None].expand(-1, -1, -1, dx), x32 * w_move[..., None])
        new = torch.where(keep[..., None], num[:, :, :n] / den[..., :n, None].clamp(min=EPS), x32)
        y = x.clone()
        y[:, :, :n] = new.to(x.dtype)
        out.append(y)
    return out[0], out[1], merged


class EMS(Stage):
    name = "ems"
    family = "kv_dropping"
    paper = ("Li et al., EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on "
             "Global-Local Importance (arXiv:2412.08521)")
    summary = ("Global-Local attention score, head-wise budgets; tokens not kept are merged into the most similar "
               "kept token or evicted (zero class); ragged storage")
    defaults = {"global_weight": 0.5, "merge_threshold": 0.5, "alpha_safeguard": 0.2}
    stages = ("cache",)
    params = (
        WINDOW_SIZE,
        Param("global_weight", float, None, "weight of the global (all-query, visibility-normalised) score against "
              "the local window score (lcbench's default)", min=0, max=1),
        Param("merge_threshold", float, None, "key cosine similarity from which a token not kept is merged into its "
              "nearest kept token instead of evicted (lcbench's default)", min=-1, max=1),
        Param("alpha_safeguard", float, None, "each head keeps at least this share of the uniform budget", min=0, max=1),
    )

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        self.needs = Needs(window=self.args["window_size"], full_attention_sum=True)

    def begin_sample(self):
        self._merged: list[float] = []
        self._budgets: list[torch.Tensor] = []

    def compress_layer(self, layer, seen):
        n = context_slots(layer, seen)
        if self.ratio <= 0 or n <= 1:
            return layer
        if type(layer) is not DenseLayer:
            raise UserError("ems merges full-precision keys/values: put it before any quantization in the chain "
                            f"(e.g. ems+kivi), not after (got a {type(layer).__name__}).")
        if not hasattr(self, "_merged"):
            self.begin_sample()
        gl = global_local_scores(seen, self.args["window_size"], self.args["global_weight"])
        total = seen.context_length + seen.protected
        inside = max(0, min(seen.context_length, total - self.args["window_size"]))  # the window: always kept
        weights = align(gl, layer, seen)  # per slot the layer holds now (an earlier stage may have dropped some)
        scores = align(force_keep(gl, inside), layer, seen)
        if layer.valid is not None:
            scores = scores.masked_fill(~layer.valid[..., :n], float("-inf"))
        k = context_budget(layer, seen, self.ratio)
        keep = headwise_keep(scores, k, max(1, int(k * self.args["alpha_safeguard"])))
        layer.keys, layer.values, merged = evict_then_merge(layer.keys, layer.values, keep, weights, layer.valid,
                                                            self.args["merge_threshold"])
        moved = int((~keep).sum() if layer.valid is None else (~keep & layer.valid[..., :n]).sum())
        self._merged.append(float(merged.sum()) / moved if moved else 0.0)
        self._budgets.append(keep.sum(-1).flatten())
        tail = torch.ones((*keep.shape[:2], seen.protected), dtype=torch.bool, device=keep.device)
        return RaggedLayer.from_layer(layer, torch.cat([keep, tail], dim=-1))

    def sample_stats(self) -> dict[str, float]:
        if not getattr(self, "_budgets", None):
            return {}
        budgets = torch.cat(self._budgets)
        return {"ems_merged_fraction": sum(self._merged) / len(self._merged),
                "ems_head_budget_min": float(budgets.min()), "ems_head_budget_max": float(budgets.max())}
