"""CompressKV: SnapKV-style selection read only from semantic retrieval heads, with layer budgets
set by each layer's measured compression error.

Lin, Wang, Kondrateva, Shi, Li and Zhang, "CompressKV: Semantic Retrieval Heads Know What Tokens
are Not Important Before Generation" (arXiv:2508.02401). Read against the official implementation,
TUDa-HWAI/CompressKV @e8af510 (``methods/compresskv/snapkv_utils.py`` ``compresskvCluster.update_kv``,
``Retrieval_Head_Identification/semantic_retrieval_head_detection.py``,
``longbench/pred_get_importance_score.py`` with ``longbench/model/modeling_llama_new.py``, and
``error_aware_layer_budget_allocation`` in ``longbench/pred_compresskv.py``).

Per sample (:meth:`CompressKV.compress_layer`), as upstream's ``update_kv``: the attention of the
last ``window_size`` prompt queries (8) over the context, summed over the window, average-pooled
over ``kernel_size`` (5) neighbours, is read from the layer's ``first_k`` (4) semantic retrieval
query heads only and averaged over them; the top tokens by that one score are kept in *every* KV
head of the layer (upstream gathers the same indices for all heads), with the window. Layer
``l`` keeps its own budget: upstream's error-aware allocation of ``budget × layers`` tokens —
each layer gets ``min_tokens`` (32) plus a share of the rest proportional to its importance,
clipped to ``[min_tokens, 3 × budget]``, the remainder handed out (or taken back) one token at
a time in order of importance. The mean budget is ``--ratio``'s (or ``--budget``'s). On a model
with sliding-window layers (``config.layer_types``) each kind of layer splits its own total, since
a window layer holds fewer tokens (upstream's models have one kind).

Once per model (:meth:`CompressKV.calibrate`, cached by the engine, recorded in spec.json):

* *Semantic retrieval heads.* Upstream decodes needle-in-a-haystack probes and, at every step whose
  generated token occurs in the needle, adds each head's attention mass over the *whole* needle
  span (not only the copied token: "semantic"), keeping only probes the model answered (ROUGE-1
  recall > 50); heads are ranked per layer by the mean. Here the answer is teacher-forced (the
  needle's number after the question), so every probe counts and a model that fails the probe
  (a random test model) still ranks its heads; for a model that answers, teacher forcing feeds the
  tokens it would have generated. Probes: ``probe_tokens`` (1024, lcbench's) filler tokens with a
  number needle at 25/50/75 % depth (EHPC's probes, :func:`lcbench.methods.prompt.ehpc.probe_inputs`)
  in place of upstream's Paul Graham haystacks and needle file.
* *Layer importance.* Upstream runs LongBench samples with each layer's cache compressed by its
  semantic heads at the target budget and sums, over decode steps, the relative Frobenius error
  ``‖o_proj(attn_compressed) − o_proj(attn_full)‖ / ‖o_proj(attn_full)‖`` of the layer's output,
  normalised over layers. Here the same error is measured on the answer tokens of the same probes,
  at the run's ratio (0.5 when the ratio is 0 or a ``--budget`` sets it per layer), so the
  calibration is computed per ratio. ``layer_adaptive=false`` gives every layer the mean budget.

Not reproduced: upstream's LongBench-sampled importance (``sampling_number`` samples per dataset)
and its ROUGE filter; calibration attention is plain causal attention (no sliding window or
softcap; such models still run, the calibration is then approximate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...engine.attention import lcbench_attention, registered
from ...engine.carried import carried, carrying
from ...errors import UserError
from ...params import Param
from ..base import Needs, keep_count
from ..prompt.ehpc import probe_inputs
from .scoring import ScoringDrop
from .select import context_budget, force_keep, real_context_slots
from .snapkv import KERNEL_SIZE, WINDOW_SIZE

CAPTURE_NAME = "lcbench_capture_qkv"
DEPTHS = (0.25, 0.5, 0.75)
CALIBRATION_RATIO = 0.5  # the ratio layer importance is measured at when the run's is 0 or per layer (--budget)


def capture_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """lcbench's plain attention, also handing (module, query, key, value, scaling) of each layer to
    the callback carried as ``capture`` (calibration only)."""
    callback = carried("capture")
    out = lcbench_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if callback is not None:
        callback(module, query, key, value, query.shape[-1] ** -0.5 if scaling is None else float(scaling))
    return out


def run_captured(model, ids: list[int], callback) -> None:
    """One plain forward of ``ids`` with ``callback`` called per layer on its q/k/v."""
    before = model.config._attn_implementation
    model.set_attn_implementation(registered(CAPTURE_NAME, capture_attention))
    try:
        x = torch.tensor([ids], device=next(model.parameters()).device)
        with carrying(capture=callback):
            model(input_ids=x, use_cache=False)
    finally:
        model.set_attn_implementation(before)


def causal_probs(query: torch.Tensor, key: torch.Tensor, scaling: float, rows: range,
                 allowed: torch.Tensor | None = None) -> torch.Tensor:
    """(Hq, len(rows), L) float32 attention of the queries at slots ``rows`` over every key (GQA keys
    repeated to the query heads), causal; ``allowed`` (L,) bool masks keys out where False."""
    hq, hkv = query.shape[1], key.shape[1]
    q = query[0, :, rows.start:rows.stop].float()
    k = key[0].float().repeat_interleave(hq // hkv, dim=0)
    scores = q @ k.transpose(-1, -2) * scaling
    L = k.shape[1]
    mask = torch.arange(L, device=q.device)[None, :] <= torch.arange(rows.start, rows.stop, device=q.device)[:, None]
    if allowed is not None:
        mask = mask & allowed[None, :]
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def needle_scores(query, key, scaling: float, needle: tuple[int, int], answer: range) -> torch.Tensor:
    """(Hq,) each query head's attention mass over the needle span, summed over the answer queries
    (upstream's semantic retrieval score of one probe)."""
    probs = causal_probs(query, key, scaling, answer)
    return probs[:, :, needle[0]:needle[1]].sum(-1).sum(-1)


def snap_scores(window_probs: torch.Tensor, kernel: int, pooling: str = "avg") -> torch.Tensor:
    """(..., m) upstream's ``update_kv`` scores from window attention (..., w, m): summed over the
    window, pooled over ``kernel`` neighbours."""
    s = window_probs.float().sum(-2)
    if kernel > 1 and s.shape[-1] > 0:
        pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
        shape = s.shape
        s = pool(s.reshape(-1, 1, shape[-1]), kernel_size=kernel, padding=kernel // 2, stride=1)[..., : shape[-1]]
        s = s.reshape(shape)
    return s


def layer_error(module, query, key, value, scaling: float, heads: list[int], prompt: int, answer: range,
                window: int, kernel: int, pooling: str, ratio: float) -> float:
    """Relative Frobenius error of the layer's output on the answer queries when the prompt's cache
    keeps only what the semantic ``heads`` select at ``ratio`` (upstream's layer importance)."""
    w = min(window, prompt)
    m = prompt - w
    keep = keep_count(prompt, ratio)
    L = key.shape[2]
    allowed = torch.ones(L, dtype=torch.bool, device=key.device)
    if keep < prompt and m > 0:
        window_probs = causal_probs(query, key, scaling, range(prompt - w, prompt))[:, :, :m]  # (Hq, w, m)
        scores = snap_scores(window_probs[heads], kernel, pooling).mean(0)
        allowed[:m] = False
        allowed[scores.topk(max(0, min(m, keep - w))).indices] = True
    hq = query.shape[1]
    v = value[0].float().repeat_interleave(hq // value.shape[1], dim=0)
    outs = []
    for mask in (None, allowed):
        probs = causal_probs(query, key, scaling, answer, mask)
        out = (probs @ v).transpose(0, 1).reshape(len(answer), -1)  # (answer, Hq·D)
        proj = getattr(module, "o_proj", None)
        if proj is not None:
            out = proj(out.to(proj.weight.dtype)).float()
        outs.append(out)
    full, compressed = outs
    return float(torch.linalg.norm(compressed - full) / (torch.linalg.norm(full) + 1e-5))


def allocate_layer_budgets(importance: list[float], total: int, low: int, high: int) -> list[int]:
    """Upstream's error-aware allocation: ``low`` each plus the rest in proportion to ``importance``,
    clipped to ``[low, high]``, then the difference to ``total`` added (or taken) one token at a time
    to the layers below ``high`` (above ``low``) in order of importance (least important first when
    taking)."""
    n = len(importance)
    budgets = [min(high, max(low, low + round(s * (total - low * n)))) for s in importance]
    diff = total - sum(budgets)
    while diff:
        grow = diff > 0
        order = sorted((i for i in range(n) if (budgets[i] < high if grow else budgets[i] > low)),
                       key=lambda i: -importance[i] if grow else importance[i])
        if not order:
            break
        for i in order:
            budgets[i] += 1 if grow else -1
            diff += -1 if grow else 1
            if not diff:
                break
    return budgets


def same_kind_layers(seen) -> list[int]:
    """The layers sharing a budget allocation with ``seen``'s: those of its attention kind
    (``config.layer_types``: a sliding-window layer holds fewer tokens than a full one, so each kind's
    layers split their own total), or every layer when the model has one kind."""
    config = getattr(seen.module, "config", None)
    kinds = getattr(config, "layer_types", None) if config is not None else None
    if not kinds or len(kinds) != seen.num_layers:
        return list(range(seen.num_layers))
    return [i for i, kind in enumerate(kinds) if kind == kinds[seen.layer_idx]]


class CompressKV(ScoringDrop):
    name = "compresskv"
    hybrid_layers = False  # its calibration tables heads and errors per model layer (hybrids: attention layers only)
    family = "kv_dropping"
    paper = ("Lin et al., CompressKV: Semantic Retrieval Heads Know What Tokens are Not Important Before "
             "Generation (arXiv:2508.02401)")
    summary = ("SnapKV scores read from each layer's semantic retrieval heads (found once per model), the same "
               "tokens in every head; layer budgets by calibrated compression error")
    defaults = {"window_size": 8, "first_k": 4, "layer_adaptive": True, "min_tokens": 32, "max_factor": 3.0,
                "probe_tokens": 1024}
    params = (
        WINDOW_SIZE,
        KERNEL_SIZE,
        Param("first_k", int, None, "semantic retrieval heads per layer whose attention scores the tokens", min=1),
        Param("layer_adaptive", bool, None, "layer budgets from the calibrated error (false: every layer the mean)"),
        Param("min_tokens", int, None, "smallest layer budget of the error-aware allocation", min=1),
        Param("max_factor", float, None, "largest layer budget, as a multiple of the mean budget", min=1),
        Param("probe_tokens", int, None, "filler tokens of each needle probe of the calibration (lcbench's)", min=16),
    )
    calibration_params = ("window_size", "kernel_size", "first_k", "probe_tokens", "ratio")

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        self.needs = Needs(window=self.args["window_size"])

    # --- once per model -----------------------------------------------------------------------
    @torch.inference_mode()
    def calibrate(self, model, tokenizer):
        """``{"heads": [[query heads] per layer], "importance": [per layer, sums to 1], "ratio": r}``."""
        if self.ratio <= 0 and self.budget_tokens is None:
            return None  # nothing is compressed
        probes = []
        for k, depth in enumerate(DEPTHS):
            ids, needle, q = probe_inputs(tokenizer, self.args["probe_tokens"], depth, seed=k)
            number = tokenizer.decode(ids[needle[0]:needle[1]]).split("is")[-1].strip(" .")
            answer = tokenizer(" " + number, add_special_tokens=False)["input_ids"]
            probes.append((ids + answer, needle, len(ids), range(len(ids), len(ids) + len(answer))))
        head_total: dict[int, torch.Tensor] = {}
        for ids, needle, _, answer in probes:
            def heads_of(module, query, key, value, scaling, needle=needle, answer=answer):
                s = needle_scores(query, key, scaling, needle, answer).cpu()
                head_total[module.layer_idx] = head_total.get(module.layer_idx, 0) + s
            run_captured(model, ids, heads_of)
        layers = sorted(head_total)
        first_k = self.args["first_k"]
        heads = [head_total[i].topk(min(first_k, head_total[i].numel())).indices.tolist() for i in layers]
        ratio = self.ratio if 0 < self.ratio < 1 and self.budget_tokens is None else CALIBRATION_RATIO
        errors = [0.0] * len(layers)
        for ids, _, prompt, answer in probes:
            def error_of(module, query, key, value, scaling, prompt=prompt, answer=answer):
                i = module.layer_idx
                errors[i] += layer_error(module, query, key, value, scaling, heads[i], prompt, answer,
                                         self.args["window_size"], self.args["kernel_size"], "avg", ratio)
            run_captured(model, ids, error_of)
        total = sum(errors)
        importance = [e / total for e in errors] if total > 0 else [1.0 / len(errors)] * len(errors)
        return {"heads": heads, "importance": importance, "ratio": ratio,
                "head_scores": torch.stack([head_total[i] / len(probes) for i in layers])}

    # --- per sample ---------------------------------------------------------------------------
    def begin_sample(self):
        self._budgets: dict[int, int] = {}

    def _calibration(self):
        if self.calibration is None:
            raise UserError("compresskv has no calibration (its semantic retrieval heads and layer importance). "
                            "Fix: run it through lcbench's engine, which calibrates it once per model, or set "
                            "stage.calibration = stage.calibrate(model, tokenizer) first.")
        return self.calibration

    def scores(self, layer, seen):
        heads = self._calibration()["heads"][seen.layer_idx]
        attn = seen.window_attention  # (B, Hq, w', L)
        n = seen.context_length
        w = min(self.args["window_size"], attn.shape[2])
        m = max(0, min(n, n + seen.protected - w))  # candidates: the context before the window
        s = snap_scores(attn[:, heads, -w:, :m], self.args["kernel_size"]).mean(1)  # (B, m)
        hkv = attn.shape[1] // seen.num_groups
        s = torch.cat([s, s.new_zeros(s.shape[0], n - m)], dim=-1)[:, None, :].expand(-1, hkv, -1)
        return force_keep(s, m)

    def budget(self, layer, seen):
        if not hasattr(self, "_budgets"):
            self.begin_sample()
        mean = context_budget(layer, seen, self.ratio)
        cal = self._calibration()
        if not self.args["layer_adaptive"] or len(same_kind_layers(seen)) < 2:
            keep = mean
        else:
            n = real_context_slots(layer, seen)
            low = min(self.args["min_tokens"], mean)
            high = max(mean, min(n, int(self.args["max_factor"] * mean)))
            group = same_kind_layers(seen)
            importance = [cal["importance"][i] for i in group]
            total = sum(importance)
            importance = [e / total for e in importance] if total > 0 else [1.0 / len(group)] * len(group)
            keep = allocate_layer_budgets(importance, mean * len(group), low, high)[group.index(seen.layer_idx)]
        self._budgets[seen.layer_idx] = keep
        return keep

    def sample_stats(self) -> dict[str, float]:
        if not getattr(self, "_budgets", None):
            return {}
        return {"compresskv_budget_min": float(min(self._budgets.values())),
                "compresskv_budget_max": float(max(self._budgets.values()))}

