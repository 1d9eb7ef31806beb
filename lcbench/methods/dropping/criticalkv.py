"""CriticalKV: select in two stages, the second weighting each token by what its value adds to the
layer's output.

Feng et al., "Identify Critical KV Cache in LLM Inference from an Output Perturbation Perspective"
(arXiv:2502.03805). Attention weights alone ignore that a token perturbs the output through its
value projected by the output matrix: stage 1 keeps the top ``first_stage_ratio`` share of the
budget by the scorer's attention scores (SnapKV's by default, as in the paper's CriticalSnapKV);
stage 2 fills the rest by ``(score + epsilon) · ‖W_o^h v‖₁`` — the L1 norm of each token's value
through its query heads' slice of ``o_proj``, averaged over the query heads of its KV group. Read
against kvpress 0.5.5 ``kvpress/presses/criticalkv_press.py`` (CriticalKVPress), whose positions
this method keeps exactly (tests/test_kvpress_presses.py). The head-adaptive variant is
``criticaladakv`` (:mod:`.criticaladakv`).
"""

from __future__ import annotations

import torch

from ...errors import UserError
from ...params import Param
from ..base import Stage
from .adakv import SCORERS
from .scoring import ScoringDrop
from .select import align, context_budget, context_slots
from .snapkv import KERNEL_SIZE, WINDOW_SIZE

SCORER = Param("scorer", str, "snapkv", "the attention scores of stage 1", choices=tuple(SCORERS))
FIRST_STAGE = Param("first_stage_ratio", float, 0.5, "share of the budget chosen by the scores alone (stage 1)",
                    min=0, max=1)
EPSILON = Param("epsilon", float, 1e-4, "added to the scores before the value-norm weighting", min=0)
CRITICAL_PARAMS = (SCORER, FIRST_STAGE, EPSILON, WINDOW_SIZE, KERNEL_SIZE)


def make_scorer(ratio: float, args: dict) -> Stage:
    """The stage-1 scorer (one of :data:`.adakv.SCORERS`) with the arguments it takes."""
    scorer_cls = SCORERS[args["scorer"]]
    accepted = {p.name for p in scorer_cls.params}
    return scorer_cls(ratio, **{k: v for k, v in args.items() if k in accepted})


class ScoredBy(Stage):
    """A stage that scores with another dropping method's scores (stage 1 of CriticalKV)."""

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        self.scorer = make_scorer(ratio, self.args)
        self.needs = self.scorer.needs

    def begin_sample(self):
        self.scorer.begin_sample()


def projected_value_norm(values: torch.Tensor, module, num_groups: int) -> torch.Tensor:
    """(B, H_kv, n) ‖W_o^h v‖₁ of each value (B, H_kv, n, D), averaged over the query heads ``h``
    of its KV group (``W_o^h``: the columns of ``module.o_proj`` that read head ``h``)."""
    o_proj = getattr(module, "o_proj", None)
    if o_proj is None:
        raise UserError(f"criticalkv weights tokens by the attention output projection `o_proj`, which "
                        f"{type(module).__name__} does not have. Fix: use snapkv or adakv on this model.")
    b, h_kv, n, d = values.shape
    weight = o_proj.weight.float()  # (hidden, Hq·D)
    out = torch.zeros((b, h_kv, n), device=values.device)
    for head in range(h_kv * num_groups):
        w = weight[:, head * d:(head + 1) * d]  # (hidden, D)
        out[:, head // num_groups] += (values[:, head // num_groups].float() @ w.T).abs().sum(-1)
    return out / num_groups


def top_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, H, n) bool: each row and head's ``counts`` (B, H) best slots."""
    ranks = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
    return ranks < counts[..., None]


class CriticalKV(ScoredBy, ScoringDrop):
    name = "criticalkv"
    family = "kv_dropping"
    paper = ("Feng et al., Identify Critical KV Cache in LLM Inference from an Output Perturbation Perspective "
             "(CriticalKV, arXiv:2502.03805)")
    summary = "two stages: top scores first, then scores × ‖W_o·v‖₁ (output perturbation) fill the budget"
    params = CRITICAL_PARAMS

    def scores(self, layer, seen):
        n = context_slots(layer, seen)
        base = align(self.scorer.scores(layer, seen)[..., : seen.context_length], layer, seen).float()
        k = context_budget(layer, seen, self.ratio)
        first = int(k * self.args["first_stage_ratio"])
        first = max(1, first) if self.args["first_stage_ratio"] > 0 else 0
        _, values = layer.dense()
        weighted = (base + self.args["epsilon"]) * projected_value_norm(values[:, :, :n], seen.module, seen.num_groups)
        if first:
            weighted.scatter_(-1, base.topk(min(first, n), dim=-1).indices, float("inf"))
        return weighted
