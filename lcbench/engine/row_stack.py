"""Rows of several samples in one cache layer, left-padded (cross-sample batching).

Each sample's cache is built and compressed as if it were alone (a single-row layer of any kind:
dense, quantized, ragged); :func:`stack_rows` puts such layers side by side for one batched
forward pass. Shorter rows are padded on the left, and the padding is marked invalid, so the
mask attention builds from the layer (:func:`lcbench.engine.attention.storage_mask`) hides it and
each row keeps its own true positions. Dense rows become one padded :class:`DenseLayer` (no
per-step cost); other kinds are held by a :class:`StackedLayer`, which pads their dense views on use.
"""

from __future__ import annotations

import torch

from ..cache.layer import DenseLayer, KVLayer, caches_nothing


def pad_left(t: torch.Tensor, width: int, fill) -> torch.Tensor:
    """``t`` (B, H, L, ...) with ``width`` slots of ``fill`` put before its dim 2."""
    if width == 0:
        return t
    pad = torch.full((*t.shape[:2], width, *t.shape[3:]), fill, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=2)


def _valid_or_ones(layer: KVLayer) -> torch.Tensor:
    valid = layer.valid
    return torch.ones_like(layer.positions, dtype=torch.bool) if valid is None else valid


def _padded_rows(layers: list[KVLayer], with_kv: bool = True):
    """Keys, values, positions and validity of ``layers`` stacked along rows, left-padded."""
    width = max(layer.seq_len() for layer in layers)
    keys, values, positions, valid = [], [], [], []
    for layer in layers:
        pad = width - layer.seq_len()
        if with_kv:
            k, v = layer.dense()
            keys.append(pad_left(k, pad, 0.0))
            values.append(pad_left(v, pad, 0.0))
        positions.append(pad_left(layer.positions, pad, 0))
        valid.append(pad_left(_valid_or_ones(layer), pad, False))
    valid_t = torch.cat(valid)
    kv = (torch.cat(keys), torch.cat(values)) if with_kv else (None, None)
    return (*kv, torch.cat(positions), None if bool(valid_t.all()) else valid_t)


def stack_rows(layers: list[KVLayer]) -> KVLayer:
    """One layer holding the rows of ``layers`` in order (each left-padded to the longest)."""
    if len(layers) == 1:
        return layers[0]
    if all(caches_nothing(layer) for layer in layers):
        return DenseLayer()
    if all(type(layer) is DenseLayer for layer in layers):
        out = DenseLayer()
        out.keys, out.values, out.positions, out.valid = _padded_rows(layers)
        if any(layer.bias is not None for layer in layers):  # merge compensation (cache/layer.py), 0 on padding
            width = out.positions.shape[-1]
            out.bias = torch.cat([pad_left(layer.bias if layer.bias is not None
                                           else torch.zeros(layer.positions.shape, device=layer.positions.device),
                                           width - layer.seq_len(), 0.0) for layer in layers])
        out.is_initialized = True
        return out
    return StackedLayer(layers)


class StackedLayer(KVLayer):
    """Blocks of rows held by ``children`` (any :class:`KVLayer`), each keeping its own storage;
    attention sees them left-padded to the longest. Mutations go to each child's rows."""

    def __init__(self, children: list[KVLayer]):
        super().__init__()
        self.children = list(children)
        self.is_initialized = True
        self._meta: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _ranges(self) -> list[tuple[int, int]]:
        out, start = [], 0
        for child in self.children:
            rows = child.positions.shape[0]
            out.append((start, start + rows))
            start += rows
        return out

    def _offsets(self) -> list[int]:
        width = self.seq_len()
        return [width - child.seq_len() for child in self.children]

    def _positions_valid(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._meta is None:
            _, _, positions, valid = _padded_rows(self.children, with_kv=False)
            self._meta = (positions, valid)
        return self._meta

    @property
    def positions(self) -> torch.Tensor:
        return self._positions_valid()[0]

    @property
    def valid(self) -> torch.Tensor | None:
        return self._positions_valid()[1]

    def seq_len(self) -> int:
        return max(child.seq_len() for child in self.children)

    # --- the storage contract ---------------------------------------------------------------
    def append(self, keys, values, positions, valid):
        for (a, b), child in zip(self._ranges(), self.children):
            child.append(keys[a:b], values[a:b], positions[a:b], None if valid is None else valid[a:b])
        self._meta = None

    def dense(self):
        keys, values, _, _ = _padded_rows(self.children)
        return keys, values

    def nbytes(self) -> int:
        return sum(child.nbytes() for child in self.children)

    def select(self, index):
        """Per child, the slots ``index`` (B, H, K) of the padded view; a slot of padding cannot be kept."""
        for (a, b), child, offset in zip(self._ranges(), self.children, self._offsets()):
            own = index[a:b] - offset
            if bool((own < 0).any()):
                raise ValueError("StackedLayer.select: the index keeps padding slots; select per row instead")
            child.select(own)
        self._meta = None

    def crop_to(self, length):
        for child, offset in zip(self.children, self._offsets()):
            child.crop_to(max(0, length - offset))
        self._meta = None

    def repeat_rows(self, n):
        return StackedLayer([child.repeat_rows(n) for child in self.children])

    def keep_rows(self, rows):
        """Each child keeps its own rows among ``rows``; children left with none go."""
        kept = []
        rows = rows.to(self.children[0].positions.device)
        for (a, b), child in zip(self._ranges(), self.children):
            own = rows[(rows >= a) & (rows < b)] - a
            if own.numel():
                kept.append(child.keep_rows(own))
        return kept[0] if len(kept) == 1 else StackedLayer(kept)


def row_layers(layer: KVLayer, rows: int = 1) -> list[KVLayer]:
    """The single-row layers of a stacked prefill, each without its left padding (views of the
    dense storage, no copies) — what each sample holds, for measuring it as if it were alone. A
    layer that caches nothing (KV sharing's reusing layers) is ``rows`` empty ones."""
    if caches_nothing(layer):
        return [DenseLayer() for _ in range(rows)]
    if isinstance(layer, StackedLayer) and all(c.positions.shape[0] == 1 for c in layer.children):
        return list(layer.children)
    if type(layer) is not DenseLayer:
        if layer.positions.shape[0] == 1:
            return [layer]
        raise TypeError(f"row_layers: cannot split a {type(layer).__name__} into rows")
    rows = []
    for j in range(layer.keys.shape[0]):
        if layer.valid is None:
            start = 0
        else:
            real = layer.valid[j].any(0).nonzero()
            start = int(real[0]) if real.numel() else 0
        row = DenseLayer()
        row.keys, row.values = layer.keys[j:j + 1, :, start:], layer.values[j:j + 1, :, start:]
        row.positions = layer.positions[j:j + 1, :, start:]
        row.bias = None if layer.bias is None else layer.bias[j:j + 1, :, start:]
        valid = None if layer.valid is None else layer.valid[j:j + 1, :, start:]
        row.valid = None if valid is None or bool(valid.all()) else valid
        row.is_initialized = True
        rows.append(row)
    return rows


def take_rows(layer: KVLayer, counts: list[int]) -> KVLayer:
    """A new layer holding row ``j`` of ``layer`` ``counts[j]`` times, in row order (copies)."""
    if caches_nothing(layer):
        return DenseLayer()
    if type(layer) is DenseLayer:
        index = torch.repeat_interleave(torch.arange(len(counts), device=layer.keys.device),
                                        torch.tensor(counts, device=layer.keys.device))
        out = DenseLayer()
        out.keys, out.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        out.positions = layer.positions.index_select(0, index)
        out.valid = None if layer.valid is None else layer.valid.index_select(0, index)
        out.bias = None if layer.bias is None else layer.bias.index_select(0, index)
        out.is_initialized = True
        if out.valid is not None:  # columns that are padding in every kept row go
            first = int(out.valid.any(1).any(0).nonzero()[0])
            out.bias = None if out.bias is None else out.bias[:, :, first:]
            out.keys, out.values = out.keys[:, :, first:], out.values[:, :, first:]
            out.positions, out.valid = out.positions[:, :, first:], out.valid[:, :, first:]
            if bool(out.valid.all()):
                out.valid = None
        return out
    rows = row_layers(layer)
    return stack_rows([row.repeat_rows(n) for row, n in zip(rows, counts) if n > 0])


