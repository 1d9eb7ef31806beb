"""The whole-model cache: a transformers ``Cache`` whose layers are lcbench :class:`KVLayer` s.

transformers' attention modules call :meth:`KVCache.update` with the new keys/values of a layer;
the engine sets the true positions (and padding validity) of those tokens beforehand with
:meth:`KVCache.set_incoming`, so that after tokens are dropped later tokens keep their true
positions (DESIGN.md) and layers may hold different numbers of tokens.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers.cache_utils import Cache

from .layer import DenseLayer, KVLayer


class KVCache(Cache):
    def __init__(self, num_layers: int, layer_factory: Callable[[int], KVLayer] | None = None):
        factory = layer_factory or (lambda i: DenseLayer())
        super().__init__(layers=[factory(i) for i in range(num_layers)])
        self.incoming_positions: torch.Tensor | None = None
        self.incoming_valid: torch.Tensor | None = None

    # --- what transformers calls ----------------------------------------------------------
    def set_incoming(self, positions: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """True positions (B, q) and validity (B, q) of the tokens of the next forward pass."""
        self.incoming_positions = positions
        self.incoming_valid = None if valid is None or bool(valid.all()) else valid

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.incoming_positions is None:
            raise RuntimeError("KVCache.set_incoming must be called before a forward pass")
        layer = self.layers[layer_idx]
        layer.append(key_states, value_states, self.incoming_positions.to(key_states.device),
                     None if self.incoming_valid is None else self.incoming_valid.to(key_states.device))
        if getattr(layer, "lazy_dense", False):  # rows sharing a context: attention reads the layer itself
            return key_states, value_states
        return layer.dense()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens the layer has seen: the true position its next token takes. That is transformers'
        meaning (a sliding layer counts what it forgot), and Llama-4's attention reads it as its
        queries' positions (the temperature of its NoPE layers): a compressed layer stores fewer slots
        (``seq_len``), which would shift that position."""
        return self.layers[layer_idx].next_position()

    # --- measurement ----------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of keys/values stored over all layers, measured from the tensors held."""
        return sum(layer.nbytes() for layer in self.layers)

    def kept_tokens(self) -> float:
        """Mean number of valid tokens held per layer, row and KV head."""
        counts = [layer.kept_tokens().float().mean().item() for layer in self.layers]
        return sum(counts) / len(counts) if counts else 0.0

    # --- sharing a context between turns --------------------------------------------------
    def crop_to(self, length_per_layer: list[int]) -> None:
        for layer, n in zip(self.layers, length_per_layer):
            layer.crop_to(n)

    def seq_lengths(self) -> list[int]:
        return [layer.seq_len() for layer in self.layers]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (1-D long, ascending) in every layer (finished rows leave)."""
        self.layers[:] = [layer.keep_rows(rows) for layer in self.layers]

    def share_rows(self, n: int) -> "KVCache":
        """A new cache of ``n`` rows continuing this one-row cache, each layer shared where its
        kind allows (:mod:`lcbench.cache.shared`: no copy of the context) and copied otherwise;
        this cache is kept and never changed through the new one."""
        from .shared import share_rows

        out = KVCache.__new__(KVCache)
        Cache.__init__(out, layers=[share_rows(layer, n) for layer in self.layers])
        out.incoming_positions = None
        out.incoming_valid = None
        return out

    def repeat_rows(self, n: int) -> "KVCache":
        """A new cache whose rows are this cache's rows repeated ``n`` times (copies; this one is kept)."""
        out = KVCache.__new__(KVCache)
        Cache.__init__(out, layers=[layer.repeat_rows(n) for layer in self.layers])
        out.incoming_positions = None
        out.incoming_valid = None
        return out
