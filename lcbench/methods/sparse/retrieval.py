"""The shared frame of context-retrieval sparse attention (InfLLM's memory blocks, Squeezed
Attention's key clusters): the context is prefilled densely while the method learns what it needs
from each layer's queries and keys; the question prefill and every decoding step then attend only
the context keys the method keeps for those queries, plus everything after the context.

A subclass implements :meth:`ContextRetrieval.learn` (per layer, from the context pass; None leaves
the layer dense) and :meth:`ContextRetrieval.keep` (which stored slots the queries attend). The
selection is applied as a mask over the whole cache through the engine's dense attention, so the
numbers are exact and the latency a reference one; ``attention_density`` counts the query–key pairs
attended over those visible, with dense layers (the model's sliding-window layers, layers the
method leaves alone) counted as dense. The whole KV cache is kept.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any, ClassVar

import torch

from ...engine.attention import AttentionCall, dense_attention, storage_mask
from ...errors import UserError
from ..base import Stage


def storage_causal(q: int, total: int, device) -> torch.Tensor:
    """(1, 1, q, total) causal mask of ``q`` newest queries over ``total`` stored keys."""
    rows = torch.arange(q, device=device)[:, None] + (total - q)
    return (torch.arange(total, device=device)[None, :] <= rows)[None, None]


class ContextRetrieval(Stage, metaclass=ABCMeta):
    stages = ("prefill_attention", "decode")
    # True when the method leaves the question prefill dense (as upstream's prompt prefill), so the
    # density is the decoding steps'
    dense_question: ClassVar[bool] = False
    # reference: the selection is a mask over the whole cache (dense compute), not a gathered kernel
    reference_latency = True
    # the selected slots are attended by the engine's dense attention, with the model's softcap and sinks
    # (the selection itself ranks the plain logits: a softcap is monotonic); a chunked layer learns
    # nothing and stays dense within its chunk, counted so
    attention_terms = frozenset({"softcap", "sinks", "chunk"})

    def begin_sample(self) -> None:
        self._learned: dict[int, Any] = {}
        self._contexts: dict[int, int] = {}
        self._attended = 0.0
        self._visible = 0.0

    # --- what a method implements ------------------------------------------------------------
    @abstractmethod
    def learn(self, query: torch.Tensor, key: torch.Tensor, scaling: float, groups: int,
              layer_idx: int) -> Any | None:
        """What the method keeps of one layer's context pass (None: the layer stays dense)."""

    @abstractmethod
    def keep(self, learned: Any, query: torch.Tensor, key: torch.Tensor, valid_queries: torch.Tensor,
             scaling: float) -> torch.Tensor:
        """(B, Hkv or 1, q, L) the stored slots ``query`` (B, Hq, q, D) attends among the layer's
        ``key`` (B, Hkv, L, D); ``valid_queries`` (B or 1, q) marks the queries that are not padding."""

    # --- the frame ----------------------------------------------------------------------------
    def prefill_attention(self, module, query, key, value, mask, scaling, layer_idx, window=None,
                          softcap=None, sinks=None, chunk=None):
        if self.ratio <= 0:
            return None
        if not hasattr(self, "_learned"):
            self.begin_sample()
        n, total = query.shape[2], key.shape[2]
        if n == total:  # the context pass: dense, and learn from it
            if window is None and chunk is None and key.shape[0] == 1:
                learned = self.learn(query, key, scaling, getattr(module, "num_key_value_groups", 1), layer_idx)
                if learned is not None:
                    self._learned[layer_idx], self._contexts[layer_idx] = learned, total
            return None
        if self.dense_question:
            return None
        if layer_idx not in self._learned:
            self._count(key.shape[0] * key.shape[1] * n * min(total, window or chunk or total), None)
            return None
        context = self._contexts[layer_idx]
        if total - n != context:
            raise UserError(f"{self.name} selects among the context's slots as they were prefilled ({context}), but "
                            f"the layer now holds {total - n}: a cache stage changed it. Fix: chain {self.name} with "
                            f"no KV-dropping stage (it keeps the whole cache).")
        base = mask if mask is not None else storage_causal(n, total, query.device)
        valid = base[:, 0, -1, torch.arange(total - n, total, device=query.device)]  # the last query sees every valid slot
        return self._attend(module, query, key, value, base, AttentionCall(scaling, softcap=softcap, sinks=sinks),
                            layer_idx, valid)

    def decode_attention(self, module, query, layer, scaling, layer_idx, window=None, softcap=None, sinks=None,
                         chunk=None):
        if self.ratio <= 0:
            return None
        base = storage_mask(layer, 1, window, chunk)
        if base is None:
            base = torch.ones(1, 1, 1, layer.seq_len(), dtype=torch.bool, device=query.device)
        if window is not None or layer_idx not in getattr(self, "_learned", {}):
            b, hkv = layer.positions.shape[:2]
            self._count(float(base.expand(b, hkv, 1, -1).sum()), None)
            return None
        keys, values = layer.dense()
        valid = torch.ones(query.shape[0], 1, dtype=torch.bool, device=query.device)
        return self._attend(module, query, keys, values, base, AttentionCall(scaling, softcap=softcap, sinks=sinks),
                            layer_idx, valid)

    def _attend(self, module, query, key, value, base, call: AttentionCall, layer_idx: int, valid):
        b, _, n, _ = query.shape
        total, hkv = key.shape[2], key.shape[1]
        allowed = base & self.keep(self._learned[layer_idx], query, key, valid, call.scaling)
        self._count(float(base.expand(b, hkv, n, total).sum()), float(allowed.expand(b, hkv, n, total).sum()))
        return dense_attention(module, query, key, value, allowed, call.scaling, call)

    def _count(self, visible: float, attended: float | None) -> None:
        if not hasattr(self, "_learned"):
            self.begin_sample()
        self._visible += visible
        self._attended += visible if attended is None else attended

    def sample_stats(self) -> dict[str, float]:
        if getattr(self, "_visible", 0.0):
            return {"attention_density": self._attended / self._visible}
        return {}
