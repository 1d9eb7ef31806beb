"""A layer that stores keys/values quantized and packed, with a full-precision recent window.

Asymmetric min–max quantization to ``bits`` ∈ {2, 4, 8}: per group, ``zero = min`` and
``scale = (max − min) / (2^bits − 1)`` (stored as float16, rounded so the group's range stays
covered), codes ``round((x − zero) / scale)`` packed ``8 / bits`` to a byte along the head
dimension. Keys are grouped either per channel over ``group_size`` consecutive tokens (KIVI's
keys) or per token over ``group_size`` channels; values always per token (KIVI: Liu et al.,
"KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024, arXiv:2402.02750).
The newest ``window`` tokens stay in the model's dtype; older ones are quantized as soon as a
whole token group is past the window. :meth:`QuantizedLayer.dense` dequantizes on use, and
:meth:`QuantizedLayer.nbytes` counts the packed codes, scales, zeros and the window — the bytes
really held. Reconstruction error per element is at most ``scale / 2`` (plus float16 rounding
of the scale and zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .layer import KVLayer, tensor_bytes

SCALE_DTYPE = torch.float16
_SCALE_MAX = 60000.0  # beyond this magnitude float16 scales would overflow; float32 is used instead


@dataclass(frozen=True)
class QuantSpec:
    """How a layer is quantized. ``key_axis``: "channel" (one scale per channel per group of
    ``group_size`` tokens) or "token" (one scale per token per group of ``group_size`` channels)."""

    bits: int
    key_axis: str
    group_size: int
    window: int

    def token_group(self) -> int:
        """Tokens that must be quantized together (a key group along the token axis)."""
        return self.group_size if self.key_axis == "channel" else 1

    def channel_group(self, head_dim: int) -> int:
        """Channels sharing one per-token scale (the whole head when ``group_size`` does not divide it)."""
        return self.group_size if head_dim % self.group_size == 0 else head_dim

    def quantized_tokens(self, length: int) -> int:
        """Tokens of ``length`` held quantized: whole token groups older than the window."""
        g = self.token_group()
        return max(0, (length - self.window) // g * g)

    def nbytes(self, rows: int, heads: int, length: int, head_dim: int, elem: int) -> int:
        """Bytes held for ``length`` tokens (planning; equals :meth:`QuantizedLayer.nbytes` with float16 scales)."""
        lq = self.quantized_tokens(length)
        sb = torch.finfo(SCALE_DTYPE).bits // 8
        codes = 2 * lq * head_dim * self.bits // 8
        per_token = lq * (head_dim // self.channel_group(head_dim)) * 2 * sb
        key_scales = (lq // self.group_size) * head_dim * 2 * sb if self.key_axis == "channel" else per_token
        window = 2 * (length - lq) * head_dim * elem
        return rows * heads * (codes + key_scales + per_token + window)


# --- packing ---------------------------------------------------------------------------------
def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., D) < 2^bits → (..., D·bits/8) bytes, ``8 / bits`` codes per byte."""
    per = 8 // bits
    if per == 1:
        return codes.contiguous()
    grouped = codes.view(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.uint8) * bits
    return (grouped << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: (..., D·bits/8) bytes → (..., D) uint8 codes."""
    per = 8 // bits
    if per == 1:
        return packed
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.view(*packed.shape[:-1], packed.shape[-1] * per)


# --- quantizing one tensor -------------------------------------------------------------------
def _round_scale(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Storage-dtype zero ≤ min and scale ≥ (max − zero) / levels, so every code stays in range."""
    big = max(float(lo.abs().max()), float(hi.abs().max())) if lo.numel() else 0.0
    dtype = SCALE_DTYPE if big < _SCALE_MAX else torch.float32
    zero = lo.to(dtype)
    zero = torch.where(zero.float() > lo, torch.nextafter(zero, torch.full_like(zero, -math.inf)), zero)
    scale = ((hi - zero.float()) / levels).clamp_min(torch.finfo(SCALE_DTYPE).tiny).to(dtype)
    scale = torch.where(scale.float() * levels + zero.float() < hi,
                        torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    return scale, zero


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min–max quantize ``x`` with one (scale, zero) per slice along ``dim`` (the group axis).
    Returns codes (uint8, shape of ``x``), scale and zero (``dim`` reduced away)."""
    levels = (1 << bits) - 1
    xf = x.float()
    lo, hi = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    scale, zero = _round_scale(lo, hi, levels)
    codes = ((xf - zero.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    return codes, scale.squeeze(dim), zero.squeeze(dim)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dim: int) -> torch.Tensor:
    return codes.float() * scale.unsqueeze(dim).float() + zero.unsqueeze(dim).float()


@dataclass
class Packed:
    """One quantized tensor (B, H, T, D): packed codes and its scales/zeros in group layout."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.codes, self.scale, self.zero


def quantize_tokens(x: torch.Tensor, bits: int, channel_group: int) -> Packed:
    """Per token: one scale per ``channel_group`` channels of each token."""
    b, h, t, d = x.shape
    codes, scale, zero = quantize(x.view(b, h, t, d // channel_group, channel_group), bits, -1)
    return Packed(pack(codes.view(b, h, t, d), bits), scale, zero)


def dequantize_tokens(p: Packed, bits: int, channel_group: int) -> torch.Tensor:
    codes = unpack(p.codes, bits)
    b, h, t, d = codes.shape
    return dequantize(codes.view(b, h, t, d // channel_group, channel_group), p.scale, p.zero, -1).view(b, h, t, d)


def quantize_channels(x: torch.Tensor, bits: int, token_group: int) -> Packed:
    """Per channel: one scale per channel for each ``token_group`` consecutive tokens (KIVI keys)."""
    b, h, t, d = x.shape
    codes, scale, zero = quantize(x.view(b, h, t // token_group, token_group, d), bits, -2)
    return Packed(pack(codes.view(b, h, t, d), bits), scale, zero)


def dequantize_channels(p: Packed, bits: int, token_group: int) -> torch.Tensor:
    codes = unpack(p.codes, bits)
    b, h, t, d = codes.shape
    return dequantize(codes.view(b, h, t // token_group, token_group, d), p.scale, p.zero, -2).view(b, h, t, d)


def _cat(a: Packed | None, b: Packed) -> Packed:
    if a is None:
        return b
    return Packed(*(torch.cat([x, y], dim=2) for x, y in zip(a.tensors(), b.tensors())))


def _slice(p: Packed, groups: int, tokens: int) -> Packed:
    """The first ``tokens`` tokens (``groups`` scale groups along the token axis)."""
    return Packed(p.codes[:, :, :tokens], p.scale[:, :, :groups], p.zero[:, :, :groups])


def _padding_first(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor):
    """Move each head's padding slots (``~valid``, (B, H, L)) before its real ones, keeping both in
    order, and fill them with the head's first real token (position included)."""
    length = valid.shape[-1]
    order = valid.to(torch.int8).argsort(dim=-1, stable=True)  # padding first, then the real slots
    pad = (~valid).sum(-1, keepdim=True)  # (B, H, 1)
    slots = torch.arange(length, device=valid.device)
    source = order.gather(-1, torch.maximum(slots, pad).clamp(max=length - 1))
    index = source[..., None].expand(*source.shape, keys.shape[-1])
    return (keys.gather(2, index), values.gather(2, index), positions.gather(2, source), slots >= pad)


class QuantizedLayer(KVLayer):
    """Keys/values quantized per :class:`QuantSpec`; storage order = [quantized][window]."""

    def __init__(self, spec: QuantSpec, dtype: torch.dtype):
        super().__init__()
        if spec.bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, got {spec.bits}")
        self.spec, self.dtype = spec, dtype
        self.qkeys: Packed | None = None
        self.qvalues: Packed | None = None
        self.quantized = 0  # tokens held quantized (a multiple of the token group)
        self.rkeys: torch.Tensor | None = None  # the full-precision window (B, H, Lr, D)
        self.rvalues: torch.Tensor | None = None
        self.positions = None
        self.valid = None
        self.is_initialized = True

    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                   valid: torch.Tensor | None, spec: QuantSpec) -> "QuantizedLayer":
        out = cls(spec, keys.dtype)
        out.rkeys, out.rvalues = keys, values
        out.positions, out.valid = positions, valid
        out._flush()
        return out

    @classmethod
    def from_layer(cls, layer: KVLayer, spec: QuantSpec) -> "QuantizedLayer":
        """Quantize what ``layer`` holds. A layer whose heads hold different numbers of tokens
        (:class:`~lcbench.cache.ragged.RaggedLayer`, padded at the end of each short head) is
        first laid out with its padding *before* each head's tokens, filled with copies of the
        head's oldest token: the full-precision window then holds each head's most recent tokens
        (not padding), and no key group's range is widened by the zero fill. The padded
        rectangle itself is still stored (and counted in :meth:`nbytes`)."""
        keys, values = layer.dense()
        positions, valid = layer.positions, layer.valid
        from .ragged import RaggedLayer  # ragged imports layer only; no cycle at call time

        if isinstance(layer, RaggedLayer) and valid is not None:
            keys, values, positions, valid = _padding_first(keys, values, positions, valid)
        return cls.from_dense(keys, values, positions, valid, spec)

    # --- quantizing what is past the window ----------------------------------------------------
    def _channel_group(self) -> int:
        return self.spec.channel_group(self.rkeys.shape[-1] if self.rkeys is not None else self.spec.group_size)

    def _quantize_keys(self, x: torch.Tensor) -> Packed:
        if self.spec.key_axis == "channel":
            return quantize_channels(x, self.spec.bits, self.spec.group_size)
        return quantize_tokens(x, self.spec.bits, self._channel_group())

    def _dequantize_keys(self, p: Packed) -> torch.Tensor:
        if self.spec.key_axis == "channel":
            return dequantize_channels(p, self.spec.bits, self.spec.group_size)
        return dequantize_tokens(p, self.spec.bits, self._channel_group())

    def _flush(self) -> None:
        """Quantize the oldest whole token groups of the window that lie beyond ``spec.window``."""
        lr = self.rkeys.shape[2]
        n = self.spec.quantized_tokens(lr)
        if n <= 0:
            return
        cg = self._channel_group()
        self.qkeys = _cat(self.qkeys, self._quantize_keys(self.rkeys[:, :, :n]))
        self.qvalues = _cat(self.qvalues, quantize_tokens(self.rvalues[:, :, :n], self.spec.bits, cg))
        self.rkeys = self.rkeys[:, :, n:].contiguous()
        self.rvalues = self.rvalues[:, :, n:].contiguous()
        self.quantized += n

    # --- the storage contract ---------------------------------------------------------------
    def append(self, keys, values, positions, valid):
        b, h, q, _ = keys.shape
        pos = positions[:, None, :].expand(b, h, q)
        if self.valid is not None or valid is not None:
            old = self.valid if self.valid is not None else torch.ones_like(self.positions, dtype=torch.bool)
            new = valid[:, None, :].expand(b, h, q) if valid is not None else torch.ones_like(pos, dtype=torch.bool)
            self.valid = torch.cat([old, new], dim=-1)
        self.positions = torch.cat([self.positions, pos], dim=-1)
        self.rkeys = torch.cat([self.rkeys, keys.to(self.dtype)], dim=2)
        self.rvalues = torch.cat([self.rvalues, values.to(self.dtype)], dim=2)
        self._flush()

    def dense(self):
        if self.qkeys is None:
            return self.rkeys, self.rvalues
        keys = self._dequantize_keys(self.qkeys).to(self.dtype)
        values = dequantize_tokens(self.qvalues, self.spec.bits, self._channel_group()).to(self.dtype)
        return torch.cat([keys, self.rkeys], dim=2), torch.cat([values, self.rvalues], dim=2)

    def nbytes(self) -> int:
        held = [self.rkeys, self.rvalues]
        for p in (self.qkeys, self.qvalues):
            if p is not None:
                held.extend(p.tensors())
        return tensor_bytes(*held)

    def _rebuild(self, keys, values, positions, valid) -> None:
        fresh = QuantizedLayer.from_dense(keys, values, positions, valid, self.spec)
        self.__dict__.update(fresh.__dict__)

    def select(self, index):
        """Keep slots ``index``: dequantize, gather and quantize again (token groups change)."""
        index, _ = index.sort(dim=-1)
        keys, values = self.dense()
        gather = index[..., None].expand(*index.shape, keys.shape[-1])
        valid = None if self.valid is None else self.valid.gather(2, index)
        self._rebuild(keys.gather(2, gather), values.gather(2, gather), self.positions.gather(2, index),
                      None if valid is None or bool(valid.all()) else valid)

    def crop_to(self, length):
        self.positions = self.positions[:, :, :length]
        if self.valid is not None:
            self.valid = self.valid[:, :, :length]
        if length >= self.quantized:
            self.rkeys = self.rkeys[:, :, : length - self.quantized]
            self.rvalues = self.rvalues[:, :, : length - self.quantized]
            return
        # the cut falls inside the quantized part: whole groups before it stay, the rest goes
        # back to the window as the values attention saw (dequantized)
        g = self.spec.token_group()
        keep = length // g * g
        keys = self._dequantize_keys(self.qkeys)[:, :, keep:length].to(self.dtype)
        values = dequantize_tokens(self.qvalues, self.spec.bits, self._channel_group())[:, :, keep:length].to(self.dtype)
        key_groups = keep // self.spec.group_size if self.spec.key_axis == "channel" else keep
        self.qkeys = _slice(self.qkeys, key_groups, keep) if keep else None
        self.qvalues = _slice(self.qvalues, keep, keep) if keep else None
        self.quantized = keep
        self.rkeys, self.rvalues = keys, values

    def repeat_rows(self, n):
        out = QuantizedLayer(self.spec, self.dtype)

        def rep(t):
            return None if t is None else t.repeat_interleave(n, dim=0)

        out.qkeys = None if self.qkeys is None else Packed(*map(rep, self.qkeys.tensors()))
        out.qvalues = None if self.qvalues is None else Packed(*map(rep, self.qvalues.tensors()))
        out.quantized = self.quantized
        out.rkeys, out.rvalues = rep(self.rkeys), rep(self.rvalues)
        out.positions, out.valid = rep(self.positions), rep(self.valid)
        return out
