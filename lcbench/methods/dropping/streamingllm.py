"""StreamingLLM: attention sinks + the most recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024
(arXiv:2309.17453). The first ``n_sink`` tokens and the latest context tokens are kept. With
``rolling`` the cache then stays at its size during decoding: each generated token evicts the
oldest non-sink token (the paper's rolling KV cache; positions stay the true ones, as kvpress
does without its KeyRerotationPress).

``evict_generated`` (default true, as the paper's cache does: mit-han-lab/streaming-llm@2e50426,
``streaming_llm/kv_cache.py``, ``StartRecentKVCache`` keeps ``start_size`` sinks and the last
``recent_size`` slots of everything stored, generated tokens included) lets the window roll over
generated tokens too, so the cache never outgrows its size at decode start however long the
output. ``evict_generated=false`` is the behaviour before issue #17: only context and question
tokens are evicted, and once they are gone (sinks aside) the cache grows with the output. Multi-turn
mode forgets each turn's answer correctly either way (:mod:`.decode_eviction`).
"""

import torch

from ...params import Param
from .decode_eviction import EvictingLayer
from .scoring import ScoringDrop


class StreamingLLM(ScoringDrop):
    name = "streamingllm"
    family = "kv_dropping"
    latent_cache = True  # selects slots by the observation / quantizes the cached numbers (MLA latents too)
    paper = ("Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024 "
             "(arXiv:2309.17453)")
    summary = "attention sinks + a recent window; rolling window during decoding"
    defaults = {"n_sink": 4, "rolling": True, "evict_generated": True}
    stages = ("cache", "decode")
    params = (
        Param("n_sink", int, None, "initial tokens always kept (attention sinks)", min=0),
        Param("rolling", bool, None, "evict the oldest non-sink token for every generated token"),
        Param("evict_generated", bool, None, "the rolling window also evicts generated tokens (the paper's; "
              "false: only context and question tokens, the cache grows once they are gone)"),
    )

    def scores(self, layer, seen):
        n = seen.context_length
        b, h, _ = layer.positions.shape
        # score = slot index (recent first), with the sinks above everything
        scores = torch.arange(n, device=layer.positions.device, dtype=torch.float32).expand(b, h, n).clone()
        scores[..., : self.args["n_sink"]] = float(n + 1)
        return scores

    def after_decode_step(self, layer, layer_idx, query):
        if self.ratio <= 0 or not self.args["rolling"]:
            return layer
        layer = EvictingLayer.wrap(layer)
        generated = self.args["evict_generated"]
        m = layer.evictable(generated) - (1 if generated else 0)  # never the token just appended
        sinks = self.args["n_sink"]
        if m <= sinks:
            return layer
        b, h, _ = layer.positions.shape
        priority = torch.arange(m, device=layer.positions.device, dtype=torch.float32)
        priority[:sinks] = float("inf")
        layer.evict(priority.expand(b, h, m))
        return layer
