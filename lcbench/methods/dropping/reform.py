"""REFORM: compress while reading, gather by embedding similarity, recompute the gathered tokens.

Song et al., "Compress, Gather, and Recompute: REFORMing Long-Context Processing in Transformers"
(arXiv:2506.01215). No official implementation was found (searched 2026-12); this follows the
paper's two phases as its text describes them:

1. **Compress.** The context, then the question, are read chunk by chunk (``chunk`` tokens) with a
   bounded cache — each chunk attends to the attention sinks and the most recent tokens kept so far
   (``sinks`` + ``window``, StreamingLLM's rule; the paper's recurrent compression) — and with *early
   exit*: the pass stops after the deepest layer whose states make the embeddings, so the later
   layers never run during this phase. Every token gets a *cross-layer context embedding*: its
   value states in the embedding heads, each head's vector normalized, concatenated across layers.
2. **Gather and recompute.** The context tokens whose embeddings are most similar (cosine, the
   maximum over the question's tokens) to the question's embeddings are gathered — the
   ``keep_count(n + q, ratio) − q`` best, so the achieved KV ratio is the requested one — and only
   they and the question are prefilled through every layer at their true positions (a
   ``context_inputs`` stage): that cache serves decoding. Phase 1 is the method's compression time,
   the recomputation its prefill.

The embedding heads are chosen once per model (:meth:`Reform.calibrate`, lcbench's calibration
hook, cached and recorded in spec.json): on needle probes (EHPC's, :mod:`lcbench.methods.prompt.ehpc`),
each KV head of the first ``depth`` layers is scored by how many needle tokens are among the
context tokens most similar to the question in that head alone; the ``heads`` best form the
embedding. lcbench deviations, stated: value states stand for the paper's choice among query/key/
value states (values carry no rotary phase, so similarity does not depend on distance); the probes
are lcbench's, not the paper's; the compressed cache of phase 1 uses StreamingLLM's sinks + recent
window as its compression rule. Needs ``--query-aware`` (the question is what is matched).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ...cache.model_caches import cache_for
from ...engine.decode import forward
from ...engine.state import PREFILL, ForwardState
from ...errors import UserError
from ...params import Param
from ..prompt.attend import StopForward
from ..prompt.ehpc import PROBE_DEPTHS, needle_probes
from .recompute import GatherAndRecompute


class ValueReadout:
    """A forward-state probe: keeps the newest tokens' value states (1, H, q, D) of the layers
    asked for, and stops the forward after the deepest of them (early exit)."""

    def __init__(self, layers: set[int]):
        self.layers, self.last = layers, max(layers)
        self.values: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        self.q_len = 0

    def seen(self, module, query, key, value, call, stored=None, layer_idx: int | None = None) -> None:
        idx = int(getattr(module, "layer_idx", -1) if layer_idx is None else layer_idx)
        if idx in self.layers:
            self.values[idx].append(value[:, :, -query.shape[2]:].float())
        if idx >= self.last:
            raise StopForward


def read_values(model, ids: list[int], layers: set[int], chunk: int, sinks: int, window: int) -> dict[int, torch.Tensor]:
    """Phase 1: ``ids`` read ``chunk`` tokens at a time through the first ``max(layers) + 1`` layers,
    each chunk attending to the sinks and the ``window`` most recent tokens kept; per layer, every
    token's value states (H, len(ids), D)."""
    device = next(model.parameters()).device
    layers_n = model.config.get_text_config().num_hidden_layers
    cache = cache_for(model, layers_n)
    readout = ValueReadout(layers)
    state = ForwardState(cache=cache, stages=[], probe=readout)
    state.phase = PREFILL
    x = torch.tensor([list(ids)], device=device)
    pos = torch.arange(len(ids), device=device)[None]
    with torch.inference_mode():
        for a in range(0, len(ids), chunk):
            with contextlib.suppress(StopForward):
                forward(model, x[:, a:a + chunk], pos[:, a:a + chunk], state)
            for layer in cache.layers[: readout.last + 1]:
                L = layer.seq_len()
                if L > sinks + window:  # the bounded cache: sinks + the most recent window
                    keep = torch.cat([torch.arange(sinks), torch.arange(L - window, L)]).to(layer.positions.device)
                    layer.select(keep.expand(*layer.positions.shape[:2], -1))
    return {i: torch.cat(v, dim=2)[0] for i, v in readout.values.items()}


def embeddings(values: dict[int, torch.Tensor], heads: list[tuple[int, int]]) -> torch.Tensor:
    """(n, E) cross-layer embeddings: each (layer, KV head)'s unit value vectors, concatenated."""
    return torch.cat([F.normalize(values[layer][head], dim=-1) for layer, head in heads], dim=-1)


def similarity(embeds: torch.Tensor, context: int) -> torch.Tensor:
    """(context,) each context token's best cosine similarity to any question token (the rest)."""
    unit = F.normalize(embeds, dim=-1)
    return (unit[:context] @ unit[context:].T).amax(-1)


class Reform(GatherAndRecompute):
    name = "reform"
    family = "kv_dropping"
    paper = ("Song et al., Compress, Gather, and Recompute: REFORMing Long-Context Processing in Transformers "
             "(arXiv:2506.01215)")
    summary = ("chunked early-exit read with a bounded cache builds cross-layer embeddings; the tokens most similar "
               "to the question are gathered and only they are recomputed (--query-aware)")
    params = (
        Param("chunk", int, 256, "tokens per chunk of the compressing read", min=1),
        Param("sinks", int, 4, "attention-sink tokens the read's bounded cache keeps", min=0),
        Param("window", int, 1024, "most recent tokens the read's bounded cache keeps", min=1),
        Param("heads", int, 8, "embedding heads (layer, KV head pairs), chosen once per model", min=1),
        Param("depth", float, 0.5, "fraction of the layers the embedding heads come from (early exit after them)",
              min=0.01, max=1.0),
        Param("probe_tokens", int, 512, "filler tokens of each calibration probe", min=16),
    )
    calibration_params = ("heads", "depth", "probe_tokens", "chunk", "sinks", "window")

    def candidate_layers(self, model) -> set[int]:
        layers = model.config.get_text_config().num_hidden_layers
        return set(range(max(1, int(round(layers * self.args["depth"])))))

    def calibrate(self, model, tokenizer):
        """Needle recall of every KV head of the first ``depth`` layers on three probes; the best ``heads``."""
        layers = self.candidate_layers(model)
        hits = {}
        for ids, (a, b), q in needle_probes(tokenizer, self.args["probe_tokens"]):
            n = len(ids) - q
            values = read_values(model, ids, layers, self.args["chunk"], self.args["sinks"], self.args["window"])
            for layer, v in values.items():
                for head in range(v.shape[0]):
                    top = similarity(v[head], n).topk(b - a).indices
                    hit = float(torch.isin(torch.arange(a, b), top.cpu()).float().mean())
                    hits[(layer, head)] = hits.get((layer, head), 0.0) + hit / len(PROBE_DEPTHS)
        ranked = sorted(hits, key=lambda lh: (-hits[lh], lh))  # best recall first, earliest on ties
        return {"heads": [list(lh) for lh in ranked[: self.args["heads"]]],
                "recall": [hits[lh] for lh in ranked[: self.args["heads"]]]}

    def gather(self, model, ids, context, keep):
        if not self.calibration:
            raise UserError("method 'reform' has no embedding heads: it was not calibrated. Fix: run it through "
                            "`lcbench run`, which calibrates it once per model.")
        heads = [tuple(h) for h in self.calibration["heads"]]
        values = read_values(model, ids[0].tolist(), {layer for layer, _ in heads}, self.args["chunk"],
                             self.args["sinks"], self.args["window"])
        self._stats = {"reform_heads": float(len(heads)), "reform_depth": float(max(l for l, _ in heads) + 1)}
        return similarity(embeddings(values, heads), context).topk(keep).indices.sort().values
