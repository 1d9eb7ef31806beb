"""TriangleMix: dense attention in the shallow layers, Triangle attention in the deeper ones.

He et al., "TriangleMix: A Lossless and Efficient Attention Pattern for Long Context Prefilling"
(arXiv:2507.21526); official implementation in github.com/microsoft/MInference (``TriangleMix/``,
``minference/modules/tri_mix.py``), read at commit fb56c917f618e8645f1cfc37535afd7424d78f0d.

Layers before ``starting_layer`` (upstream's name; default half the model's layers, upstream 16 of
Llama-3.1-8B's 32) attend densely. The others use *Triangle* attention: every query sees the first
``sink_tokens`` (upstream ``n_init`` 8) and a local window, and the last ``last_queries`` (upstream
``last_n`` 128) see the whole context — only the "middle Q-K" section, which the paper's
gradient probe finds contributes little to decoding in deep layers, is skipped. This is SCBench's
Tri-shape (:mod:`.shapes`) per layer; upstream fixes the window (``n_local`` 512), lcbench sizes it
so the density over *all* layers (dense ones counted as computed) meets ``1 − ratio``. A target at
or below the dense layers' share cannot be met: the first layer refuses it (``CompressionShortfall``,
a failed run naming the largest ratio it can approach).
"""

from __future__ import annotations


from ...errors import CompressionShortfall, UserError
from ...params import Param
from .kernel import dense_pairs
from .shapes import TriShape


class TriMix(TriShape):
    name = "tri_mix"
    family = "sparse_attention"
    paper = ("He et al., TriangleMix: A Lossless and Efficient Attention Pattern for Long Context "
             "Prefilling (arXiv:2507.21526)")
    summary = "dense shallow layers, Triangle (sinks + local + dense last queries) deep layers"
    tolerance = 0.05
    defaults = {"block_size": 64, "sink_tokens": 8, "last_queries": 128, "starting_layer": -1}
    params = TriShape.params + (
        Param("starting_layer", int, None, "first layer with Triangle attention (-1: half the layers)", min=-1),
    )

    _deep_target: float = 1.0

    def first_triangle_layer(self, num_layers: int) -> int:
        start = self.args["starting_layer"]
        return num_layers // 2 if start < 0 else min(start, num_layers)

    def target_density(self) -> float:
        return self._deep_target

    def prefill_attention(self, module, query, key, value, mask, scaling, layer_idx, window=None, **terms):
        num_layers = getattr(getattr(module, "config", None), "num_hidden_layers", None) or layer_idx + 1
        start = self.first_triangle_layer(num_layers)
        if self.ratio > 0 and start >= num_layers:
            raise UserError(f"method 'tri_mix': starting_layer={start} leaves no Triangle layer in a "
                            f"{num_layers}-layer model, so no attention is skipped. Fix: pass a smaller "
                            f"starting_layer (or -1 for half the layers).")
        target = 1.0 - self.ratio
        deep = num_layers - start
        self._deep_target = (target * num_layers - start) / deep
        if self.ratio > 0 and self._deep_target <= 0:  # a failed run (the sweep's others still go)
            raise CompressionShortfall(f"method 'tri_mix': {start} of {num_layers} layers attend densely, so the "
                            f"density cannot fall to {target:.3f} (--ratio {self.ratio}); the largest "
                            f"ratio it can approach is {deep / num_layers:.3f}. Fix: request a smaller "
                            f"--ratio, or start Triangle attention earlier (starting_layer=N).")
        if layer_idx >= start:
            return super().prefill_attention(module, query, key, value, mask, scaling, layer_idx, window, **terms)
        L = key.shape[2]
        if query.shape[2] != L:
            return None
        total = key.shape[0] * key.shape[1] * dense_pairs(L, self.args["block_size"], key.device, window,
                                                          terms.get("chunk"))
        self._count(total, total)  # a dense layer: every pair computed (the engine's dense path)
        return None
