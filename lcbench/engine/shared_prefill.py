"""Prefill once, compress many (issue #14): runs that differ only in their cache and decode stages
reuse one prefill of each context.

For a query-agnostic chain whose stages are all cache or decode stages, the prefill is the same
computation in every run: cache stages act on each layer *after* its attention ran, so what the
next layer computes never depends on them. So the first run to meet a context prefills it once
with a :class:`Recorder` as its only cache stage — it keeps every layer whole and what the layer
observed, for the union of what the sharing runs' stages need (``Needs.merge``) — and every run
(that one included) compresses its own copy of each recorded layer with its own stages and the
recorded observation, exactly as it would have during its own prefill. Predictions, kept tokens,
KV bytes and the achieved ratio are therefore those of the run alone.

Timing and memory stay honest: every sharing run records the one measured prefill as its
``prefill_s``, the shared observation cost plus its own compression as ``compress_s``, and
``shared_prefill = True``; its peak memory includes the recording pass (which holds the whole
dense cache, unlike a compressing prefill), so tables mark those runs like batched ones.

The recorded contexts are held in a :class:`PrefillMemo` up to a byte budget (``--share-prefill``:
``auto`` = half the free memory, a number of MB, or ``off``); a context that does not fit is
prefilled again by the next run (results are the same either way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..cache import KVCache
from ..methods.base import LayerObservation, Needs, Stage
from ..methods.budget import compress
from ..methods.chain import Chain

SHAREABLE_STAGES = {"cache", "decode"}


def share_refusal(chain: Chain, query_aware: bool, prefill_chunk: int | None) -> str | None:
    """Why a run cannot reuse a shared prefill (None when it can)."""
    if query_aware:
        return "query-aware mode compresses each turn's own prefill"
    if prefill_chunk:
        return "a chunked prefill compresses on its last chunk only"
    for stage in chain.stages:
        other = set(stage.stages) - SHAREABLE_STAGES
        if other:
            return f"method '{stage.name}' has a {sorted(other)[0]} stage, which changes the prefill"
        if stage.cross_sample_state:
            return f"method '{stage.name}' carries state from one sample to the next"
    return None


class Recorder(Stage):
    """The only cache stage of a shared prefill: keeps each layer whole, and what it observed."""

    name = "shared-prefill-recorder"
    family = "baseline"
    stages = ("cache",)

    def __init__(self, needs: Needs):
        super().__init__(0.0)
        self.needs = needs
        self.seen: dict[int, LayerObservation] = {}

    def compress_layer(self, layer, seen):
        self.seen[seen.layer_idx] = seen
        return layer


@dataclass
class Recorded:
    """One context's shared prefill: its whole cache, each layer's observation, and what it cost."""

    cache: KVCache
    seen: dict[int, LayerObservation]
    needs: Needs
    prefill_s: float
    observe_s: float  # computing the observations (charged to every sharing run's compress_s)
    peak_memory_mb: float | None

    def nbytes(self) -> int:
        total = self.cache.nbytes() + self.cache.state_nbytes()
        for seen in self.seen.values():
            for t in (seen.window_attention, seen.window_queries, seen.attention_sum, seen.queries):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total


@dataclass
class PrefillMemo:
    """Recorded prefills by context, within ``budget_bytes`` (None: unbounded), for the union of
    the sharing runs' ``needs``."""

    needs: Needs
    budget_bytes: int | None
    held: dict[tuple, Recorded] = field(default_factory=dict)
    used_bytes: int = 0

    def get(self, model, ids: list[int], needs: Needs) -> Recorded | None:
        hit = self.held.get((id(model), tuple(ids)))
        return hit if hit is not None and hit.needs.merge(needs) == hit.needs else None

    def put(self, model, ids: list[int], recorded: Recorded) -> None:
        size = recorded.nbytes()
        if self.budget_bytes is not None and self.used_bytes + size > self.budget_bytes:
            return  # does not fit: the next run prefills this context again
        self.held[(id(model), tuple(ids))] = recorded
        self.used_bytes += size

    def clear(self) -> None:
        self.held.clear()
        self.used_bytes = 0


def compress_recorded(recorded: Recorded, stages: list[Stage]) -> KVCache:
    """A new cache: each recorded layer copied and compressed by ``stages`` (their cache hooks)
    with the layer's recorded observation, in layer order as during a compressing prefill."""
    cache_stages = [s for s in stages if "cache" in s.stages]
    cache = type(recorded.cache)(len(recorded.cache.layers))
    with torch.inference_mode():
        for i, layer in enumerate(recorded.cache.layers):
            copy = layer.repeat_rows(1)
            for stage in cache_stages if i in recorded.seen else ():  # a hybrid's recurrent layers: no attention
                copy = compress(stage, copy, recorded.seen[i])
            cache.layers[i] = copy
        cache.side_states = {i: state.repeat_rows(1) for i, state in recorded.cache.side_states_of().items()}
    return cache


def budget_bytes(setting: str, device: str) -> int | None:
    """``--share-prefill`` as a byte budget: ``auto`` = half the free memory (the CUDA allocator's
    on a GPU, available RAM on a CPU), a number = MB."""
    if setting == "auto":
        if torch.device(device).type == "cuda":
            return torch.cuda.mem_get_info(torch.device(device))[0] // 2
        import psutil

        return int(psutil.virtual_memory().available) // 2
    return int(float(setting) * 2**20)
