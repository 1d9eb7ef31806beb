"""FourierAttention: the head dimensions that long context does not need are stored as
fixed-length spectral coefficients along the sequence; the others are kept exactly.

Liu et al., "Beyond Homogeneous Attention: Memory-Efficient LLMs via Fourier-Approximated KV
Cache" (arXiv:2506.11886). Read against the official implementation,
github.com/ShirleYoung/FourierAttention at commit c834104c8a99a4197691586c91e1938bfc20fd96:
``fourier_attn_triton/cache_utils_fourier.py`` (the cache: ``numinittokens`` sink tokens and a
``maxlocallen`` local window kept whole, the middle's non-critical dimensions of the post-RoPE keys
and of the values projected onto ``maxmidstates`` Fourier states, the critical ones kept) and
``compressed_dims_search/compressed_dim_search.py`` (the offline search: per layer, the
dimensions whose trajectories along a calibration context the Fourier states reconstruct with the
lowest mean squared error are the compressed ones). The defaults are the official ones: 4 sinks,
1024 local tokens, 1024 coefficients.

What lcbench does:

* **Calibration** (:meth:`FourierKV.calibrate`, once per model): a forward over a seeded
  calibration text of ``calibration_tokens`` tokens; for every layer, KV head and dimension of the
  post-RoPE keys and of the values, the mean squared error of its trajectory after the sinks when
  kept to the first ``1/32`` of its spectrum (the official 32K setting's share: 1024 states for
  ≈31K middle tokens). Lower error = less sensitive = compressed first.
* **Compression** (per layer): the first ``sinks`` and last ``local`` context tokens stay whole; the
  middle stores its compressed dimensions as ``coefficients`` coefficients of the orthonormal DCT-II
  basis over the middle's own length (the least-squares fit; the official code uses cos/sin pairs
  over a period that also covers the tokens still to be generated, then rescales each dimension's
  mean and spread — an orthonormal basis over the segment needs no rescaling). The layer is a
  :class:`~lcbench.cache.fourier.FourierLayer`; attention reads its reconstruction.
* **Ratio**: ``--ratio`` is the share of the context's KV bytes saved, measured from what the layer
  holds. With the paper's window and coefficient lengths, the number of compressed dimensions per
  head (keys and values together, split between them by the pooled calibration errors of the layer)
  is the smallest that reaches it. A context too short for those lengths (the middle must be longer
  than the coefficients) scales the window and the coefficients down together, so that
  ``dims_share`` of the dimensions (the paper's typical 80 %; all of them at ratios that need it)
  reach the ratio. Every head compresses the same number of dimensions (its own best ones), so
  storage stays rectangular; the paper's per-layer shares (hand-set for Llama-3.2-3B) are not used.

Not done: the streaming update of the coefficients during generation (the official cache folds
each token leaving its local window into the coefficients); here question and answer tokens are
appended whole, as with every lcbench cache stage, and the FlashFourierAttention Triton kernel
(attention reads a reconstructed dense view: a reference latency).
"""

from __future__ import annotations

import math
import random

import torch

from ...cache.fourier import FourierLayer, project, reconstruct
from ...errors import UserError
from ...params import Param
from ..base import Stage
from ..dropping.select import context_slots

INDEX_BYTES = 2  # int16 dimension indices, per compressed dimension and head
SPECTRUM_SHARE = 1 / 32  # calibration: coefficients per middle token (official 32K setting: 1024 of ≈31K)
SENTENCES = (
    "The committee met on a rainy Tuesday to review the annual budget.",
    "Several members argued that the library needed a new roof before winter.",
    "A small boat drifted past the harbour while gulls circled overhead.",
    "In 1887 the railway reached the valley and the town doubled in size.",
    "She wrote down the measurements twice, then checked them against the map.",
    "The recipe calls for flour, two eggs, a pinch of salt and warm milk.",
    "Nobody expected the quiet student to win the regional chess tournament.",
    "Engineers replaced the old pumps, and the water pressure rose at once.",
    "The museum's east wing displays pottery from the bronze age.",
    "After the storm, volunteers cleared fallen branches from the park paths.",
    "His letter described the mountains, the cold mornings and the long walks.",
    "The report lists seven causes of the delay and proposes three remedies.",
)


def calibration_ids(tokenizer, tokens: int, seed: int = 0) -> list[int]:
    """``tokens`` ids of a seeded shuffle of plain sentences (no periodic filler)."""
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < tokens:
        ids += tokenizer(" " + rng.choice(SENTENCES), add_special_tokens=False)["input_ids"]
    return ids[:tokens]


def fit_error(x: torch.Tensor, count: int) -> torch.Tensor:
    """(..., d): mean squared error of each column of ``x`` (..., M, d) kept to ``count`` DCT coefficients."""
    approx = reconstruct(project(x, count), x.shape[-2])
    return (approx - x.float()).pow(2).mean(-2)


def choose_dims(key_error: torch.Tensor, value_error: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per KV head, the key and value dimensions to compress: ``total`` per head in all, split
    between keys and values by pooling the layer's errors (B or 1, H, Dk) / (…, Dv) over its heads
    (lowest first); each head then takes its own lowest-error dimensions. Returns (H, ck), (H, cv)."""
    h, dk = key_error.shape
    dv = value_error.shape[-1]
    total = max(0, min(dk + dv, total))
    pooled = torch.cat([key_error, value_error], dim=-1).flatten()
    lowest = pooled.argsort()[: total * h]
    ck = int(round(int(((lowest % (dk + dv)) < dk).sum()) / h))
    ck = min(dk, max(total - dv, ck))
    cv = total - ck
    return key_error.argsort(-1)[:, :ck], value_error.argsort(-1)[:, :cv]


def plan(n: int, sinks: int, local: int, coefficients: int, ratio: float, dims: int, elem: int,
         dims_share: float, protected: int = 0) -> tuple[int, int, int, int] | None:
    """(front, back, coefficients, compressed dimensions per head) storing at most ``1 − ratio`` of
    the dense bytes of ``n`` context slots and ``protected`` question slots (kept whole; ``dims`` =
    Dk + Dv, ``elem`` bytes per value), or None when nothing need be compressed. Paper lengths
    first; a context too short for them scales window and coefficients."""
    front = min(sinks, n)
    target = ratio * (n + protected) * dims * elem  # bytes to save per head

    def needed(back: int, coef: int) -> int | None:
        per_dim = (n - front - back - coef) * elem - INDEX_BYTES  # bytes one compressed dimension saves
        if per_dim <= 0:
            return None
        c = math.ceil(target / per_dim)
        return c if c <= dims else None

    c = needed(local, coefficients)
    if c is not None:
        return front, local, coefficients, c
    for share in (dims_share, 1.0):
        # largest f with (n − front − f·(local + coefficients)) · share · dims · elem ≥ target (+ indices)
        room = n - front - (target + INDEX_BYTES * share * dims) / (share * dims * elem)
        f = min(1.0, room / max(1, local + coefficients))
        if f <= 0:
            continue
        back, coef = int(f * local), max(1, int(f * coefficients))
        c = needed(back, coef)
        if c is not None:
            return front, back, coef, c
    return None


class FourierKV(Stage):
    name = "fourierkv"
    hybrid_layers = False  # its calibration lists per-dimension errors by model layer
    family = "soft_compression"
    token_budget = False  # it compresses dimensions along the sequence, not whole tokens
    # reference: attention reads a reconstructed dense view (no FlashFourierAttention kernel)
    reference_latency = True
    paper = ("Liu et al., Beyond Homogeneous Attention: Memory-Efficient LLMs via Fourier-Approximated KV Cache "
             "(arXiv:2506.11886); github.com/ShirleYoung/FourierAttention @c834104")
    summary = ("long-context-insensitive head dims (calibrated) of the middle context stored as fixed-length DCT "
               "coefficients; sinks, local window and the other dims exact")
    params = (
        Param("sinks", int, 4, "first context tokens kept whole (numinittokens)", min=0),
        Param("local", int, 1024, "last context tokens kept whole (maxlocallen)", min=0),
        Param("coefficients", int, 1024, "spectral coefficients per compressed dimension (maxmidstates)", min=1),
        Param("dims_share", float, 0.8, "share of dimensions compressed when the context is too short for local + "
              "coefficients at the paper's lengths (both are then scaled down)", min=0.05, max=1.0),
        Param("calibration_tokens", int, 2048, "tokens of the calibration text the dimensions are ranked on", min=64),
    )
    calibration_params = ("sinks", "calibration_tokens")

    def calibrate(self, model, tokenizer):
        """``{"key_error": [(H, Dk)] per layer, "value_error": [(H, Dv)] per layer}``."""
        from ..dropping.compresskv import run_captured

        ids = calibration_ids(tokenizer, self.args["calibration_tokens"])
        errors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        start = min(self.args["sinks"], len(ids) - 2)

        def measure(module, query, key, value, scaling):
            mid_k, mid_v = key[0, :, start:], value[0, :, start:]
            count = max(2, int(mid_k.shape[1] * SPECTRUM_SHARE))
            errors[module.layer_idx] = (fit_error(mid_k, count).cpu(), fit_error(mid_v, count).cpu())

        with torch.inference_mode():
            run_captured(model, ids, measure)
        layers = sorted(errors)
        return {"key_error": [errors[i][0] for i in layers], "value_error": [errors[i][1] for i in layers]}

    def _errors(self, layer_idx: int):
        if self.calibration is None:
            raise UserError("fourierkv has no calibration (its per-dimension Fourier errors). Fix: run it through "
                            "lcbench's engine, which calibrates it once per model, or set "
                            "stage.calibration = stage.calibrate(model, tokenizer) first.")
        return self.calibration["key_error"][layer_idx], self.calibration["value_error"][layer_idx]

    def begin_sample(self):
        self._shapes: list[tuple[int, int, int, int]] = []

    def compress_layer(self, layer, seen):
        if self.ratio <= 0:
            return layer
        n = context_slots(layer, seen)
        keys, values = layer.dense()
        dk, dv = keys.shape[-1], values.shape[-1]
        shape = plan(n, self.args["sinks"], self.args["local"], self.args["coefficients"], self.ratio, dk + dv,
                     keys.element_size(), self.args["dims_share"], seen.protected)
        if shape is None:
            return layer
        front, back, coef, total = shape
        key_error, value_error = self._errors(seen.layer_idx)
        kd, vd = choose_dims(key_error.to(keys.device), value_error.to(keys.device), total)
        b = keys.shape[0]
        if not hasattr(self, "_shapes"):
            self.begin_sample()
        self._shapes.append((back, coef, kd.shape[-1], vd.shape[-1]))
        return FourierLayer.from_layer(layer, front, back + seen.protected, coef,
                                       kd[None].expand(b, -1, -1), vd[None].expand(b, -1, -1))

    def sample_stats(self):
        shapes = getattr(self, "_shapes", [])
        if not shapes:
            return {}
        mean = [sum(s[i] for s in shapes) / len(shapes) for i in range(4)]
        return {"fourier_local": mean[0], "fourier_coefficients": mean[1], "fourier_key_dims": mean[2],
                "fourier_value_dims": mean[3]}
