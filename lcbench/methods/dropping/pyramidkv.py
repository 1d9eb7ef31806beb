"""PyramidKV: SnapKV's selection with a budget per layer, large in the first layers and small in
the last ones.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
(arXiv:2406.02069). Budgets form an arithmetic sequence over the layers whose mean is the
uniform budget (:func:`.select.context_budget`); its smallest term is ``mean / beta`` (the reference
code's pyramid, KVCache-Factory ``pyramidkv_utils.py``), capped so no layer keeps more than
``n − window`` scored tokens; where no such pyramid exists the budget is uniform. The layers
then hold different numbers of tokens, which lcbench's attention handles under plain SDPA.
"""

from ...params import Param
from ..presets import from_preset
from .select import context_budget, real_context_slots
from .snapkv import SNAPKV_PARAMS, SnapKV


def layer_budget(n: int, mean: int, window: int, beta: float, layer: int, layers: int) -> int:
    """Tokens layer ``layer`` of ``layers`` keeps out of ``n`` (their mean over layers ≈ ``mean``)."""
    low = mean / beta
    high = 2 * mean - low
    if high > n - window:
        high = n - window
        low = 2 * mean - high
    if layers < 2 or not (n >= high >= low >= window):
        return mean
    return int(round(high - layer * (high - low) / (layers - 1)))


@from_preset("kv_dropping.toml")
class PyramidKV(SnapKV):
    name = "pyramidkv"
    params = SNAPKV_PARAMS + (Param("beta", float, None, "steepness: the last layer keeps mean/beta tokens"),)

    def budget(self, layer, seen):
        mean = context_budget(layer, seen, self.ratio)
        return layer_budget(real_context_slots(layer, seen), mean, self.args["window_size"], self.args["beta"],
                            seen.layer_idx, seen.num_layers)
