"""The ratio knob of KV quantization: ``--ratio r`` (the fraction of this layer's KV bytes to
remove) is mapped onto a bit width and a full-precision window of recent tokens.

The bit width is the largest on offer whose fully quantized cache removes at least ``r``; the
window is then the longest that still removes ``r`` (more recent tokens in full precision, never
fewer bytes saved than asked). A fixed ``window`` (≥ 0) or ``bits`` skips that search. When no
choice reaches ``r``, the most compressed one is used and the engine reports the shortfall.
The achieved ratio is measured from the bytes held, as for every method.

The longest window is found by bisection over the number of quantized token groups: the bytes
held are an affine function of it (:meth:`QuantSpec.nbytes`; exactly so whenever the packed codes
fill whole bytes, i.e. an even head dimension or 4/8 bits), so "fits the budget" is monotone in
it and bisection finds the same window as trying every window from the longest down, in
O(log L) evaluations instead of O(L).

Each sample records what was chosen (:meth:`QuantizeStage.sample_stats`): ``quant_bits`` (mean
bit width over the layers), ``quant_window`` (mean full-precision tokens per layer) and
``quant_window_share`` (their share of the layer's tokens) — so a 4-bit run with a long window
is told apart from a 2-bit one.
"""

from __future__ import annotations

import dataclasses

import torch

from ...cache.layer import KVLayer
from ...cache.quantized import QuantizedLayer, QuantSpec
from ..base import LayerObservation, Stage


def plan(layer: KVLayer, ratio: float, bits_options: tuple[int, ...], key_axis: str, group_size: int,
         window: int) -> QuantSpec:
    """The :class:`QuantSpec` that removes at least ``ratio`` of ``layer``'s bytes with the most
    bits, then the longest window (see the module docstring)."""
    keys, values = layer.dense()
    b, h, length, d = keys.shape
    elem = keys.element_size()
    target = (1.0 - ratio) * layer.nbytes()

    def size(spec: QuantSpec) -> int:
        return spec.nbytes(b, h, length, d, elem, values.shape[-1])

    g = group_size if key_axis == "channel" else 1
    for bits in bits_options:
        if window >= 0:
            spec = QuantSpec(bits, key_axis, group_size, window)
            if size(spec) <= target or bits == bits_options[-1]:
                return spec
            continue
        spec = longest_window(bits, key_axis, group_size, length, g, lambda s: size(s) <= target)
        if spec is not None:
            return spec
    return QuantSpec(bits_options[-1], key_axis, group_size, max(window, 0))


def longest_window(bits: int, key_axis: str, group_size: int, length: int, g: int, fits) -> QuantSpec | None:
    """The spec with the fewest quantized tokens (a multiple of ``g``, so the longest window) that
    ``fits``, or ``None``: bisection over the group count, valid because the bytes held are affine
    in it (see the module docstring), so ``fits`` turns true at most once."""

    def spec(groups: int) -> QuantSpec:
        return QuantSpec(bits, key_axis, group_size, length - groups * g)

    if fits(spec(0)):
        return spec(0)
    lo, hi = 0, length // g  # fits(spec(lo)) is false; fits(spec(hi)) is checked next
    if not fits(spec(hi)):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(spec(mid)):
            hi = mid
        else:
            lo = mid
    return spec(hi)


class QuantizeStage(Stage):
    """A cache stage that turns each layer into a :class:`QuantizedLayer` planned by :func:`plan`.
    Subclasses set ``key_axis`` and say which bit widths they offer."""

    stages = ("cache",)
    key_axis = "token"
    # reference: attention reads a dequantized buffer in the model's dtype (no fused low-bit kernel), so decode
    # costs about what full costs, not what a kernel reading the packed codes would
    reference_latency = True

    def bits_options(self) -> tuple[int, ...]:
        return (self.args["bits"],)

    def begin_sample(self) -> None:
        self._chosen: dict[int, tuple[int, int, int]] = {}  # per layer: bits, full-precision tokens, tokens

    def compress_layer(self, layer: KVLayer, seen: LayerObservation) -> KVLayer:
        if self.ratio <= 0:
            return layer
        spec = plan(layer, self.ratio, self.bits_options(), self.key_axis, self.args["group_size"],
                    self.args["window"])
        if self.args.get("block", 1) > 1:
            spec = dataclasses.replace(spec, decode_block=self.args["block"])
        out = QuantizedLayer.from_layer(layer, spec)
        if not hasattr(self, "_chosen"):
            self.begin_sample()
        length = out.seq_len()
        self._chosen[seen.layer_idx] = (spec.bits, length - out.quantized, length)
        return out

    def sample_stats(self) -> dict[str, float]:
        """The bits and full-precision window chosen for this sample, averaged over the layers."""
        chosen = list(getattr(self, "_chosen", {}).values())
        if not chosen:
            return {}
        n = len(chosen)
        return {"quant_bits": sum(c[0] for c in chosen) / n,
                "quant_window": sum(c[1] for c in chosen) / n,
                "quant_window_share": sum(c[1] / c[2] for c in chosen if c[2]) / n}

    def max_ratio(self, heads: int, length: int, head_dim: int, dtype: torch.dtype) -> float:
        """The largest ratio this stage can reach on a dense layer of that shape (window 0)."""
        spec = QuantSpec(min(self.bits_options()), self.key_axis, self.args["group_size"], 0)
        elem = torch.finfo(dtype).bits // 8
        return 1.0 - spec.nbytes(1, heads, length, head_dim, elem) / (2 * heads * length * head_dim * elem)
