"""A layer whose middle context stores some head dimensions as fixed-length spectral coefficients
(FourierAttention's cache, :mod:`lcbench.methods.soft.fourierkv`).

The context a cache stage compressed is held in three parts per row and KV head, and tokens
appended afterwards (question, answer) go to a dense tail:

* ``front``: the first tokens (attention sinks), every dimension kept;
* the *middle*, ``M`` tokens: the key dimensions ``key_dims`` (B, H, ck) and value dimensions
  ``value_dims`` (B, H, cv) are stored as ``C`` coefficients each along the sequence
  (``key_coef`` (B, H, C, ck), ``value_coef`` (B, H, C, cv)) — the first ``C`` functions of the
  orthonormal DCT-II basis over the ``M`` slots, so the coefficients are the least-squares fit of each
  dimension's trajectory — and the other dimensions exactly (``key_exact`` (B, H, M, Dk − ck),
  ``value_exact``); a dimension's ``C`` coefficients replace its ``M`` values;
* ``back``: the most recent context tokens, every dimension kept, followed by the appended tokens.

:meth:`FourierLayer.dense` reconstructs the middle (basis @ coefficients in the compressed
dimensions, the exact ones put back) for attention, once, into a compute buffer (reported by
:meth:`FourierLayer.buffer_nbytes`, like a quantized layer's; part of the measured peak memory,
not of the stored bytes); :meth:`FourierLayer.nbytes`
counts what is held: front and back, the exact middle dimensions, the coefficients and the
dimension indices (int16). Bookkeeping (positions, validity) is not counted, as for every layer.
"""

from __future__ import annotations

import math

import torch

from .layer import DenseLayer, KVLayer, refuse_bias, tensor_bytes
from ..errors import UserError


def dct_basis(length: int, count: int, device=None) -> torch.Tensor:
    """(length, count) float32: the first ``count`` functions of the orthonormal DCT-II basis over
    ``length`` samples (column ``k``: ``√(2/length)·cos(π k (t + ½) / length)``, column 0 ``1/√length``);
    its columns are orthonormal, so ``basis.T @ x`` are the least-squares coefficients of ``x``."""
    t = torch.arange(length, dtype=torch.float64, device=device)[:, None] + 0.5
    k = torch.arange(count, dtype=torch.float64, device=device)[None, :]
    out = torch.cos(math.pi * k * t / length) * math.sqrt(2.0 / length)
    out[:, 0] = 1.0 / math.sqrt(length)
    return out.float()


def project(x: torch.Tensor, count: int) -> torch.Tensor:
    """Coefficients (..., count, d) of ``x`` (..., M, d) along dim -2 on the DCT-II basis."""
    basis = dct_basis(x.shape[-2], count, x.device)
    return torch.einsum("mc,...md->...cd", basis, x.float())


def reconstruct(coef: torch.Tensor, length: int) -> torch.Tensor:
    """(..., length, d) float32 from coefficients (..., C, d) (:func:`project`'s inverse on its span)."""
    basis = dct_basis(length, coef.shape[-2], coef.device)
    return torch.einsum("mc,...cd->...md", basis, coef.float())


def complement(dims: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, width − c) ascending: the dimensions not in ``dims`` (B, H, c)."""
    b, h, _ = dims.shape
    keep = torch.ones(b, h, width, dtype=torch.bool, device=dims.device)
    keep.scatter_(-1, dims.long(), False)
    return keep.nonzero()[:, 2].view(b, h, width - dims.shape[-1])


class FourierLayer(KVLayer):
    def __init__(self, front: DenseLayer, back: DenseLayer, key_exact: torch.Tensor, value_exact: torch.Tensor,
                 key_coef: torch.Tensor, value_coef: torch.Tensor, key_dims: torch.Tensor, value_dims: torch.Tensor,
                 mid_positions: torch.Tensor, key_width: int, value_width: int):
        super().__init__()
        self.front, self.back = front, back
        self.key_exact, self.value_exact = key_exact, value_exact
        self.key_coef, self.value_coef = key_coef, value_coef
        self.key_dims, self.value_dims = key_dims, value_dims  # (B, H, c) int16, ascending
        self.mid_positions = mid_positions  # (B, H, M) long
        self.key_width, self.value_width = key_width, value_width
        self.is_initialized = True

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_layer(cls, layer: KVLayer, front: int, back: int, coefficients: int,
                   key_dims: torch.Tensor, value_dims: torch.Tensor) -> "FourierLayer":
        """Keep ``layer``'s first ``front`` and last ``back`` slots whole and store the slots between
        with ``key_dims``/``value_dims`` (B, H, c) as ``coefficients`` DCT coefficients each. Every
        slot must be valid (one sample's row: the engine compresses each row alone)."""
        refuse_bias(layer, "Fourier-coefficient layer (fourierkv)")
        if layer.valid is not None:
            raise UserError("fourierkv compresses one sample's context at a time and got padded rows. Fix: run it "
                            "through lcbench's engine (each row is compressed alone) or without padding.")
        keys, values = layer.dense()
        n = keys.shape[2]
        m = n - front - back
        if m <= coefficients or front < 0 or back < 0:
            raise ValueError(f"FourierLayer: a middle of {m} slots cannot be stored as {coefficients} coefficients")
        pos = layer.positions

        def part(lo: int, hi: int) -> DenseLayer:
            out = DenseLayer()
            out.keys, out.values = keys[:, :, lo:hi].contiguous(), values[:, :, lo:hi].contiguous()
            out.positions = pos[..., lo:hi].contiguous()
            out.is_initialized = True
            return out

        key_dims, value_dims = key_dims.sort(-1).values, value_dims.sort(-1).values
        mid_k, mid_v = keys[:, :, front:n - back], values[:, :, front:n - back]

        def split(x: torch.Tensor, dims: torch.Tensor):
            rest = complement(dims, x.shape[-1])
            exact = x.gather(-1, rest[:, :, None, :].expand(-1, -1, m, -1)).contiguous()
            coef = project(x.gather(-1, dims.long()[:, :, None, :].expand(-1, -1, m, -1)), coefficients)
            return exact, coef.to(x.dtype).contiguous()

        ke, kc = split(mid_k, key_dims)
        ve, vc = split(mid_v, value_dims)
        return cls(part(0, front), part(n - back, n), ke, ve, kc, vc, key_dims.to(torch.int16),
                   value_dims.to(torch.int16), pos[..., front:n - back].contiguous(), keys.shape[-1], values.shape[-1])

    # --- what attention sees ----------------------------------------------------------------
    def mid_len(self) -> int:
        return self.mid_positions.shape[-1]

    def _mid(self, exact: torch.Tensor, coef: torch.Tensor, dims: torch.Tensor, width: int) -> torch.Tensor:
        b, h, m, _ = exact.shape
        out = exact.new_empty(b, h, m, width)
        rest = complement(dims, width)
        out.scatter_(-1, rest[:, :, None, :].expand(-1, -1, m, -1), exact)
        approx = reconstruct(coef, m).to(exact.dtype)
        out.scatter_(-1, dims.long()[:, :, None, :].expand(-1, -1, m, -1), approx)
        return out

    def _head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Front and reconstructed middle, made once and kept as a compute buffer (what is *stored*
        stays the coefficients: :meth:`nbytes`; the buffer is :meth:`buffer_nbytes`, as a quantized
        layer's dequantized buffer)."""
        if getattr(self, "_buffer", None) is None:
            mk = self._mid(self.key_exact, self.key_coef, self.key_dims, self.key_width)
            mv = self._mid(self.value_exact, self.value_coef, self.value_dims, self.value_width)
            self._buffer = (torch.cat([self.front.keys, mk], dim=2), torch.cat([self.front.values, mv], dim=2))
        return self._buffer

    def buffer_nbytes(self) -> int:
        """Bytes of the reconstructed view attention reads (not stored bytes)."""
        buffer = getattr(self, "_buffer", None)
        return 0 if buffer is None else tensor_bytes(*buffer)

    def dense(self):
        hk, hv = self._head()
        bk, bv = self.back.dense()
        return torch.cat([hk, bk], dim=2), torch.cat([hv, bv], dim=2)

    @property
    def positions(self) -> torch.Tensor:
        return torch.cat([self.front.positions, self.mid_positions, self.back.positions], dim=-1)

    @property
    def valid(self) -> torch.Tensor | None:
        if self.back.valid is None:
            return None
        fixed = torch.ones(*self.mid_positions.shape[:2], self.front.seq_len() + self.mid_len(), dtype=torch.bool,
                           device=self.mid_positions.device)
        return torch.cat([fixed, self.back.valid], dim=-1)

    def nbytes(self) -> int:
        return (self.front.nbytes() + self.back.nbytes()
                + tensor_bytes(self.key_exact, self.value_exact, self.key_coef, self.value_coef,
                               self.key_dims, self.value_dims))

    # --- storage contract -------------------------------------------------------------------
    def append(self, keys, values, positions, valid):
        self.back.append(keys, values, positions, valid)

    def _fixed(self) -> int:
        return self.front.seq_len() + self.mid_len()

    def select(self, index):
        """Slots of the back part only: the front and middle are a whole (their coefficients span
        every middle slot), so a selection must keep them all."""
        index, _ = index.sort(dim=-1)
        fixed = self._fixed()
        b, h, _ = index.shape
        if index.shape[-1] < fixed or not bool((index[..., :fixed] == torch.arange(fixed, device=index.device)).all()):
            raise UserError("fourierkv's layer stores the middle of the context as coefficients over all its slots, so "
                            "no later stage can drop context tokens from it. Fix: put the token-dropping stage before "
                            "fourierkv in the chain (e.g. snapkv+fourierkv), or use a decode-time method without it.")
        self.back.select(index[..., fixed:] - fixed)

    def crop_to(self, length):
        fixed = self._fixed()
        if length < fixed:
            raise UserError("fourierkv's layer cannot be cropped into its compressed middle. Fix: crop only tokens "
                            "appended after the context.")
        self.back.crop_to(length - fixed)

    def _map_rows(self, fn) -> "FourierLayer":
        def dense_rows(layer: DenseLayer) -> DenseLayer:
            out = DenseLayer()
            for name in ("keys", "values", "positions", "valid"):
                t = getattr(layer, name)
                setattr(out, name, None if t is None else fn(t))
            if out.valid is not None and bool(out.valid.all()):
                out.valid = None
            out.is_initialized = True
            return out

        return FourierLayer(dense_rows(self.front), dense_rows(self.back), fn(self.key_exact), fn(self.value_exact),
                            fn(self.key_coef), fn(self.value_coef), fn(self.key_dims), fn(self.value_dims),
                            fn(self.mid_positions), self.key_width, self.value_width)

    def repeat_rows(self, n):
        return self._map_rows(lambda t: t.repeat_interleave(n, dim=0))

    def keep_rows(self, rows):
        rows = rows.to(self.mid_positions.device)
        return self._map_rows(lambda t: t.index_select(0, rows))
