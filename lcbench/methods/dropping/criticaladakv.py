"""CriticalAdaKV: CriticalKV's two-stage, output-aware selection under Ada-KV's head-wise budgets.

Feng et al., "Identify Critical KV Cache in LLM Inference from an Output Perturbation Perspective"
(arXiv:2502.03805), combined with Ada-KV (arXiv:2407.11550) as in the paper. Per layer, Ada-KV's
allocation (one top-k over all KV heads' scores, each head keeping at least ``alpha_safeguard`` of
the uniform budget) gives each head its budget ``b_h``; within a head, stage 1 keeps the top
``first_stage_ratio · b_h`` tokens by score (the safeguarded ones first) and stage 2 fills ``b_h``
by ``(score + epsilon) · ‖W_o^h v‖₁`` (:func:`.criticalkv.projected_value_norm`). Heads hold
different counts: a :class:`~lcbench.cache.ragged.RaggedLayer`. Read against kvpress 0.5.5
``kvpress/presses/criticalkv_press.py`` (CriticalAdaKVPress), whose positions this method keeps
exactly (tests/test_kvpress_presses.py).
"""

import torch

from ...cache.ragged import RaggedLayer
from ...params import Param
from .adakv import headwise_keep
from .criticalkv import CRITICAL_PARAMS, ScoredBy, projected_value_norm, top_mask
from .select import align, context_budget, context_slots


class CriticalAdaKV(ScoredBy):
    name = "criticaladakv"
    family = "kv_dropping"
    paper = ("Feng et al., Identify Critical KV Cache in LLM Inference from an Output Perturbation Perspective "
             "(CriticalAdaKV, arXiv:2502.03805)")
    summary = "Ada-KV head-wise budgets, filled by CriticalKV's two stages (scores, then scores × ‖W_o·v‖₁); ragged"
    params = (*CRITICAL_PARAMS,
              Param("alpha_safeguard", float, 0.2, "each head keeps at least this share of the uniform budget",
                    min=0, max=1))

    def compress_layer(self, layer, seen):
        n = context_slots(layer, seen)
        if self.ratio <= 0 or n <= 1:
            return layer
        scores = align(self.scorer.scores(layer, seen)[..., : seen.context_length], layer, seen).float()
        if layer.valid is not None:
            scores = scores.masked_fill(~layer.valid[..., :n], float("-inf"))
        k = context_budget(layer, seen, self.ratio)
        floor = int(k * self.args["alpha_safeguard"])
        floor = max(1, floor) if self.args["alpha_safeguard"] > 0 else 0
        safe = torch.zeros_like(scores, dtype=torch.bool)
        if floor:
            safe.scatter_(-1, scores.topk(floor, dim=-1).indices, True)
        budgets = headwise_keep(scores, k, floor).sum(-1)  # (B, H): Ada-KV's allocation
        marked = scores.masked_fill(safe, float("inf"))
        first = top_mask(marked, (budgets * self.args["first_stage_ratio"]).long()) | safe
        _, values = layer.dense()
        weighted = (scores + self.args["epsilon"]) * projected_value_norm(values[:, :, :n], seen.module, seen.num_groups)
        keep = top_mask(weighted.masked_fill(first, float("inf")), budgets)
        if layer.valid is not None:
            keep &= layer.valid[..., :n]
        tail = torch.ones((*keep.shape[:2], seen.protected), dtype=torch.bool, device=keep.device)
        return RaggedLayer.from_layer(layer, torch.cat([keep, tail], dim=-1))
