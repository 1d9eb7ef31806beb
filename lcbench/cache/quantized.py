"""A layer that stores keys/values quantized and packed, with a full-precision recent window.

Asymmetric min–max quantization to ``bits`` ∈ {2, 4, 8}: per group, ``zero = min`` and
``scale = (max − min) / (2^bits − 1)`` (stored as float16, rounded so the group's range stays
covered), codes ``round((x − zero) / scale)`` packed ``8 / bits`` to a byte along the head
dimension. Keys are grouped either per channel over ``group_size`` consecutive tokens (KIVI's
keys) or per token over ``group_size`` channels; values always per token (KIVI: Liu et al.,
"KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024, arXiv:2402.02750).
The newest ``window`` tokens stay in the model's dtype; older ones are quantized as soon as a
whole token group is past the window. :meth:`QuantizedLayer.dense` returns a compute buffer in the model's dtype where each
group was dequantized once, when it closed; :meth:`QuantizedLayer.nbytes` counts the packed codes,
scales, zeros and the window — the bytes the method stores (the buffer is reported apart, by
:meth:`QuantizedLayer.buffer_nbytes`, and is part of the measured peak memory). Reconstruction error per element is at most ``scale / 2`` (plus float16 rounding
of the scale and zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .layer import KVLayer, refuse_bias, tensor_bytes
from .room import drop_room, extend, grow

SCALE_DTYPE = torch.float16
_SCALE_MAX = 60000.0  # beyond this magnitude float16 scales would overflow; float32 is used instead


@dataclass(frozen=True)
class QuantSpec:
    """How a layer is quantized. ``key_axis``: "channel" (one scale per channel per group of
    ``group_size`` tokens) or "token" (one scale per token per group of ``group_size`` channels).
    ``decode_block``: while tokens are appended (question, decoding), the tokens past the window
    are quantized only once at least this many have gathered, then all at once (the residual of
    transformers' ``QuantizedCache`` and of KIVI): the window then holds ``window`` to
    ``window + decode_block − 1`` tokens, and a one-token step does not pay a quantization pass in
    every layer. Compression itself always quantizes down to exactly ``window``."""

    bits: int
    key_axis: str
    group_size: int
    window: int
    decode_block: int = 1

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

    def nbytes(self, rows: int, heads: int, length: int, head_dim: int, elem: int,
               value_dim: int | None = None) -> int:
        """Bytes held for ``length`` tokens (planning; equals :meth:`QuantizedLayer.nbytes` with float16
        scales). ``value_dim``: the values' width when it is not the keys' ``head_dim`` (MLA's latent)."""
        kd, vd = head_dim, head_dim if value_dim is None else value_dim
        lq = self.quantized_tokens(length)
        sb = torch.finfo(SCALE_DTYPE).bits // 8
        codes = lq * kd * self.bits // 8 + lq * vd * self.bits // 8

        def per_token(d: int) -> int:
            return lq * (d // self.channel_group(d)) * 2 * sb

        key_scales = (lq // self.group_size) * kd * 2 * sb if self.key_axis == "channel" else per_token(kd)
        window = (length - lq) * (kd + vd) * elem
        return rows * heads * (codes + key_scales + per_token(vd) + window)


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
def scale_dtype(lo: torch.Tensor, hi: torch.Tensor) -> torch.dtype:
    """float16 scales and zeros, or float32 when a magnitude would overflow float16."""
    big = max(-float(lo.min()), float(hi.max())) if lo.numel() else 0.0  # max |x|, as lo ≤ hi
    return SCALE_DTYPE if big < _SCALE_MAX else torch.float32


def _round_scale(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Storage-dtype zero ≤ min and scale ≥ (max − zero) / levels, so every code stays in range."""
    dtype = scale_dtype(lo, hi)
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
    # storage with room to grow along dim 2 that codes/scale/zero are the leading views of (None:
    # they own their storage); what is held — and counted — is the views
    room: tuple[torch.Tensor, ...] | None = None

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
    """``a`` then ``b`` along the token axis, appended into room kept beyond ``a``'s end
    (:func:`lcbench.cache.room.extend`), so decoding does not copy the whole packed layer at every
    step; :meth:`QuantizedLayer.nbytes` counts the views."""
    if a is None:
        return b
    room = a.room if a.room is not None else (None, None, None)
    grown = [extend(x, base, y) for x, base, y in zip(a.tensors(), room, b.tensors())]
    return Packed(*(view for view, _ in grown), room=tuple(base for _, base in grown))


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
    """Keys/values quantized per :class:`QuantSpec`; storage order = [quantized][window].

    What is *stored* (and counted by :meth:`nbytes`) is the packed codes, their scales and zeros
    and the full-precision window. Beside it the layer keeps a **compute buffer**: the dense
    ``(B, H, L, D)`` view attention reads, in the model's dtype — each token group dequantized
    once, when it closes (leaves the window), and the window as is — so a decode step appends to
    it like a dense layer instead of dequantizing the whole layer (issue #14). The buffer is as
    large as a dense cache of the same tokens: it is not in ``kv_bytes`` (not the method's
    storage), but it is real memory and shows in the measured peak memory of a run. A kernel
    attending on the packed groups directly would not need it."""

    def __init__(self, spec: QuantSpec, dtype: torch.dtype):
        super().__init__()
        if spec.bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, got {spec.bits}")
        self.spec, self.dtype = spec, dtype
        self.qkeys: Packed | None = None
        self.qvalues: Packed | None = None
        self.quantized = 0  # tokens held quantized (a multiple of the token group)
        self.dkeys: torch.Tensor | None = None  # compute buffer (B, H, L, D): dequantized groups, then the window
        self.dvalues: torch.Tensor | None = None
        self.positions = None
        self.valid = None
        self._room: dict[str, torch.Tensor] = {}  # bases of the buffer's views, with room to grow (.room)
        self.is_initialized = True

    @property
    def rkeys(self) -> torch.Tensor | None:
        """The full-precision window (B, H, Lr, D): the buffer's slots after the quantized ones."""
        return None if self.dkeys is None else self.dkeys[:, :, self.quantized:]

    @property
    def rvalues(self) -> torch.Tensor | None:
        return None if self.dvalues is None else self.dvalues[:, :, self.quantized:]

    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                   valid: torch.Tensor | None, spec: QuantSpec) -> "QuantizedLayer":
        out = cls(spec, keys.dtype)
        # a copy: closing groups are written back into the buffer in place
        out.dkeys, out.dvalues = keys.clone(), values.clone()
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
        refuse_bias(layer, "quantized layer")
        keys, values = layer.dense()
        positions, valid = layer.positions, layer.valid
        from .ragged import RaggedLayer  # ragged imports layer only; no cycle at call time

        if isinstance(layer, RaggedLayer) and valid is not None:
            keys, values, positions, valid = _padding_first(keys, values, positions, valid)
        return cls.from_dense(keys, values, positions, valid, spec)

    # --- quantizing what is past the window ----------------------------------------------------
    def _channel_group(self, held: torch.Tensor | None) -> int:
        """Channels per scale of ``held`` (keys or values: their widths differ on MLA's latents)."""
        return self.spec.channel_group(held.shape[-1] if held is not None else self.spec.group_size)

    def _quantize_keys(self, x: torch.Tensor) -> Packed:
        if self.spec.key_axis == "channel":
            return quantize_channels(x, self.spec.bits, self.spec.group_size)
        return quantize_tokens(x, self.spec.bits, self._channel_group(self.dkeys))

    def _dequantize_keys(self, p: Packed) -> torch.Tensor:
        if self.spec.key_axis == "channel":
            return dequantize_channels(p, self.spec.bits, self.spec.group_size)
        return dequantize_tokens(p, self.spec.bits, self._channel_group(self.dkeys))

    def _flush(self, block: int = 1) -> None:
        """Quantize the oldest whole token groups of the window that lie beyond ``spec.window``
        (when at least ``block`` tokens do), and put their dequantized values in the compute
        buffer in their place (once)."""
        a = self.quantized
        n = self.spec.quantized_tokens(self.dkeys.shape[2] - a)
        if n <= 0 or n < block:
            return
        cg = self._channel_group(self.dvalues)
        new_keys = self._quantize_keys(self.dkeys[:, :, a:a + n])
        new_values = quantize_tokens(self.dvalues[:, :, a:a + n], self.spec.bits, cg)
        self.dkeys[:, :, a:a + n] = self._dequantize_keys(new_keys).to(self.dtype)
        self.dvalues[:, :, a:a + n] = dequantize_tokens(new_values, self.spec.bits, cg).to(self.dtype)
        self.qkeys = _cat(self.qkeys, new_keys)
        self.qvalues = _cat(self.qvalues, new_values)
        self.quantized += n

    # --- the storage contract ---------------------------------------------------------------
    def append(self, keys, values, positions, valid):
        b, h, q, _ = keys.shape
        pos = positions[:, None, :].expand(b, h, q)
        if self.valid is not None or valid is not None:
            if self.valid is None:
                self.valid = torch.ones_like(self.positions, dtype=torch.bool)
            self._grow("valid", valid[:, None, :].expand(b, h, q) if valid is not None
                       else torch.ones_like(pos, dtype=torch.bool))
        self._grow("positions", pos)
        self._grow("dkeys", keys.to(self.dtype))
        self._grow("dvalues", values.to(self.dtype))
        self._flush(self.spec.decode_block)

    def _grow(self, name: str, new: torch.Tensor) -> None:
        """``name`` extended by ``new`` into room kept after it (:mod:`.room`): no copy per step."""
        grow(self, name, new)

    def dense(self):
        return self.dkeys, self.dvalues

    def nbytes(self) -> int:
        """The stored bytes: packed codes, scales, zeros and the window (not the compute buffer)."""
        held = [self.rkeys, self.rvalues]
        for p in (self.qkeys, self.qvalues):
            if p is not None:
                held.extend(p.tensors())
        return tensor_bytes(*held)

    def buffer_nbytes(self) -> int:
        """Bytes of the dequantized compute buffer beyond the window (memory, not storage)."""
        return tensor_bytes(self.dkeys, self.dvalues) - tensor_bytes(self.rkeys, self.rvalues)

    def _rebuild(self, keys, values, positions, valid) -> None:
        fresh = QuantizedLayer.from_dense(keys, values, positions, valid, self.spec)
        self.__dict__.update(fresh.__dict__)

    def select(self, index):
        """Keep slots ``index``: gather the dequantized view and quantize again (token groups change)."""
        index, _ = index.sort(dim=-1)
        keys, values = self.dense()
        slots = index[..., None]
        valid = None if self.valid is None else self.valid.gather(2, index)
        self._rebuild(keys.gather(2, slots.expand(*index.shape, keys.shape[-1])),
                      values.gather(2, slots.expand(*index.shape, values.shape[-1])), self.positions.gather(2, index),
                      None if valid is None or bool(valid.all()) else valid)

    def crop_to(self, length):
        drop_room(self)  # an older, longer view may still be held: never write over it
        self.positions = self.positions[:, :, :length]
        if self.valid is not None:
            self.valid = self.valid[:, :, :length]
        self.dkeys, self.dvalues = self.dkeys[:, :, :length], self.dvalues[:, :, :length]
        if length >= self.quantized:
            return
        # the cut falls inside the quantized part: whole groups before it stay, the rest goes
        # back to the window as the values attention saw (the buffer's dequantized ones)
        g = self.spec.token_group()
        keep = length // g * g
        key_groups = keep // self.spec.group_size if self.spec.key_axis == "channel" else keep
        self.qkeys = _slice(self.qkeys, key_groups, keep) if keep else None
        self.qvalues = _slice(self.qvalues, keep, keep) if keep else None
        self.quantized = keep

    def _map_rows(self, fn) -> "QuantizedLayer":
        out = QuantizedLayer(self.spec, self.dtype)

        def each(t):
            return None if t is None else fn(t)

        out.qkeys = None if self.qkeys is None else Packed(*map(each, self.qkeys.tensors()))
        out.qvalues = None if self.qvalues is None else Packed(*map(each, self.qvalues.tensors()))
        out.quantized = self.quantized
        out.dkeys, out.dvalues = each(self.dkeys), each(self.dvalues)
        out.positions, out.valid = each(self.positions), each(self.valid)
        return out

    def repeat_rows(self, n):
        return self._map_rows(lambda t: t.repeat_interleave(n, dim=0))

    def keep_rows(self, rows):
        rows = rows.to(self.positions.device)
        out = self._map_rows(lambda t: t.index_select(0, rows))
        if out.valid is not None and bool(out.valid.all()):
            out.valid = None
        return out
