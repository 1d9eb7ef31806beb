"""A layer whose KV heads hold different numbers of tokens (AdaKV's head-wise budgets).

What a cache stage kept is stored *flat*: one ``(N, D)`` tensor of keys and one of values, head
after head in ``(batch row, head)`` order, with ``lengths`` ``(B, H)`` — so the bytes held are
exactly the kept tokens', not a padded rectangle. Tokens appended afterwards (question, answer)
reach every head, so they go to a dense tail. Attention gets a padded ``(B, H, Lmax + T, D)``
view from :meth:`RaggedLayer.dense` with ``valid`` marking the padding; that view is transient
(built per forward pass), the flat storage is what stays.
"""

from __future__ import annotations

import torch

from .layer import DenseLayer, KVLayer, refuse_bias, tensor_bytes


class RaggedLayer(KVLayer):
    def __init__(self, flat_keys: torch.Tensor, flat_values: torch.Tensor, flat_positions: torch.Tensor,
                 lengths: torch.Tensor, tail: DenseLayer | None = None):
        super().__init__()
        self.flat_keys, self.flat_values, self.flat_positions = flat_keys, flat_values, flat_positions
        self.lengths = lengths  # (B, H) long
        self.tail = tail if tail is not None else DenseLayer()
        self.is_initialized = True

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_mask(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                  keep: torch.Tensor) -> "RaggedLayer":
        """Keep the slots where ``keep`` (B, H, L) is true from dense (B, H, L, D) keys/values."""
        return cls(keys[keep], values[keep], positions[keep], keep.sum(-1))

    @classmethod
    def from_layer(cls, layer: KVLayer, keep: torch.Tensor) -> "RaggedLayer":
        """Keep the valid slots of ``layer`` where ``keep`` is true."""
        refuse_bias(layer, "ragged layer (head-wise budgets)")
        keys, values = layer.dense()
        if layer.valid is not None:
            keep = keep & layer.valid
        return cls.from_mask(keys, values, layer.positions, keep)

    def _reset(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        fresh = RaggedLayer.from_mask(keys, values, positions, valid)
        self.__dict__.update(fresh.__dict__)

    # --- the padded view --------------------------------------------------------------------
    @property
    def width(self) -> int:
        """Slots of the padded ragged part (the longest head)."""
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def _slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For every flat entry: its (row·head) index and its slot within that head."""
        counts = self.lengths.flatten()
        rows = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        starts = torch.cumsum(counts, 0) - counts
        slots = torch.arange(rows.numel(), device=counts.device) - starts[rows]
        return rows, slots

    def _padded(self, flat: torch.Tensor, fill) -> torch.Tensor:
        b, h = self.lengths.shape
        out = torch.full((b * h, self.width, *flat.shape[1:]), fill, dtype=flat.dtype, device=flat.device)
        rows, slots = self._slots()
        out[rows, slots] = flat
        return out.view(b, h, self.width, *flat.shape[1:])

    def _ragged_valid(self) -> torch.Tensor:
        slots = torch.arange(self.width, device=self.lengths.device)
        return slots[None, None, :] < self.lengths[..., None]

    @property
    def positions(self) -> torch.Tensor:
        own = self._padded(self.flat_positions, 0)
        return own if self.tail.positions is None else torch.cat([own, self.tail.positions], dim=-1)

    @property
    def valid(self) -> torch.Tensor | None:
        own = self._ragged_valid()
        if self.tail.positions is not None:
            tail = self.tail.valid if self.tail.valid is not None else torch.ones_like(self.tail.positions, dtype=torch.bool)
            own = torch.cat([own, tail], dim=-1)
        return None if bool(own.all()) else own

    # --- the storage contract ---------------------------------------------------------------
    def append(self, keys, values, positions, valid):
        self.tail.append(keys, values, positions, valid)

    def dense(self):
        keys = self._padded(self.flat_keys, 0.0)
        values = self._padded(self.flat_values, 0.0)
        if self.tail.keys is not None:
            keys = torch.cat([keys, self.tail.keys], dim=-2)
            values = torch.cat([values, self.tail.values], dim=-2)
        return keys, values

    def nbytes(self) -> int:
        return tensor_bytes(self.flat_keys, self.flat_values) + self.tail.nbytes()

    def _full_valid(self) -> torch.Tensor:
        valid = self.valid
        return torch.ones_like(self.positions, dtype=torch.bool) if valid is None else valid

    def select(self, index):
        index, _ = index.sort(dim=-1)
        keys, values = self.dense()
        gather = index[..., None].expand(*index.shape, keys.shape[-1])
        self._reset(keys.gather(2, gather), values.gather(2, gather), self.positions.gather(2, index),
                    self._full_valid().gather(2, index))

    def crop_to(self, length):
        width = self.width
        if length >= width:
            if self.tail.keys is not None:
                self.tail.crop_to(length - width)
            return
        keys, values = self.dense()
        self._reset(keys[:, :, :length], values[:, :, :length], self.positions[:, :, :length],
                    self._full_valid()[:, :, :length])

    def keep_rows(self, rows):
        """Rows ``rows`` of the flat storage (each row's heads are contiguous in it) and of the tail."""
        rows = rows.to(self.lengths.device)
        b, h = self.lengths.shape
        entry_rows = torch.repeat_interleave(torch.arange(b * h, device=self.lengths.device),
                                             self.lengths.flatten()) // h
        keep = torch.isin(entry_rows, rows)
        tail = self.tail.keep_rows(rows) if self.tail.positions is not None else DenseLayer()
        return RaggedLayer(self.flat_keys[keep], self.flat_values[keep], self.flat_positions[keep],
                           self.lengths.index_select(0, rows), tail)

    def repeat_rows(self, n):
        keys, values = self.dense()
        out = RaggedLayer.from_mask(keys.repeat_interleave(n, 0), values.repeat_interleave(n, 0),
                                    self.positions.repeat_interleave(n, 0), self._full_valid().repeat_interleave(n, 0))
        return out
