"""Layers that reuse an earlier layer's keys and values (KV sharing: Gemma-3n, Gemma-4).

From ``config.num_kv_shared_layers`` on, such a model's last layers compute no keys or values of
their own: each attends with its own queries over what the last non-shared layer of the same kind
(sliding or full) produced in the same forward. transformers 5.25 implements it in the attention
module (``modeling_gemma4.Gemma4TextAttention.forward``, ``modeling_gemma3n.Gemma3nTextAttention``):
the producing layer (``store_full_length_kv``) puts the keys and values ``Cache.update`` returned
into ``shared_kv_states[layer_type]``, and a reusing layer (``is_kv_shared_layer``) takes them from
there and never touches the cache.

lcbench follows that exactly:

- a reusing layer holds no cache: its bytes are 0 (the model's real memory), no method compresses
  it, and the uncompressed reference counts only the producing layers;
- it attends over the keys and values the model hands it — the producing layer's, as they stood
  when that layer attended in this forward: before the cache stages of the compressing pass ran
  on it, before a window layer forgot what no later query sees, before a decode stage evicted
  after the step. Its mask is built from a :class:`SourceView` taken at that moment, so what a
  reusing layer sees is what its producer saw; on every later forward both see the compressed
  cache (as kvpress's forward hooks, which compress after the producing layer's forward, leave it);
- no stage replaces its attention (sparse prefill, decode-time selection act on producing layers).

Methods whose math takes every layer for one with its own cache are refused on such models, as on
hybrids (:func:`lcbench.engine.attach.hybrid_refusal`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..cache.layer import KVLayer
from ..cache.shared import SharedContextLayer


@dataclass(frozen=True)
class SourceView:
    """What a producing layer held when its attention ran: storage order's true ``positions`` and
    ``valid`` (B, H, L), its per-slot ``bias`` (or None) and — for rows decoded as a joint batch,
    whose attention does not receive the keys from the model — its ``keys`` and ``values``. A layer
    of rows sharing one context is kept as itself (``shared``): its context never changes."""

    positions: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    shared: SharedContextLayer | None = None
    parts: tuple[tuple["SourceView", int], ...] | None = None  # a joint batch: (view, rows) per run

    def seq_len(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]


def source_view(layer: KVLayer, with_tensors: bool = False) -> SourceView:
    """A :class:`SourceView` of ``layer`` now. Tensors are referenced, not copied: a layer that drops
    or merges slots replaces its tensors, and one that appends writes only past the slots it held
    (cache/room.py), so the view keeps what the layer held when it was taken."""
    from .attention import slot_bias
    from .joint import JointLayer

    if isinstance(layer, JointLayer):
        return SourceView(parts=tuple((source_view(p.layer, with_tensors=True), p.rows) for p in layer.parts))
    if isinstance(layer, SharedContextLayer):
        return SourceView(shared=layer)
    keys, values = layer.dense() if with_tensors else (None, None)
    return SourceView(layer.positions, layer.valid, slot_bias(layer), keys, values)


def reused_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, view: SourceView,
                     call) -> torch.Tensor:
    """A reusing layer's attention over its producer's keys and values (``key``/``value``: what the
    model handed it), masked as the producer was (window, chunk, padding, per-slot bias)."""
    from .attention import shared_context_attention

    if view.shared is not None:
        return shared_context_attention(module, query, _last_queries(view.shared, query.shape[2]), call)
    if view.parts is not None:  # each run's rows over its own layer (the model handed no keys for them)
        outs, start = [], 0
        for part, rows in view.parts:
            outs.append(reused_attention(module, query[start:start + rows], part.keys, part.values, part, call))
            start += rows
        return torch.cat(outs)
    return _dense_over(module, query, key, value, view, call)


def _last_queries(layer: SharedContextLayer, n: int) -> SharedContextLayer:
    """``layer`` as seen by the last ``n`` of this pass's queries: transformers runs the reusing layers
    of a prefill pass on its last position only (``Gemma4TextModel._maybe_slice_kv_shared_inputs``:
    they write no cache, so no other position needs them)."""
    if layer.query_slots.shape[-1] == n:
        return layer
    view = copy.copy(layer)
    view.query_slots = layer.query_slots[..., -n:]
    return view


def _dense_over(module, query, key, value, view: SourceView, call) -> torch.Tensor:
    from .attention import dense_attention, storage_mask

    mask = storage_mask(view, query.shape[2], call.window, call.chunk)
    return dense_attention(module, query, key, value, mask, call.scaling, call, view.bias)
