"""ILRe: recall context tokens at one intermediate layer, then prefill only those.

Liang et al., "ILRe: Intermediate Layer Retrieval for Context Compression in Causal Language Models"
(arXiv:2508.17892, v2). No official implementation was found (searched 2026-12); this follows the
paper's description:

1. **Offline layer choice** (:meth:`ILRe.calibrate`, once per model through lcbench's calibration
   hook, cached): on needle-in-a-haystack probes (the needles and filler of EHPC's probes,
   :mod:`lcbench.methods.prompt.ehpc`), each layer's question-to-context attention is read out and
   the layer whose recall of the needle is highest is ``l_R`` — recall = the fraction of needle
   tokens among the top ``probe_keep`` of the context by that layer's pooled score; ties go to the
   earliest (cheapest) layer, as the paper reports early layers (``l_R = 3`` of 32 for Llama-3.1-8B).
   ``layer=N`` fixes it instead.
2. **Partial-depth encoding**: the context and the question go through layers ``0..l_R`` only (the
   later layers never run: :func:`lcbench.methods.prompt.attend.head_attention`).
3. **Recall**: the attention of the question's tokens over the context at ``l_R``, summed over query
   heads and question tokens, is max-pooled with each of several kernel sizes (``kernels``; the
   paper's *multi-pooling kernels allocation*, which keeps whole spans: a wide kernel recalls a
   needle's neighbours, a narrow one isolated tokens); the budget is split evenly between the
   kernels, each recalling its top tokens among those not yet recalled.
4. **Prefill of the recalled tokens** at their true positions (a ``context_inputs`` stage: the
   context's embeddings at the recalled positions, then the question), through every layer; their KV
   is the cache. Steps 2–3 are the method's compression time; step 4 its prefill.

``--ratio r`` recalls ``keep_count(n + q, r) − q`` of the ``n`` context tokens (the question's ``q``
counted, as lcbench's query-aware methods do), so the achieved KV ratio is the requested one.
Needs ``--query-aware`` (the question is the retrieval query). lcbench deviations, all stated:
the encoding pass of step 2 attends densely (the paper streams it with a Λ-shaped sink + window
mask to save memory; dense attention is exact, so the recall scores can only be better informed);
the split of the budget between kernels is even (the paper's allocation weights are not given in
the text available here); the probes are lcbench's, not the paper's calibration set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import UserError
from ...params import Param
from ..prompt.attend import head_attention
from ..prompt.ehpc import PROBE_DEPTHS, needle_probes
from ..prompt.lm import CompressorLM
from .recompute import GatherAndRecompute


def question_scores(probs: torch.Tensor, context: int) -> torch.Tensor:
    """(n,) attention of the question's queries over the ``context`` first tokens, summed over query
    heads and queries (``probs``: (Hq, q, L) from :func:`head_attention`)."""
    return probs[:, :, :context].float().sum((0, 1))


def recall(scores: torch.Tensor, keep: int, kernels: list[int]) -> torch.Tensor:
    """Sorted indices of the ``keep`` tokens recalled from ``scores`` (n,): the budget split evenly
    between the max-pooling ``kernels`` (remainder to the first), each recalling its own top tokens
    among those not yet recalled."""
    n = scores.shape[0]
    keep = max(0, min(n, keep))
    chosen = torch.zeros(n, dtype=torch.bool)
    share, extra = divmod(keep, len(kernels))
    for i, k in enumerate(kernels):
        want = share + (1 if i < extra else 0)
        if want <= 0:
            continue
        pooled = scores if k <= 1 else F.max_pool1d(scores[None, None], k, stride=1, padding=k // 2)[0, 0][:n]
        pooled = pooled.masked_fill(chosen, float("-inf"))
        chosen[pooled.topk(want).indices] = True
    return torch.nonzero(chosen).flatten()


class ILRe(GatherAndRecompute):
    name = "ilre"
    family = "kv_dropping"
    paper = ("Liang et al., ILRe: Intermediate Layer Retrieval for Context Compression in Causal Language Models "
             "(arXiv:2508.17892)")
    summary = ("question attention at one calibrated intermediate layer (partial-depth pass) recalls tokens with "
               "multi-size pooling; only those are prefilled (--query-aware)")
    params = (
        Param("layer", int, -1, "the retrieval layer l_R (-1: calibrated once per model on needle probes)", min=-1),
        Param("kernels", str, "1;7;15", "max-pooling kernel sizes sharing the budget, ';'-separated", numbers=True,
              nonempty=True, min=1),
        Param("probe_tokens", int, 512, "filler tokens of each calibration probe", min=16),
        Param("probe_keep", float, 0.1, "fraction of a probe's context recalled when scoring a layer", min=0.01, max=1.0),
    )
    calibration_params = ("probe_tokens", "probe_keep", "kernels")

    def kernel_sizes(self) -> list[int]:
        return [int(float(k)) for k in str(self.args["kernels"]).replace(",", ";").split(";") if k.strip()]

    def calibrate(self, model, tokenizer):
        """Each layer's needle recall on three probes (depths 25/50/75 %); the best layer, earliest on ties."""
        lm = CompressorLM(model, tokenizer, "target", self.args["probe_tokens"] * 2)
        layers = model.config.get_text_config().num_hidden_layers
        recalls = torch.zeros(layers)
        kernels = self.kernel_sizes()
        for ids, (a, b), q in needle_probes(tokenizer, self.args["probe_tokens"]):
            n = len(ids) - q
            probs = head_attention(lm, ids, range(layers), q)
            keep = max(b - a, int(round(self.args["probe_keep"] * n)))
            for layer in range(layers):
                got = recall(question_scores(probs[layer], n), keep, kernels)
                recalls[layer] += float(torch.isin(torch.arange(a, b), got).float().mean())  # needle covered
        recalls /= len(PROBE_DEPTHS)
        best = int(torch.nonzero(recalls == recalls.max()).flatten()[0])
        return {"layer": best, "recall": recalls}

    def retrieval_layer(self, model) -> int:
        layers = model.config.get_text_config().num_hidden_layers
        layer = self.args["layer"] if self.args["layer"] >= 0 else int((self.calibration or {}).get("layer", -1))
        if layer < 0:
            raise UserError("method 'ilre' has no retrieval layer: it was not calibrated. Fix: run it through "
                            "`lcbench run` (which calibrates it once per model), or pass --method-args layer=N.")
        if layer >= layers:
            raise UserError(f"method 'ilre': layer={layer} but the model has {layers} layers (0..{layers - 1}). "
                            f"Fix: --method-args layer=N with N < {layers}, or -1 to calibrate.")
        return layer

    def gather(self, model, ids, context, keep):
        layer = self.retrieval_layer(model)
        lm = CompressorLM(model, None, "target", ids.shape[1])
        q = ids.shape[1] - context
        probs = head_attention(lm, ids[0].tolist(), [layer], q)[layer]  # (Hq, q, L) through layers 0..l_R
        chosen = recall(question_scores(probs, context), keep, self.kernel_sizes())
        self._stats = {"ilre_layer": float(layer), "recalled_tokens": float(len(chosen))}
        return chosen
