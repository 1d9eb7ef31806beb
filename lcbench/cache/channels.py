"""A layer whose context keys keep only some of their channels (ThinK's key-channel pruning).

The context's keys are stored *compact*: ``(B, H, L, Dk)`` with, per row and KV head, the
``Dk < D`` channels kept (``channels``, ascending); values keep every channel. Attention gets the
keys back at full width with zeros in the pruned channels (:meth:`ChannelLayer.dense`, a transient
view), which is what a query sees when those channels are dropped from the dot product. Tokens
appended afterwards (question, answer) keep every channel, in a dense tail, as kvpress's ThinKPress
leaves them. Bytes are measured from what is held: the compact keys, the values, the kept-channel
index and the tail — so a run's achieved ratio falls with the channels, not the tokens.
"""

from __future__ import annotations

import torch

from .layer import DenseLayer, KVLayer, refuse_bias, tensor_bytes


class ChannelLayer(KVLayer):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, channels: torch.Tensor, head_dim: int,
                 positions: torch.Tensor, valid: torch.Tensor | None, tail: DenseLayer | None = None):
        super().__init__()
        self.compact_keys, self.context_values, self.channels = keys, values, channels  # channels (B, H, Dk) long
        self.head_dim = head_dim
        self.context_positions, self.context_valid = positions, valid
        self.tail = tail if tail is not None else DenseLayer()
        self.is_initialized = True

    @classmethod
    def from_layer(cls, layer: KVLayer, channels: torch.Tensor) -> ChannelLayer:
        """Keep the key channels ``channels`` (B, H, Dk) of every slot ``layer`` holds."""
        refuse_bias(layer, "channel-pruned layer (ThinK)")
        keys, values = layer.dense()
        channels = channels.sort(dim=-1).values
        compact = keys.gather(-1, channels[:, :, None, :].expand(-1, -1, keys.shape[2], -1)).contiguous()
        return cls(compact, values.contiguous(), channels, keys.shape[-1], layer.positions, layer.valid)

    # --- what attention sees --------------------------------------------------------------
    def _context_keys(self) -> torch.Tensor:
        b, h, n, _ = self.compact_keys.shape
        full = self.compact_keys.new_zeros((b, h, n, self.head_dim))
        return full.scatter_(-1, self.channels[:, :, None, :].expand(-1, -1, n, -1), self.compact_keys)

    def context_len(self) -> int:
        return self.compact_keys.shape[2]

    @property
    def positions(self) -> torch.Tensor:
        if self.tail.positions is None:
            return self.context_positions
        return torch.cat([self.context_positions, self.tail.positions], dim=-1)

    @property
    def valid(self) -> torch.Tensor | None:
        if self.context_valid is None and self.tail.valid is None:
            return None
        ctx = self.context_valid if self.context_valid is not None else torch.ones_like(self.context_positions, dtype=torch.bool)
        if self.tail.positions is None:
            return ctx
        tail = self.tail.valid if self.tail.valid is not None else torch.ones_like(self.tail.positions, dtype=torch.bool)
        return torch.cat([ctx, tail], dim=-1)

    def dense(self):
        keys, values = self._context_keys(), self.context_values
        if self.tail.positions is None:
            return keys, values
        tail_keys, tail_values = self.tail.dense()
        return torch.cat([keys, tail_keys], dim=2), torch.cat([values, tail_values], dim=2)

    def nbytes(self) -> int:
        tail = self.tail.nbytes() if self.tail.positions is not None else 0
        return tensor_bytes(self.compact_keys, self.context_values, self.channels) + tail

    # --- storage contract -----------------------------------------------------------------
    def append(self, keys, values, positions, valid):
        self.tail.append(keys, values, positions, valid)

    def select(self, index):
        index, _ = index.sort(dim=-1)
        n = self.context_len()
        in_context = (index < n).sum(-1)
        k = int(in_context.flatten()[0]) if in_context.numel() else 0
        if not bool((in_context == k).all()):
            raise RuntimeError("ChannelLayer.select keeps the same number of context slots in every head")
        ctx, tail = index[..., :k], index[..., k:] - n
        gather = ctx[..., None]
        self.compact_keys = self.compact_keys.gather(2, gather.expand(-1, -1, -1, self.compact_keys.shape[-1])).contiguous()
        self.context_values = self.context_values.gather(2, gather.expand(-1, -1, -1, self.head_dim)).contiguous()
        self.context_positions = self.context_positions.gather(2, ctx)
        if self.context_valid is not None:
            self.context_valid = self.context_valid.gather(2, ctx)
            if bool(self.context_valid.all()):
                self.context_valid = None
        if self.tail.positions is not None:
            if tail.shape[-1]:
                self.tail.select(tail)
            else:
                self.tail = DenseLayer()

    def crop_to(self, length):
        n = self.context_len()
        if length >= n:
            if self.tail.positions is not None:
                self.tail.crop_to(length - n)
            return
        self.select(torch.arange(length, device=self.compact_keys.device).expand(*self.compact_keys.shape[:2], -1))
        self.tail = DenseLayer()

    def _map_rows(self, fn) -> ChannelLayer:
        tail = DenseLayer() if self.tail.positions is None else None
        out = ChannelLayer(fn(self.compact_keys), fn(self.context_values), fn(self.channels), self.head_dim,
                           fn(self.context_positions), None if self.context_valid is None else fn(self.context_valid),
                           tail)
        return out

    def repeat_rows(self, n):
        out = self._map_rows(lambda t: t.repeat_interleave(n, dim=0))
        if self.tail.positions is not None:
            out.tail = self.tail.repeat_rows(n)
        return out

    def keep_rows(self, rows):
        rows = rows.to(self.compact_keys.device)
        out = self._map_rows(lambda t: t.index_select(0, rows))
        if self.tail.positions is not None:
            out.tail = self.tail.keep_rows(rows)
        return out
