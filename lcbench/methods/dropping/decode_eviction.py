"""Eviction during decoding (StreamingLLM's rolling cache, H2O's heavy hitters, TOVA).

Every generated token that enters the cache pushes one older token out, so the cache keeps the
size it had when decoding began. What may be pushed out is each method's ``evict_generated``
parameter:

- ``evict_generated=true`` (every method's default, as its paper does it): any stored token,
  generated ones included, so the cache stays at that size however long the output grows
  (StreamingLLM's sinks + rolling window over everything; H2O's heavy hitters + recent among all
  tokens; TOVA's lowest-attention token).
- ``evict_generated=false`` (the behaviour before issue #17): only tokens that were in the cache
  before decoding began (context, question); once those are gone (sinks and recent window aside)
  the cache grows with every generated token.

Multi-turn mode (SCBench) forgets a turn's generated answer between turns with ``crop_to``, whose
``length`` counts slots as they were before the turn's evictions. :class:`EvictingLayer` keeps
each slot's *arrival index* in that numbering (slots there at the turn's start: their index then;
tokens appended later: the next numbers), so ``crop_to(length)`` drops exactly the slots whose
arrival index is ``≥ length`` — the answer's tokens still held — whatever was evicted meanwhile;
prompt tokens the answer pushed out stay evicted. When that leaves KV heads holding different
numbers of tokens (H2O evicts per head), the layer becomes a :class:`~lcbench.cache.ragged.RaggedLayer`
(each head keeps exactly its own survivors). :class:`EvictingLayer` also keeps per-slot statistics
(``tracks``, e.g. H2O's accumulated attention) aligned with the slots through appends, selections,
crops and row repeats.
"""

from __future__ import annotations

import torch

from ...cache.layer import DenseLayer, KVLayer
from ...cache.ragged import RaggedLayer
from ...errors import RunFailed


class EvictingLayer(KVLayer):
    def __init__(self, inner: KVLayer):
        super().__init__()
        self.inner = inner
        self.is_initialized = True
        self.prompt_slots: int | None = None  # slots before the current turn's decoding began
        self.evicted = 0  # evictions since then
        self.arrival: torch.Tensor | None = None  # (B, H, L) long: each slot's index as of the turn's start
        self.arrived = 0  # slots that ever entered during this turn (next arrival index)
        self.tracks: dict[str, torch.Tensor] = {}  # (B, H, L) per-slot statistics

    @classmethod
    def wrap(cls, layer: KVLayer) -> "EvictingLayer":
        """``layer`` itself if already wrapped, else a new wrapper; starts a turn when needed
        (called after a decode step appended its token, which is not a prompt slot)."""
        out = layer if isinstance(layer, EvictingLayer) else cls(layer)
        if out.prompt_slots is None:
            n = out.seq_len()
            out.prompt_slots = n - 1
            out.evicted = 0
            b, h, _ = out.positions.shape
            out.arrival = torch.arange(n, device=out.positions.device).expand(b, h, n).clone()
            out.arrived = n
        return out

    def _copy_state(self, out: "EvictingLayer", rows=None, repeat: int | None = None) -> "EvictingLayer":
        out.prompt_slots, out.evicted, out.arrived = self.prompt_slots, self.evicted, self.arrived

        def rows_of(t):
            if repeat is not None:
                return t.repeat_interleave(repeat, dim=0)
            return t.index_select(0, rows.to(t.device))

        out.arrival = None if self.arrival is None else rows_of(self.arrival)
        out.tracks = {k: rows_of(t) for k, t in self.tracks.items()}
        return out

    # --- delegation -----------------------------------------------------------------------
    @property
    def positions(self):
        return self.inner.positions

    @property
    def valid(self):
        return self.inner.valid

    def dense(self):
        return self.inner.dense()

    def nbytes(self) -> int:
        return self.inner.nbytes()

    def append(self, keys, values, positions, valid):
        self.inner.append(keys, values, positions, valid)
        q = keys.shape[2]
        for name, t in self.tracks.items():
            pad = t.new_zeros(*t.shape[:2], q)
            self.tracks[name] = torch.cat([t, pad], dim=-1)
        if self.arrival is not None:
            b, h, _ = self.arrival.shape
            new = torch.arange(self.arrived, self.arrived + q, device=self.arrival.device).expand(b, h, q)
            self.arrival = torch.cat([self.arrival, new], dim=-1)
            self.arrived += q

    def select(self, index):
        index, _ = index.sort(dim=-1)
        valid = self.inner.valid
        self.inner.select(index)
        # a ragged layer re-packs each head's valid slots first (its padding goes last): follow it
        order = None
        if isinstance(self.inner, RaggedLayer) and valid is not None:
            order = _kept_first(valid.gather(-1, index))[..., : self.inner.seq_len()]

        def follow(t):
            t = t.gather(-1, index)
            return t if order is None else t.gather(-1, order)

        self.tracks = {name: follow(t) for name, t in self.tracks.items()}
        if self.arrival is not None:
            self.arrival = follow(self.arrival)

    def crop_to(self, length):
        """Forget the current turn's tokens from ``length`` on, ``length`` counting slots as they
        were before this turn's evictions (the engine's multi-turn crop: the generated answer)."""
        if self.arrival is None:  # no decode step since the last crop: storage order is that numbering
            self.inner.crop_to(length)
            self.tracks = {k: t[..., :length] for k, t in self.tracks.items()}
            return
        keep = self.arrival < length
        valid = self.inner.valid
        if valid is not None:
            keep = keep & valid
        counts = keep.sum(-1)
        if bool((counts == counts.flatten()[0]).all()):
            count = int(counts.flatten()[0])
            if bool(keep[..., :count].all()):  # a prefix (nothing generated was evicted): crop
                self.inner.crop_to(count)
                self.tracks = {k: t[..., :count] for k, t in self.tracks.items()}
            else:
                self.select(_kept_first(keep)[..., :count])
        elif isinstance(self.inner, (DenseLayer, RaggedLayer)):
            self.drop(~keep)  # heads kept different numbers of prompt tokens: each head keeps exactly its own
        else:
            raise RunFailed(
                f"multi-turn mode: forgetting a generated answer left KV heads with different numbers of "
                f"tokens, which a {type(self.inner).__name__} cannot hold. Fix: pass evict_generated=false "
                f"to the decode-evicting method (generated tokens are then never evicted), or chain it "
                f"without quantization.")
        self.prompt_slots, self.evicted, self.arrival, self.arrived = None, 0, None, 0

    def repeat_rows(self, n):
        return self._copy_state(EvictingLayer(self.inner.repeat_rows(n)), repeat=n)

    def keep_rows(self, rows):
        return self._copy_state(EvictingLayer(self.inner.keep_rows(rows)), rows=rows)

    # --- eviction -------------------------------------------------------------------------
    def evictable(self, generated: bool = False) -> int:
        """Leading slots that may be evicted now: every slot with ``generated`` (the papers'
        behaviour), else what is left of the prompt (generated tokens are the last slots)."""
        return self.seq_len() if generated else self.prompt_slots - self.evicted

    def evict(self, priority: torch.Tensor) -> None:
        """Evict, in every row and head, the slot with the lowest ``priority`` (B, H, m) among the
        first ``m ≤ evictable()`` slots. Padding slots (a left-padded question part in a batch of
        turns) are never chosen: each row evicts the real token it would evict decoding alone, and
        its padding stays masked (evicting padding first would let a padded row keep more)."""
        m = priority.shape[-1]
        valid = self.valid
        if valid is not None:
            priority = priority.masked_fill(~valid[..., :m], float("inf"))
        drop = priority.argmin(dim=-1, keepdim=True)  # (B, H, 1)
        b, h, _ = drop.shape
        n = self.seq_len()
        slots = torch.arange(n, device=drop.device).expand(b, h, n)
        self.select(slots[slots != drop].view(b, h, n - 1))
        self.evicted += 1

    def drop(self, evict: torch.Tensor) -> None:
        """Evict every slot where ``evict`` (B, H, L) is true, per KV head (DMS: each head judges
        its own tokens), so heads may keep different numbers of slots: the inner layer becomes a
        :class:`~lcbench.cache.ragged.RaggedLayer` holding exactly each head's survivors, and the
        per-slot arrival indices and tracks follow them (multi-turn crops stay exact)."""
        keep = ~evict
        if self.valid is not None:
            keep = keep & self.valid
        order = _kept_first(keep)[..., : int(keep.sum(-1).max())]
        self.tracks = {k: t.gather(-1, order) for k, t in self.tracks.items()}
        if self.arrival is not None:
            self.arrival = self.arrival.gather(-1, order)
        self.inner = RaggedLayer.from_layer(self.inner, keep)


def _kept_first(keep: torch.Tensor) -> torch.Tensor:
    """(B, H, L) slot indices, per row and head the kept ones first (in storage order)."""
    return torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
