"""TOVA: Token Omission Via Attention.

Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024 (arXiv:2401.06104): keep the
tokens the *last* query attends to most, with the attention averaged over all heads of the layer
(so every KV head keeps the same tokens). The last token itself is always kept (as kvpress's
TOVAPress does; its own weight is nearly always the largest anyway).

Decoding (``decode_eviction``, default true; TOVA had no decode stage before issue #17): TOVA is a
multi-state RNN whose state is capped, so after every decoding step the token the new query
attends to least (softmax weights averaged over all query heads of the layer, the new token
itself included) is dropped once the cache is over its size at decode start — as the official
cache does (schwartz-lab-NLP/TOVA@9c7d09b, ``src/tova_cache.py``, ``TOVACache.reduce``: the mean
over heads of the last query's weights, top ``cache_size`` kept; there the newest token may go
too, and does here). ``evict_generated`` (default true, as there) lets any token go, generated
ones included; ``false`` only context and question tokens (the cache then grows once they are
gone). Every KV head drops the same token, so multi-turn mode's crop stays rectangular.
"""

from ...engine.attention import grouped_scores
from ...params import Param
from ..base import Needs
from .decode_eviction import EvictingLayer
from .scoring import ScoringDrop
from .select import force_keep


class TOVA(ScoringDrop):
    name = "tova"
    family = "kv_dropping"
    paper = "Oren et al., Transformers are Multi-State RNNs (TOVA), EMNLP 2024 (arXiv:2401.06104)"
    summary = "attention of the last query, averaged over heads; the last token is kept; drops the least-attended token at every decoding step"
    needs = Needs(window=1)
    stages = ("cache", "decode")
    defaults = {"decode_eviction": True, "evict_generated": True}
    params = (
        Param("decode_eviction", bool, None, "drop the least-attended token after every decoding step (constant cache size)"),
        Param("evict_generated", bool, None, "decode eviction may drop generated tokens too (the paper's; "
              "false: only context and question tokens)"),
    )

    def begin_sample(self):
        self._scaling: dict[int, float] = {}  # per compressed layer: the attention's scaling

    def compress_layer(self, layer, seen):
        if self.ratio > 0:
            if not hasattr(self, "_scaling"):
                self.begin_sample()
            head_dim = layer.dense()[0].shape[-1]
            self._scaling[seen.layer_idx] = float(getattr(seen.module, "scaling", head_dim ** -0.5))
        return super().compress_layer(layer, seen)

    def scores(self, layer, seen):
        n = seen.context_length
        last = seen.window_attention[:, :, -1, :n].float().mean(1)  # (B, n) over all query heads
        h = layer.positions.shape[1]
        scores = last[:, None, :].expand(-1, h, -1)
        return scores if seen.protected else force_keep(scores, n - 1)

    def after_decode_step(self, layer, layer_idx, query):
        if self.ratio <= 0 or not self.args["decode_eviction"] or layer_idx not in getattr(self, "_scaling", {}):
            return layer
        layer = EvictingLayer.wrap(layer)
        m = layer.evictable(self.args["evict_generated"])
        if m <= 0:
            return layer
        keys, _ = layer.dense()
        b, h, n, _ = keys.shape
        groups = query.shape[1] // h
        logits = grouped_scores(query, keys, groups, self._scaling[layer_idx])  # (B, Hkv, G, n)
        if layer.valid is not None:
            logits = logits.masked_fill_(~layer.valid[:, :, None, :], float("-inf"))
        weights = logits.softmax(-1).mean(dim=(1, 2))  # (B, n): over every query head of the layer
        layer.evict(weights[:, None, :m].expand(b, h, m))
        return layer
