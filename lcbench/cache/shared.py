"""Turns that share one compressed context, without a copy of it per turn (issue #12).

In multi-request mode every turn of a sample continues the same compressed context. Copying the
context once per turn (``repeat_rows``) costs ``turns ×`` its KV — 5 × 16 GiB for five SCBench
turns at 128K with ``full``. A :class:`SharedContextLayer` holds instead

* the context: the one-row layer the cache stages left (held, never mutated), and
* a flat tail: every token appended afterwards (question parts, answers) by any row, in
  arrival order, as one ``(1, H, T, D)`` sequence with the batch row that owns each slot.

Attention (:meth:`SharedContextLayer.attend`) folds the rows' queries into one sequence over
``[context | tail]``: the mask lets a query of row ``i`` see every valid context token and, of the
tail, row ``i``'s own tokens up to itself. That is exactly the attention each row would compute
over its own copy — no copy of the context per row is made; per layer and pass the context is
concatenated with the tail once (what a dense layer's append does at every step anyway). A
sliding window, softcap or sinks apply per query, so they carry over to the folded call.

Only layers whose appends leave the context untouched are shared (:func:`shareable`): dense and
ragged ones (ragged layers append to a dense tail). A quantized layer re-quantizes its window as
tokens arrive — per row — so it is copied per row as before, and so is every layer of a chain
with a decode stage (eviction changes each row's context) or a sparse-attention stage.
"""

from __future__ import annotations

from typing import Callable

import torch

from .layer import DenseLayer, KVLayer, lowest_visible, tensor_bytes
from .ragged import RaggedLayer

def shareable(layer: KVLayer) -> bool:
    """True when appends to ``layer`` never change what it already holds (so rows can share it)."""
    return type(layer) in (DenseLayer, RaggedLayer) and not getattr(layer, "is_sliding", False) \
        and layer.positions is not None and layer.positions.shape[0] == 1


class SharedContextLayer(KVLayer):
    """``rows`` batch rows over one shared one-row ``context`` plus a flat per-row tail."""

    lazy_dense = True  # KVCache.update hands attention the new tokens; attention uses :meth:`attend`

    def __init__(self, context: KVLayer, rows: int):
        super().__init__()
        self.context = context
        self.rows = rows
        self.tail_keys: torch.Tensor | None = None  # (1, H, T, D)
        self.tail_values: torch.Tensor | None = None
        self.owner = torch.zeros(0, dtype=torch.long, device=context.positions.device)  # (T,) batch row
        self.tail_positions = torch.zeros(0, dtype=torch.long, device=context.positions.device)  # (T,)
        self.query_slots: torch.Tensor | None = None  # (B, q): tail slot of each incoming token, -1 = padding
        self.is_initialized = True

    # --- the storage contract ---------------------------------------------------------------
    def append(self, keys, values, positions, valid):
        b, h, q, d = keys.shape
        keep = torch.ones(b, q, dtype=torch.bool, device=keys.device) if valid is None else valid.to(keys.device)
        start = self.owner.numel()
        slots = torch.full((b, q), -1, dtype=torch.long, device=keys.device)
        slots[keep] = torch.arange(start, start + int(keep.sum()), device=keys.device)
        self.query_slots = slots
        new_k = keys.transpose(0, 1)[:, keep][None]  # (1, H, N, D), row-major over (row, token)
        new_v = values.transpose(0, 1)[:, keep][None]
        owner = torch.arange(b, device=keys.device)[:, None].expand(b, q)[keep]
        self.tail_keys = new_k if self.tail_keys is None else torch.cat([self.tail_keys, new_k], dim=2)
        self.tail_values = new_v if self.tail_values is None else torch.cat([self.tail_values, new_v], dim=2)
        self.owner = torch.cat([self.owner, owner])
        self.tail_positions = torch.cat([self.tail_positions, positions.to(keys.device)[keep]])

    def _row_tail_lengths(self) -> torch.Tensor:
        return torch.bincount(self.owner, minlength=self.rows)

    def seq_len(self) -> int:
        longest = int(self._row_tail_lengths().max()) if self.owner.numel() else 0
        return self.context.seq_len() + longest

    def next_position(self) -> int:
        """One past the latest position of the context or of any row's tail (no per-row view made)."""
        tail = int(self.tail_positions.amax()) + 1 if self.tail_positions.numel() else 0
        return max(self.context.next_position(), tail)

    def nbytes(self) -> int:
        """The context once, plus every row's own tokens."""
        return self.context.nbytes() + tensor_bytes(self.tail_keys, self.tail_values)

    def keep_rows(self, rows):
        """Rows ``rows`` only: the others' tail slots go, the context stays shared."""
        out = SharedContextLayer(self.context, int(rows.numel()))
        renumber = torch.full((self.rows,), -1, dtype=torch.long, device=self.owner.device)
        renumber[rows.to(self.owner.device)] = torch.arange(rows.numel(), device=self.owner.device)
        new_owner = renumber[self.owner]
        keep = new_owner >= 0
        if self.tail_keys is not None:
            out.tail_keys, out.tail_values = self.tail_keys[:, :, keep], self.tail_values[:, :, keep]
        out.owner, out.tail_positions = new_owner[keep], self.tail_positions[keep]
        return out

    def select(self, index):
        raise TypeError("SharedContextLayer.select: cache stages never run on turns sharing a context")

    def crop_to(self, length):
        raise TypeError("SharedContextLayer.crop_to: multi-turn mode does not share a context between rows")

    def repeat_rows(self, n):
        return self.materialize().repeat_rows(n)

    # --- the per-row view (for code that needs one: fallback attention, measurement) ------------
    def _row_view_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, W) tail slot shown at each of a row's W view slots after the context (right-aligned,
        padding first), and its validity."""
        lengths = self._row_tail_lengths()
        width = int(lengths.max()) if self.owner.numel() else 0
        order = torch.sort(self.owner, stable=True).indices  # slots grouped by row, in arrival order
        starts = torch.cumsum(lengths, 0) - lengths
        j = torch.arange(width, device=self.owner.device)[None, :] - (width - lengths)[:, None]  # (B, W)
        valid = j >= 0
        index = order[(starts[:, None] + j.clamp(min=0)).clamp(max=max(0, order.numel() - 1))] if order.numel() \
            else torch.zeros_like(j)
        return index, valid

    def materialize(self) -> DenseLayer:
        """A plain dense layer of ``rows`` rows: ``[context | padding | the row's tail]`` (copies)."""
        ck, cv = self.context.dense()
        b = self.rows
        index, tail_valid = self._row_view_index()
        h = ck.shape[1]
        out = DenseLayer()
        cpos = self.context.positions.expand(b, -1, -1)
        cvalid = self.context.valid
        cvalid = torch.ones_like(cpos, dtype=torch.bool) if cvalid is None else cvalid.expand(b, -1, -1)
        if self.tail_keys is None or index.shape[1] == 0:
            out.keys, out.values = ck.expand(b, -1, -1, -1).contiguous(), cv.expand(b, -1, -1, -1).contiguous()
            out.positions, out.valid = cpos.contiguous(), None if bool(cvalid.all()) else cvalid.contiguous()
        else:
            tk = self.tail_keys[0][:, index].transpose(0, 1)  # (B, H, W, D)
            tv = self.tail_values[0][:, index].transpose(0, 1)
            tpos = self.tail_positions[index][:, None, :].expand(b, h, -1)
            tvalid = tail_valid[:, None, :].expand(b, h, -1)
            out.keys = torch.cat([ck.expand(b, -1, -1, -1), tk], dim=2)
            out.values = torch.cat([cv.expand(b, -1, -1, -1), tv], dim=2)
            out.positions = torch.cat([cpos, tpos.where(tvalid, 0)], dim=2)
            valid = torch.cat([cvalid, tvalid], dim=2)
            out.valid = None if bool(valid.all()) else valid
        if self.context.bias is not None:  # merge compensation of the context's slots; the tail's tokens get 0
            cb = self.context.bias.expand(b, -1, -1)
            out.bias = torch.cat([cb, cb.new_zeros(b, h, out.positions.shape[-1] - cb.shape[-1])], dim=-1)
        out.is_initialized = True
        return out

    def dense(self):
        view = self.materialize()
        return view.keys, view.values

    @property
    def positions(self) -> torch.Tensor:
        return self.materialize().positions

    @property
    def valid(self) -> torch.Tensor | None:
        return self.materialize().valid

    def kept_tokens(self) -> torch.Tensor:
        return self.context.kept_tokens().expand(self.rows, -1) + self._row_tail_lengths()[:, None]

    # --- attention without copies -------------------------------------------------------------
    def attend(self, query: torch.Tensor,
               attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
               window: int | None = None, chunk: int | None = None) -> torch.Tensor:
        """Attention of this pass's queries (B, Hq, n, D) — the tokens just appended — over each
        row's ``[context | own tail]``, as one folded call ``attention(q, keys, values, mask)``
        on ``(1, Hq, B·n, D)`` queries and the shared ``(1, H, Lc + T, D)`` keys/values; returns
        ``(B, n, Hq, Dv)`` (``Dv`` the values' width) like :func:`lcbench.engine.attention.dense_attention`. With a sliding
        ``window`` a query at true position p sees the keys at positions in ``(p - window, p]``;
        with an attention ``chunk``, those of its own chunk ``[⌊p / chunk⌋ · chunk, p]``."""
        b, hq, n, d = query.shape
        ck, cv = self.context.dense()
        keys = torch.cat([ck, self.tail_keys], dim=2) if self.tail_keys is not None else ck
        values = torch.cat([cv, self.tail_values], dim=2) if self.tail_values is not None else cv
        device = query.device
        lc, t = ck.shape[2], self.owner.numel()
        q_row = torch.arange(b, device=device).repeat_interleave(n)  # (B·n,)
        q_slot = self.query_slots.reshape(-1)  # (B·n,)
        own = (self.owner[None, :] == q_row[:, None]) & (torch.arange(t, device=device)[None, :] <= q_slot[:, None])
        cvalid = self.context.valid  # (1, H, Lc) or None
        if window or chunk:
            real = q_slot >= 0  # a padding query keeps the whole context (no empty row; its output is unused)
            q_pos = torch.where(real, self.tail_positions[q_slot.clamp(min=0)] if t else q_slot, -1)
            lowest = lowest_visible(q_pos, window, chunk)
            own = own & ((self.tail_positions[None, :] >= lowest[:, None]) | ~real[:, None])
            seen = (self.context.positions[:, :, None, :] >= lowest[None, None, :, None]) | ~real[:, None]
            cvalid = seen if cvalid is None else cvalid[:, :, None, :] & seen  # (1, H, B·n, Lc)
        elif cvalid is not None:
            cvalid = cvalid[:, :, None, :]
        if cvalid is None:
            mask = torch.cat([torch.ones(b * n, lc, dtype=torch.bool, device=device), own], dim=1)[None, None]
        else:
            h = cvalid.shape[1]
            mask = torch.cat([cvalid.expand(1, h, b * n, lc), own[None, None].expand(1, h, -1, -1)], dim=3)
        folded = query.transpose(0, 1).reshape(1, hq, b * n, d)
        out = attention(folded, keys, values, mask)  # (1, B·n, Hq, Dv): the values' width (MiMo-V2: ≠ D)
        return out.reshape(b, n, hq, out.shape[-1])


def share_rows(layer: KVLayer, rows: int) -> KVLayer:
    """``rows`` rows continuing ``layer``: shared when :func:`shareable`, else copies."""
    return SharedContextLayer(layer, rows) if shareable(layer) else layer.repeat_rows(rows)
