"""The ratio knob of KV quantization: ``--ratio r`` (the fraction of this layer's KV bytes to
remove) is mapped onto a bit width and a full-precision window of recent tokens.

The bit width is the largest on offer whose fully quantized cache removes at least ``r``; the
window is then the longest that still removes ``r`` (more recent tokens in full precision, never
fewer bytes saved than asked). A fixed ``window`` (≥ 0) or ``bits`` skips that search. When no
choice reaches ``r``, the most compressed one is used and the engine reports the shortfall.
The achieved ratio is measured from the bytes held, as for every method.
"""

from __future__ import annotations

import torch

from ...cache.layer import KVLayer
from ...cache.quantized import QuantizedLayer, QuantSpec
from ..base import LayerObservation, Stage


def plan(layer: KVLayer, ratio: float, bits_options: tuple[int, ...], key_axis: str, group_size: int,
         window: int) -> QuantSpec:
    """The :class:`QuantSpec` that removes at least ``ratio`` of ``layer``'s bytes with the most
    bits, then the longest window (see the module docstring)."""
    keys, _ = layer.dense()
    b, h, length, d = keys.shape
    elem = keys.element_size()
    target = (1.0 - ratio) * layer.nbytes()

    def size(spec: QuantSpec) -> int:
        return spec.nbytes(b, h, length, d, elem)

    g = group_size if key_axis == "channel" else 1
    for bits in bits_options:
        if window >= 0:
            spec = QuantSpec(bits, key_axis, group_size, window)
            if size(spec) <= target or bits == bits_options[-1]:
                return spec
            continue
        for quantized in range(0, length // g * g + 1, g):  # fewest quantized tokens first
            spec = QuantSpec(bits, key_axis, group_size, length - quantized)
            if size(spec) <= target:
                return spec
    return QuantSpec(bits_options[-1], key_axis, group_size, max(window, 0))


class QuantizeStage(Stage):
    """A cache stage that turns each layer into a :class:`QuantizedLayer` planned by :func:`plan`.
    Subclasses set ``key_axis`` and say which bit widths they offer."""

    stages = ("cache",)
    key_axis = "token"

    def bits_options(self) -> tuple[int, ...]:
        return (self.args["bits"],)

    def compress_layer(self, layer: KVLayer, seen: LayerObservation) -> KVLayer:
        if self.ratio <= 0:
            return layer
        spec = plan(layer, self.ratio, self.bits_options(), self.key_axis, self.args["group_size"],
                    self.args["window"])
        return QuantizedLayer.from_layer(layer, spec)

    def max_ratio(self, heads: int, length: int, head_dim: int, dtype: torch.dtype) -> float:
        """The largest ratio this stage can reach on a dense layer of that shape (window 0)."""
        spec = QuantSpec(min(self.bits_options()), self.key_axis, self.args["group_size"], 0)
        elem = torch.finfo(dtype).bits // 8
        return 1.0 - spec.nbytes(1, heads, length, head_dim, elem) / (2 * heads * length * head_dim * elem)
