"""The shared part of every sparse-prefill method: when to replace dense attention, how ``--ratio``
becomes a density target, and the density bookkeeping that lands in the records.

``--ratio r`` asks for attention density ``1 − r``: the fraction of the causal (query, key) pairs
of the context prefill that are computed, averaged over layers and KV heads. Each method builds
its pattern for the largest density not above the target (the pattern families are discrete, so
the achieved density is at most the target and as close as the pattern allows). The full KV cache
is kept: sparse prefill saves time, not memory — records show ``attention_density`` next to the
unchanged ``kv_bytes``.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Callable

import torch

from ...params import Param
from ..base import Stage
from .kernel import BlockPattern, block_sparse_attention, dense_pairs

BLOCK_SIZE = Param("block_size", int, None, "tokens per query/key block of the sparse pattern", min=1)


def densest_within(target: float, build: Callable[[float], BlockPattern], lo: float, hi: float,
                   integer: bool, steps: int = 24) -> BlockPattern:
    """The pattern ``build(x)`` for x in [lo, hi] with the largest density ≤ ``target`` (density
    grows with x); ``build(lo)`` when even that is denser than the target."""
    best = build(lo)
    if best.density() > target:
        return best
    top = build(hi)
    if top.density() <= target:
        return top
    for _ in range(steps):
        if (integer and hi - lo <= 1) or (not integer and hi - lo < 1e-4):
            break
        mid = (lo + hi) // 2 if integer else (lo + hi) / 2
        pattern = build(mid)
        if pattern.density() <= target:
            lo, best = mid, pattern
        else:
            hi = mid
    return best


class DensityStats:
    """The density bookkeeping of a sparse-prefill stage: computed and total causal pairs of the
    sample's prefill, reported as ``attention_density`` (mixed in before :class:`Stage`)."""

    def begin_sample(self) -> None:
        self._computed = 0.0
        self._total = 0.0

    def _count(self, computed: float, total: float) -> None:
        if not hasattr(self, "_total"):
            self.begin_sample()
        self._computed += computed
        self._total += total

    def sample_stats(self) -> dict[str, float]:
        if not getattr(self, "_total", 0.0):
            return {}
        density = self._computed / self._total
        return {"attention_density": density, "prefill_attention_density": density}


class SparsePrefill(DensityStats, Stage, metaclass=ABCMeta):
    """Base of the sparse-prefill methods: subclasses implement :meth:`pattern`.

    The pattern replaces attention only where the whole sequence is being prefilled from an
    empty cache (the context pass; in query-aware mode the context with its question). Question
    parts prefilled later on top of a cache, and decoding, stay dense. Subclasses build their
    patterns with ``window=self.window`` (the layer's sliding window, or None).
    """

    stages = ("prefill_attention",)
    # it computes on the q/k/v the model hands attention (on MLA: the expanded keys and values)
    latent_cache = True
    # reference: on CPU the block pattern runs as a loop of small SDPA calls per block row (kernel.py), on
    # CUDA through FlexAttention, not the methods' own fused kernels
    reference_latency = True

    def target_density(self) -> float:
        return 1.0 - self.ratio

    @abstractmethod
    def pattern(self, query: torch.Tensor, key: torch.Tensor, groups: int, scaling: float) -> BlockPattern:
        """The pattern for one layer: ``query`` (B, Hq, L, D), ``key`` (B, Hkv, L, D)."""

    window: int | None = None  # the current layer's sliding window, while its pattern is built

    # the block-sparse kernel applies Gemma-2's softcap and gpt-oss's sinks on the computed blocks; the
    # patterns are estimated from the plain logits (a softcap is monotonic, so logit rankings stay); a
    # chunked layer (Llama-4) is attended densely within its chunks and counted so
    attention_terms = frozenset({"softcap", "sinks", "chunk"})

    def prefill_attention(self, module, query, key, value, mask, scaling, layer_idx, window=None,
                          softcap=None, sinks=None, chunk=None):
        """On a sliding-window layer the pattern lives inside the window: pairs it hides are
        neither computed nor counted, so the density is over the pairs the layer attends densely.
        ``softcap`` / ``sinks``: the model's, applied to the computed blocks (kernel.py). A chunked
        layer (``chunk``) is not sparsified: the engine attends it densely within its chunks, and
        those pairs count as computed."""
        L = key.shape[2]
        if query.shape[2] != L:  # a question part on an existing cache: dense, not counted
            return None
        total = key.shape[0] * key.shape[1] * dense_pairs(L, self.args["block_size"], key.device, window, chunk)
        if chunk is not None and chunk < L:
            self._count(total, total)
            return None
        self.window = window if window is not None and window < L else None
        if self.ratio <= 0 or mask is not None or L <= self.args["block_size"]:
            self._count(total, total)
            return None
        pattern = self.pattern(query, key, getattr(module, "num_key_value_groups", 1), scaling)
        computed, _ = pattern.pair_counts()
        self._count(float(computed.sum()), total)
        return block_sparse_attention(query, key, value, pattern, scaling, softcap=softcap, sinks=sinks)
