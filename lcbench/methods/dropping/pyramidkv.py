"""PyramidKV: SnapKV's selection with a budget per layer, large in the first layers and small in
the last ones.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
(arXiv:2406.02069). Budgets form an arithmetic sequence over the layers whose mean is the
uniform budget (:func:`.select.context_budget`); its smallest term is ``mean / beta`` (the reference
code's pyramid, KVCache-Factory ``pyramidkv_utils.py``), capped so no layer keeps more than
``n − window`` scored tokens. The layers then hold different numbers of tokens, which lcbench's
attention handles under plain SDPA.

Where no such pyramid exists — its smallest term would fall below ``window_size`` (``mean / beta
< window``), or the model has one layer — every layer keeps the uniform budget and the method
*is* SnapKV (upstream behaviour, kvpress's ``PyramidKVPress`` does the same). With the defaults
(window 64, beta 20) that happens on a 4K-token context from ratio ≈ 0.69 on (0.75, 0.9). The
fallback is never silent: each sample records ``pyramid_uniform_layers`` (the fraction of its
compressed layers that kept the uniform budget; 1.0 = plain SnapKV) and
``pyramid_budget_min`` / ``pyramid_budget_max`` (the smallest and largest per-layer budget, in
context tokens per head).
"""

from __future__ import annotations

from ...params import Param
from .select import context_budget, real_context_slots
from .snapkv import SNAPKV_PARAMS, SnapKV


def pyramid_bounds(n: int, mean: int, window: int, beta: float, layers: int) -> tuple[float, float] | None:
    """The first and last layer's budgets ``(high, low)`` of the pyramid over ``layers`` layers
    keeping ``mean`` of ``n`` tokens on average, or ``None`` when no pyramid fits (uniform budget)."""
    low = mean / beta
    high = 2 * mean - low
    if high > n - window:
        high = n - window
        low = 2 * mean - high
    if layers < 2 or not (n >= high >= low >= window):
        return None
    return high, low


def layer_budget(n: int, mean: int, window: int, beta: float, layer: int, layers: int) -> int:
    """Tokens layer ``layer`` of ``layers`` keeps out of ``n`` (their mean over layers ≈ ``mean``)."""
    bounds = pyramid_bounds(n, mean, window, beta, layers)
    if bounds is None:
        return mean
    high, low = bounds
    return int(round(high - layer * (high - low) / (layers - 1)))


class PyramidKV(SnapKV):
    name = "pyramidkv"
    family = "kv_dropping"
    paper = ("Cai et al., PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information "
             "Funneling (arXiv:2406.02069)")
    summary = "SnapKV scores with per-layer budgets decreasing linearly from the first to the last layer"
    defaults = {"beta": 20}
    params = SNAPKV_PARAMS + (
        Param("beta", float, None,
              "steepness: the last layer keeps mean/beta tokens; where mean/beta < window_size (defaults: "
              "ratio ≥ 0.69 on 4K tokens) every layer keeps the uniform budget, i.e. SnapKV — recorded per "
              "sample as pyramid_uniform_layers"),)

    def begin_sample(self):
        self._uniform: dict[int, bool] = {}  # per compressed layer: the pyramid did not fit
        self._budgets: dict[int, int] = {}

    def budget(self, layer, seen):
        if not hasattr(self, "_uniform"):
            self.begin_sample()
        n = real_context_slots(layer, seen)
        mean = context_budget(layer, seen, self.ratio)
        window, beta = self.args["window_size"], self.args["beta"]
        keep = layer_budget(n, mean, window, beta, seen.layer_idx, seen.num_layers)
        self._uniform[seen.layer_idx] = pyramid_bounds(n, mean, window, beta, seen.num_layers) is None
        self._budgets[seen.layer_idx] = keep
        return keep

    def sample_stats(self) -> dict[str, float]:
        if not getattr(self, "_uniform", None):
            return {}
        budgets = self._budgets.values()
        return {"pyramid_uniform_layers": sum(self._uniform.values()) / len(self._uniform),
                "pyramid_budget_min": float(min(budgets)), "pyramid_budget_max": float(max(budgets))}
