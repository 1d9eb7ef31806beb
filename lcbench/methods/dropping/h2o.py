"""H2O: heavy hitters + recent tokens, in prefill and at every decoding step.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023 (arXiv:2306.14048). A token's score is the attention it has received,
accumulated over every query so far (averaged over the query heads of its KV group). The budget
is split between the most recent tokens (``recent_ratio`` of it) and the highest-scoring others.
During decoding each new query's attention is added to the scores and, to keep the cache size,
the lowest-scoring token outside the recent window is evicted (``decode_eviction``). The
decode-time attention uses the layer's ``scaling`` (1/√d when the module has none).

``evict_generated`` (default true) evicts among *all* tokens outside the recent window, generated
ones included, as the paper's real-drop cache does (FMInference/H2O@ac75c2a,
``h2o_hf/utils_real_drop/modify_llama.py``, ``H2OKVCache_LayerWise``: accumulated scores over every
stored token, the top ``hh_size`` of those before the last ``recent_size`` kept), so the cache
stays at its size at decode start however long the output. ``evict_generated=false`` is the
behaviour before issue #17: only context and question tokens are evicted and generated ones
always stay (the cache grows once the evictable prompt is gone). Scores are per KV head (averaged
over its query group), so heads evict different tokens; multi-turn mode forgets each answer per
head (:mod:`.decode_eviction`).
"""

import torch

from ...engine.attention import grouped_scores
from ...params import Param
from ..base import Needs
from .decode_eviction import EvictingLayer
from .scoring import ScoringDrop
from .select import context_budget, force_keep, group_mean, keep_top, pass_slots

TRACK = "h2o"


class H2O(ScoringDrop):
    name = "h2o"
    family = "kv_dropping"
    paper = ("Zhang et al., H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large "
             "Language Models, NeurIPS 2023 (arXiv:2306.14048)")
    summary = "accumulated attention (heavy hitters) + recent tokens; evicts again at every decoding step"
    defaults = {"recent_ratio": 0.5, "decode_eviction": True, "evict_generated": True}
    stages = ("cache", "decode")
    needs = Needs(full_attention_sum=True)
    params = (
        Param("recent_ratio", float, None, "share of the budget given to the most recent tokens", min=0, max=1),
        Param("decode_eviction", bool, None, "keep evicting during decoding (constant cache size)"),
        Param("evict_generated", bool, None, "decode eviction may evict generated tokens too (the paper's; "
              "false: only context and question tokens, generated ones always stay)"),
    )

    def begin_sample(self):
        self._accumulated: dict[int, torch.Tensor] = {}  # per layer: scores of the kept slots
        self._recent: dict[int, int] = {}
        self._scaling: dict[int, float] = {}

    def _recent_tokens(self, layer, seen) -> int:
        return int(round(context_budget(layer, seen, self.ratio) * self.args["recent_ratio"]))

    def scores(self, layer, seen):
        n = seen.context_length
        accumulated = group_mean(seen.attention_sum, seen.num_groups)[..., :n]
        return force_keep(accumulated, n - self._recent_tokens(layer, seen), n)

    def compress_layer(self, layer, seen):
        if self.ratio <= 0:
            return layer
        if not hasattr(self, "_accumulated"):
            self.begin_sample()
        recent = self._recent_tokens(layer, seen)
        layer = keep_top(layer, self.scores(layer, seen), self.ratio, seen)
        accumulated = group_mean(seen.attention_sum, seen.num_groups)
        index = pass_slots(seen, layer.positions).clamp(max=accumulated.shape[-1] - 1)
        self._accumulated[seen.layer_idx] = accumulated.gather(-1, index)
        self._recent[seen.layer_idx] = recent
        module = seen.module
        head_dim = layer.dense()[0].shape[-1]
        self._scaling[seen.layer_idx] = float(getattr(module, "scaling", head_dim ** -0.5))
        return layer

    def after_decode_step(self, layer, layer_idx, query):
        if self.ratio <= 0 or not self.args["decode_eviction"] or layer_idx not in getattr(self, "_accumulated", {}):
            return layer
        layer = EvictingLayer.wrap(layer)
        keys, _ = layer.dense()
        b, h, n, _ = keys.shape
        if TRACK not in layer.tracks:
            start = self._accumulated[layer_idx][..., :n].expand(b, h, -1)
            layer.tracks[TRACK] = torch.cat([start, start.new_zeros(b, h, n - start.shape[-1])], dim=-1)
        groups = query.shape[1] // h
        # per KV head on its grouped queries, keys upcast in chunks (no repeated float32 keys)
        logits = grouped_scores(query, keys, groups, self._scaling[layer_idx])  # (B, Hkv, G, n)
        if layer.valid is not None:
            logits = logits.masked_fill_(~layer.valid[:, :, None, :], float("-inf"))
        probs = logits.softmax(-1).view(b, h * groups, n)  # (B, Hq, n)
        layer.tracks[TRACK] = layer.tracks[TRACK] + group_mean(probs, groups)
        m = min(layer.evictable(self.args["evict_generated"]), n - self._recent[layer_idx])
        if m > 0:
            layer.evict(layer.tracks[TRACK][..., :m])
        return layer
