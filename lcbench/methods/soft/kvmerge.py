"""KV merging: the tokens a dropping method would evict are merged into the kept token they most
resemble, instead of being thrown away.

The kept set is exactly SnapKV's (its selection runs on an index proxy of the layer, so the two
methods keep the same slots at the same ratio). Each evicted context token is assigned to the kept
context token whose key has the highest cosine similarity (per row and KV head), and every kept
token's key and value become the weighted average of itself and the tokens assigned to it, the
weights being the attention each received from the observation window (averaged over the query
heads of the KV head). This is the merge step of CaM (Zhang et al., ICML 2024) and D2O (Wan et al.,
arXiv:2406.13035), which average evicted into kept states by attention weight and key similarity.
The stored bytes are SnapKV's at the same ratio: merging changes what is held, not how much.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ...cache.layer import DenseLayer
from ...errors import UserError
from ..base import Stage
from ..dropping.select import align, context_slots, group_mean
from ..dropping.snapkv import KERNEL_SIZE, WINDOW_SIZE, SnapKV

EPS = 1e-6  # keeps every weight positive, so a kept token nothing is merged into stays itself
SIM_CHUNK = 2048  # evicted tokens compared with the kept ones at a time


def index_proxy(layer: DenseLayer) -> DenseLayer:
    """A layer whose single key channel is each slot's storage index: a selection run on it
    reveals which slots it keeps."""
    proxy = DenseLayer()
    b, h, n = layer.positions.shape
    idx = torch.arange(n, device=layer.positions.device, dtype=torch.float64).expand(b, h, n)[..., None]
    proxy.keys, proxy.values, proxy.positions, proxy.valid = idx.clone(), idx.clone(), layer.positions, layer.valid
    return proxy


def merge_evicted(keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, weights: torch.Tensor,
                  n_ctx: int, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values (B, H, L, D) after merging every evicted context slot into its most similar kept
    context slot in ``kept`` (B, H, K); ``weights`` (B, H, n_ctx) ≥ 0 weigh the average."""
    B, H, L, D = keys.shape
    k32, v32 = keys.float(), values.float()
    kept_ctx = kept[..., : int((kept[0, 0] < n_ctx).sum())]  # the protected tail is not a merge target
    evicted = torch.ones(B, H, n_ctx, dtype=torch.bool, device=keys.device)
    evicted.scatter_(2, kept_ctx, False)
    if valid is not None:
        evicted &= valid[..., :n_ctx]
    w = weights.float() + EPS
    kept_unit = F.normalize(k32.gather(2, kept_ctx[..., None].expand(-1, -1, -1, D)), dim=-1)
    target = torch.empty(B, H, n_ctx, dtype=torch.long, device=keys.device)
    for start in range(0, n_ctx, SIM_CHUNK):
        stop = min(n_ctx, start + SIM_CHUNK)
        part = F.normalize(k32[:, :, start:stop], dim=-1)
        target[..., start:stop] = (part @ kept_unit.transpose(-1, -2)).argmax(-1)
    w_ev = (w * evicted)  # (B, H, n_ctx): only evicted tokens contribute
    w_kept = w.gather(2, kept_ctx)
    den = w_kept.scatter_add(2, target, w_ev)
    merged = []
    for x in (k32, v32):  # values may have another head size than keys
        slots = kept_ctx[..., None].expand(-1, -1, -1, x.shape[-1])
        num = x.gather(2, slots) * w_kept[..., None]
        num = num.scatter_add(2, target[..., None].expand(-1, -1, -1, x.shape[-1]), x[:, :, :n_ctx] * w_ev[..., None])
        merged.append(x.scatter(2, slots, num / den[..., None]).to(keys.dtype))
    return merged[0], merged[1]


class KVMerge(Stage):
    name = "kvmerge"
    family = "soft_compression"
    paper = ("Zhang et al., CaM: Cache Merging for Memory-efficient LLMs Inference, ICML 2024; Wan et "
             "al., D2O (arXiv:2406.13035); eviction set of SnapKV (arXiv:2404.14469)")
    summary = ("tokens SnapKV would evict are merged (attention-weighted average) into their most similar "
               "kept token")
    stages = ("cache",)
    params = (
        dataclasses.replace(WINDOW_SIZE, help="last prompt queries whose attention scores (and weighs) the keys"),
        dataclasses.replace(KERNEL_SIZE, help="SnapKV's max-pooling width over neighbouring keys"),
    )

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        self._select = SnapKV(ratio=self.ratio, **self.args)
        self.needs = self._select.needs

    def compress_layer(self, layer, seen):
        if self.ratio <= 0 or seen.context_length <= 1:
            return layer
        if type(layer) is not DenseLayer:
            raise UserError("kvmerge merges full-precision keys/values: put it before any quantization in the "
                            f"chain (e.g. kvmerge+kivi), not after (got a {type(layer).__name__}).")
        self._select.ratio = self.ratio  # this layer's (a --budget sets it per layer: methods/budget.py)
        kept = self._select.compress_layer(index_proxy(layer), seen).keys[..., 0].long()  # (B, H, K), ascending
        attention = seen.window_attention[..., : seen.context_length].sum(2)
        weights = align(group_mean(attention, seen.num_groups), layer, seen)  # per slot the layer holds now
        n = context_slots(layer, seen)
        layer.keys, layer.values = merge_evicted(layer.keys, layer.values, kept, weights, n, layer.valid)
        layer.select(kept)
        return layer
