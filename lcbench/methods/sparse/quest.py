"""Quest: query-aware selection of KV pages at decode time.

Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024
(arXiv:2406.10774). The stored keys are cut into pages of ``page_size`` tokens; each page keeps
the element-wise minimum and maximum of its keys. At every decode step a query scores each page
by the upper bound ``Σ_d max(q_d·min_d, q_d·max_d)`` of its dot product with any key of the page,
and attends only the top pages (the page holding the newest tokens always). The first
``dense_layers`` layers stay dense, as in the paper; the other layers' page budget is sized so the
density over all layers meets ``1 − ratio``. The full KV cache is kept (Quest saves memory
*traffic*, not memory). Selection is per query head; page bounds are per KV head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...params import Param
from ..base import Stage, keep_count
from ..presets import from_preset


def page_bounds(keys: torch.Tensor, valid: torch.Tensor | None, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise (min, max) of the valid keys of each page: keys (B, H, L, D) → (B, H, P, D) each;
    a page without a valid key gets (+inf, −inf)."""
    B, H, L, D = keys.shape
    P = math.ceil(L / page_size)
    pad = P * page_size - L
    k = keys.float()
    ok = torch.ones(B, H, L, dtype=torch.bool, device=keys.device) if valid is None else valid
    if pad:
        k = F.pad(k, (0, 0, 0, pad))
        ok = F.pad(ok, (0, pad), value=False)
    k = k.reshape(B, H, P, page_size, D)
    ok = ok.reshape(B, H, P, page_size, 1)
    return k.masked_fill(~ok, float("inf")).amin(3), k.masked_fill(~ok, float("-inf")).amax(3)


@from_preset("sparse_attention.toml")
class Quest(Stage):
    name = "quest"
    stages = ("prefill_attention", "decode")
    params = (
        Param("page_size", int, None, "tokens per KV page"),
        Param("dense_layers", int, None, "first layers that stay dense (the paper skips 2)"),
    )

    def begin_sample(self) -> None:
        self._selected = 0.0
        self._stored = 0.0
        self._planned: float | None = None
        self._bounds: dict[int, tuple] = {}

    # --- prefill: dense; learn the context length to state the density decoding will use -------
    def prefill_attention(self, module, query, key, value, mask, scaling, layer_idx):
        if query.shape[2] == key.shape[2] and layer_idx == 0:
            layers = module.config.num_hidden_layers
            self._planned = self._layer_keep(key.shape[2], layers, layer_idx=layers - 1)[1]
        return None

    def _sparse_share(self, layers: int) -> float:
        """Density each sparse layer must reach so the mean over all layers is ``1 − ratio``."""
        dense = min(self.args["dense_layers"], layers)
        if dense >= layers:
            return 1.0
        return max(0.0, ((1.0 - self.ratio) * layers - dense) / (layers - dense))

    def _layer_keep(self, length: int, layers: int, layer_idx: int) -> tuple[int, float]:
        """Pages to keep in a layer, and the mean density over all layers this budget gives."""
        pages = math.ceil(length / self.args["page_size"])
        share = self._sparse_share(layers)
        keep = keep_count(pages, 1.0 - share) if share < 1.0 else pages
        dense = min(self.args["dense_layers"], layers)
        return keep, (dense + (layers - dense) * keep / pages) / layers

    # --- decode -----------------------------------------------------------------------------
    def decode_attention(self, module, query, layer, scaling, layer_idx):
        if self.ratio <= 0 or layer_idx < self.args["dense_layers"]:
            self._count(layer, None)
            return None
        keys, values = layer.dense()
        B, Hkv, L, D = keys.shape
        Hq = query.shape[1]
        g = Hq // Hkv
        ps = self.args["page_size"]
        P = math.ceil(L / ps)
        keep, _ = self._layer_keep(L, module.config.num_hidden_layers, layer_idx)
        if keep >= P:
            self._count(layer, None)
            return None
        kmin, kmax = self._page_bounds(layer_idx, layer, keys, ps)
        q = query.float().reshape(B, Hkv, g, D)
        bound = torch.maximum(q[:, :, :, None, :] * kmin[:, :, None], q[:, :, :, None, :] * kmax[:, :, None]).sum(-1)
        empty = torch.isinf(kmin).all(-1)[:, :, None, :]  # (B, Hkv, 1, P): no valid key (bound is inf/nan)
        bound = bound.masked_fill(empty, float("-inf"))
        bound[..., P - 1] = float("inf")  # the newest page
        pages = bound.topk(keep, dim=-1).indices  # (B, Hkv, g, keep)
        slots = (pages[..., None] * ps + torch.arange(ps, device=keys.device)).reshape(B, Hkv, g * keep * ps)
        live = slots < L
        if layer.valid is not None:
            live = live & layer.valid.gather(2, slots.clamp(max=L - 1))
        slots = slots.clamp(max=L - 1)
        gather = slots[..., None].expand(-1, -1, -1, D)
        k_sel = keys.gather(2, gather).reshape(B, Hkv, g, keep * ps, D)
        v_sel = values.gather(2, gather).reshape(B, Hkv, g, keep * ps, D)
        live = live.reshape(B, Hkv, g, 1, keep * ps)
        out = F.scaled_dot_product_attention(query.reshape(B, Hkv, g, 1, D), k_sel, v_sel,
                                             attn_mask=live, scale=scaling)
        self._count(layer, live)
        return out.reshape(B, Hq, 1, D).transpose(1, 2)

    def _page_bounds(self, layer_idx: int, layer, keys: torch.Tensor, ps: int):
        """Page bounds of ``layer``, computed incrementally: full pages are reused while the stored
        prefix is unchanged (checked on the stored positions); only new pages are computed."""
        L = keys.shape[2]
        full = (L // ps) * ps
        cached = self._bounds.get(layer_idx)
        reuse = 0
        if cached is not None:
            done, positions, kmin, kmax = cached
            if done <= full and positions.shape[:2] == layer.positions.shape[:2] and \
                    torch.equal(positions, layer.positions[..., :done]):
                reuse = done
        valid = layer.valid
        if reuse:
            new_min, new_max = page_bounds(keys[:, :, reuse:], None if valid is None else valid[:, :, reuse:], ps)
            kmin, kmax = torch.cat([kmin, new_min], 2), torch.cat([kmax, new_max], 2)
        else:
            kmin, kmax = page_bounds(keys, valid, ps)
        n_full = full // ps
        self._bounds[layer_idx] = (full, layer.positions[..., :full].clone(), kmin[:, :, :n_full], kmax[:, :, :n_full])
        return kmin, kmax

    def _count(self, layer, live: torch.Tensor | None) -> None:
        """Accumulate attended and stored valid tokens (per row and query head)."""
        if not hasattr(self, "_stored"):
            self.begin_sample()
        stored = float(layer.kept_tokens().float().sum())
        self._stored += stored
        self._selected += stored if live is None else float(live.sum()) / live.shape[2]

    def sample_stats(self) -> dict[str, float]:
        if getattr(self, "_stored", 0.0):
            density = self._selected / self._stored
            return {"attention_density": density, "decode_attention_density": density}
        planned = getattr(self, "_planned", None)
        return {} if planned is None else {"attention_density": planned}
