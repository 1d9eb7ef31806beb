"""CurDKV: keep the tokens with the largest approximate CUR leverage of keys and values.

Sengupta et al., "Value-Guided KV Compression for LLMs via Approximated CUR Decomposition"
(CurDKV, arXiv:2509.15038). A token's leverage is approximated by its squared key and value norms;
with ``local_window`` they are normalized within consecutive windows of ``window_size`` tokens
(so every stretch of the context competes locally), combined (``leverage``: key, value, their mean
or — the default — their product), normalized over the context, and the first ``n_sink`` tokens
are always kept. Read against kvpress 0.5.5 ``kvpress/presses/cur_press.py`` (CURPress, with its
defaults), whose positions this method keeps exactly (tests/test_kvpress_presses.py); kvpress's
random-projection option (``use_random_leverage``) is not offered.
"""

import torch
import torch.nn.functional as F

from ...params import Param
from .scoring import ScoringDrop
from .select import context_slots, force_keep


def local_share(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, n) each entry divided by the sum of its window of ``width`` consecutive entries."""
    n = x.shape[-1]
    padded = F.pad(x, (0, -n % width))
    blocks = padded.reshape(*x.shape[:2], -1, width)
    return (blocks / blocks.sum(-1, keepdim=True)).reshape(*x.shape[:2], -1)[..., :n]


class CUR(ScoringDrop):
    name = "cur"
    family = "kv_dropping"
    paper = ("Sengupta et al., Value-Guided KV Compression for LLMs via Approximated CUR Decomposition "
             "(CurDKV, arXiv:2509.15038)")
    summary = "approximate CUR leverage: squared key × value norms, normalized per local window; sinks kept"
    params = (
        Param("n_sink", int, 4, "initial tokens always kept (attention sinks)", min=0),
        Param("leverage", str, "kv_product", "which leverage: key, value, kv_avg or kv_product",
              choices=("key", "value", "kv_avg", "kv_product")),
        Param("local_window", bool, True, "normalize the leverage within consecutive windows"),
        Param("window_size", int, 16, "tokens per local window", min=1),
    )

    def scores(self, layer, seen):
        keys, values = layer.dense()
        n = context_slots(layer, seen)
        k2 = keys[:, :, :n].float().pow(2).sum(-1)
        v2 = values[:, :, :n].float().pow(2).sum(-1)
        if layer.valid is not None:  # padding has no leverage
            k2, v2 = k2 * layer.valid[..., :n], v2 * layer.valid[..., :n]
        if self.args["local_window"]:
            k2, v2 = local_share(k2, self.args["window_size"]), local_share(v2, self.args["window_size"])
        kind = self.args["leverage"]
        scores = {"key": k2, "value": v2, "kv_avg": (k2 + v2) / 2, "kv_product": k2 * v2}[kind]
        scores = scores / scores.sum(-1, keepdim=True)
        return force_keep(torch.nan_to_num(scores, nan=0.0), 0, self.args["n_sink"])
