"""Eviction during decoding (StreamingLLM's rolling cache, H2O's heavy hitters).

Every generated token that enters the cache pushes one older token out, so the cache keeps the
size it had when decoding began. Only tokens that were there before decoding began (context,
question) are evicted, never generated ones: so the generated tokens stay the last slots, and
when the engine forgets an answer between multi-turn turns by storage length (``crop_to``), the
length it asks for is shifted by the number of evictions. :class:`EvictingLayer` wraps any
:class:`KVLayer` to keep that count and per-slot statistics (``tracks``, e.g. H2O's accumulated
attention) aligned with the slots through appends, selections, crops and row repeats.
"""

from __future__ import annotations

import torch

from ...cache.layer import KVLayer


class EvictingLayer(KVLayer):
    def __init__(self, inner: KVLayer):
        super().__init__()
        self.inner = inner
        self.is_initialized = True
        self.prompt_slots: int | None = None  # slots before the current turn's decoding began
        self.evicted = 0  # evictions since then
        self.tracks: dict[str, torch.Tensor] = {}  # (B, H, L) per-slot statistics

    @classmethod
    def wrap(cls, layer: KVLayer) -> "EvictingLayer":
        """``layer`` itself if already wrapped, else a new wrapper; starts a turn when needed
        (called after a decode step appended its token, which is not a prompt slot)."""
        out = layer if isinstance(layer, EvictingLayer) else cls(layer)
        if out.prompt_slots is None:
            out.prompt_slots = out.seq_len() - 1
            out.evicted = 0
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
        for name, t in self.tracks.items():
            pad = t.new_zeros(*t.shape[:2], keys.shape[2])
            self.tracks[name] = torch.cat([t, pad], dim=-1)

    def select(self, index):
        index, _ = index.sort(dim=-1)
        self.inner.select(index)
        for name, t in self.tracks.items():
            self.tracks[name] = t.gather(-1, index)

    def crop_to(self, length):
        """Forget the current turn's generated tokens: ``length`` counts slots as they were
        before this turn's evictions."""
        length -= self.evicted
        self.inner.crop_to(length)
        for name, t in self.tracks.items():
            self.tracks[name] = t[..., :length]
        self.prompt_slots, self.evicted = None, 0

    def repeat_rows(self, n):
        out = EvictingLayer(self.inner.repeat_rows(n))
        out.prompt_slots, out.evicted = self.prompt_slots, self.evicted
        out.tracks = {k: t.repeat_interleave(n, dim=0) for k, t in self.tracks.items()}
        return out

    def keep_rows(self, rows):
        out = EvictingLayer(self.inner.keep_rows(rows))
        out.prompt_slots, out.evicted = self.prompt_slots, self.evicted
        out.tracks = {k: t.index_select(0, rows.to(t.device)) for k, t in self.tracks.items()}
        return out

    # --- eviction -------------------------------------------------------------------------
    def evictable(self) -> int:
        """Leading slots that may be evicted now (what is left of the prompt)."""
        return self.prompt_slots - self.evicted

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
