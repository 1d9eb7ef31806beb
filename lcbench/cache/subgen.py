"""A layer holding SubGen's sketch of the context (:mod:`lcbench.methods.soft.subgen`).

Per row and KV head the compressed context is two sample sets, and the tokens appended later
(question, answer) plus any context tokens kept exactly go to a dense tail:

* *cluster samples* (``cluster_keys`` (B, H, Mc, Dk)): keys only, each with the logit weight
  ``log(n_i / |S_i|)`` of its cluster (``n_i`` keys, ``|S_i|`` of them sampled) — the softmax
  denominator's estimate ``Σ_i n_i/|S_i| Σ_{k∈S_i} exp(q·k)``;
* *value samples* (``sample_keys``, ``sample_values`` (B, H, S, D)): key–value pairs drawn with
  probability ``∝ ‖v‖²``, each with weight ``a_j = W / (S ‖v_j‖²)`` (``W = Σ ‖v‖²``) — the estimate
  ``Σ_j a_j exp(q·k_j) v_j`` of the numerator.

Attention computes ``(numerator) / (denominator)`` (plus the exact tail in both) through the engine's
softmax with a per-slot bias (:attr:`bias`): cluster samples are slots whose value is 0 and whose
bias is ``log(n_i/|S_i|)``; a value sample is a slot with value ``v_j / ε`` and bias ``log(ε a_j)``,
so it adds ``a_j exp(q·k_j) v_j`` to the numerator and only ``ε a_j exp(q·k_j)`` to the
denominator (``ε`` = :attr:`eps`, 1e-4 unless float16's range needs a larger one): the softmax then
equals the estimator up to a relative ``ε``-share of the denominator. :meth:`SubGenLayer.dense`
hands attention that view (zero values for cluster samples are made on the fly, not stored);
:meth:`SubGenLayer.nbytes` counts what is held: cluster keys, sample keys and values, their
weights (float32) and the tail.
"""

from __future__ import annotations

import torch

from .layer import DenseLayer, KVLayer, tensor_bytes
from ..errors import UserError


class SubGenLayer(KVLayer):
    def __init__(self, cluster_keys, cluster_bias, cluster_positions, cluster_valid, sample_keys, sample_values,
                 sample_bias, sample_positions, tail: DenseLayer, eps: float, value_width: int):
        super().__init__()
        self.cluster_keys, self.cluster_bias = cluster_keys, cluster_bias  # (B, H, Mc, Dk), (B, H, Mc) float32
        self.cluster_positions, self.cluster_valid = cluster_positions, cluster_valid  # (B, H, Mc); bool or None
        self.sample_keys, self.sample_values = sample_keys, sample_values  # (B, H, S, D); values already / eps
        self.sample_bias, self.sample_positions = sample_bias, sample_positions  # (B, H, S)
        self.tail = tail
        self.eps = eps
        self.value_width = value_width
        self.is_initialized = True

    def _sketch_len(self) -> int:
        return self.cluster_keys.shape[2] + self.sample_keys.shape[2]

    # --- what attention sees ----------------------------------------------------------------
    def dense(self):
        b, h, mc, _ = self.cluster_keys.shape
        zeros = self.sample_values.new_zeros(b, h, mc, self.value_width)
        keys = [self.cluster_keys, self.sample_keys]
        values = [zeros, self.sample_values]
        if self.tail.positions is not None:
            tk, tv = self.tail.dense()
            keys.append(tk)
            values.append(tv)
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)

    @property
    def bias(self) -> torch.Tensor:
        parts = [self.cluster_bias, self.sample_bias]
        if self.tail.positions is not None:
            parts.append(self.tail.bias if self.tail.bias is not None
                         else torch.zeros(self.tail.positions.shape, device=self.cluster_bias.device))
        return torch.cat(parts, dim=-1)

    @property
    def positions(self) -> torch.Tensor:
        parts = [self.cluster_positions, self.sample_positions]
        if self.tail.positions is not None:
            parts.append(self.tail.positions)
        return torch.cat(parts, dim=-1)

    @property
    def valid(self) -> torch.Tensor | None:
        tail_valid = None if self.tail.positions is None else self.tail.valid
        if self.cluster_valid is None and tail_valid is None:
            return None
        parts = [self.cluster_valid if self.cluster_valid is not None
                 else torch.ones_like(self.cluster_positions, dtype=torch.bool),
                 torch.ones_like(self.sample_positions, dtype=torch.bool)]
        if self.tail.positions is not None:
            parts.append(tail_valid if tail_valid is not None else torch.ones_like(self.tail.positions, dtype=torch.bool))
        return torch.cat(parts, dim=-1)

    def nbytes(self) -> int:
        tail = self.tail.nbytes() if self.tail.positions is not None else 0
        return tensor_bytes(self.cluster_keys, self.cluster_bias, self.sample_keys, self.sample_values,
                            self.sample_bias) + tail

    # --- storage contract -------------------------------------------------------------------
    def append(self, keys, values, positions, valid):
        self.tail.append(keys, values, positions, valid)

    def select(self, index):
        """Slots of the tail only: the samples are an estimator of the whole context, each weighted
        for it, so a selection must keep them all."""
        index, _ = index.sort(dim=-1)
        fixed = self._sketch_len()
        if index.shape[-1] < fixed or not bool((index[..., :fixed] == torch.arange(fixed, device=index.device)).all()):
            raise UserError("subgen's layer holds weighted samples that estimate attention over the whole context, so "
                            "no later stage can drop some of them. Fix: put the token-dropping stage before subgen in "
                            "the chain (e.g. snapkv+subgen), or use subgen alone.")
        if index.shape[-1] > fixed:
            self.tail.select(index[..., fixed:] - fixed)
        elif self.tail.positions is not None:
            self.tail = DenseLayer()

    def crop_to(self, length):
        fixed = self._sketch_len()
        if length < fixed:
            raise UserError("subgen's layer cannot be cropped into its context samples. Fix: crop only tokens "
                            "appended after the context.")
        if self.tail.positions is not None:
            self.tail.crop_to(length - fixed)

    def _map_rows(self, fn, tail: DenseLayer) -> "SubGenLayer":
        opt = (lambda t: None if t is None else fn(t))
        return SubGenLayer(fn(self.cluster_keys), fn(self.cluster_bias), fn(self.cluster_positions),
                           opt(self.cluster_valid), fn(self.sample_keys), fn(self.sample_values), fn(self.sample_bias),
                           fn(self.sample_positions), tail, self.eps, self.value_width)

    def repeat_rows(self, n):
        tail = self.tail.repeat_rows(n) if self.tail.positions is not None else DenseLayer()
        return self._map_rows(lambda t: t.repeat_interleave(n, dim=0), tail)

    def keep_rows(self, rows):
        rows = rows.to(self.cluster_keys.device)
        tail = self.tail.keep_rows(rows) if self.tail.positions is not None else DenseLayer()
        return self._map_rows(lambda t: t.index_select(0, rows), tail)
