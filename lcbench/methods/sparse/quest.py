"""Quest: query-aware selection of KV pages at decode time.

Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024
(arXiv:2406.10774). The stored keys are cut into pages of ``page_size`` tokens; each page keeps
the element-wise minimum and maximum of its keys. At every decode step a query scores each page
by the upper bound ``Σ_d max(q_d·min_d, q_d·max_d)`` of its dot product with any key of the page,
and attends only the top pages (the page holding the newest tokens always). The first
``dense_layers`` layers stay dense, as in the paper; the other layers' page budget is sized so the
density over all layers meets ``1 − ratio``. The full KV cache is kept (Quest saves memory
*traffic*, not memory). With grouped-query attention a page is selected per KV head, by the
largest bound among the query heads of its group (one gather serves the whole group).

Pages are cut over a row's own tokens: when the turns of a sample decode together, a row whose
question part was left-padded holds padding slots between its context and its question, which
would shift its pages (and its budget) against decoding alone; so a batch of rows is paged row by
row over each row's valid slots in storage order, and every row selects (and computes) what it
would alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...cache.layer import DenseLayer, lowest_visible
from ...engine.attention import AttentionCall, dense_attention, softmax_attention, storage_mask
from ...params import Param
from ..base import Stage


def rows_apart(layer) -> list[DenseLayer] | None:
    """Each row of ``layer`` as a one-row layer of its valid slots only (storage order kept), so a
    row is paged — and computed — exactly as it would be alone (also the last row of a batch, which
    still holds its padding); None for one row without padding, or when validity differs across
    heads (ragged storage, not a padded batch)."""
    valid = layer.valid
    if layer.positions.shape[0] < 2 and (valid is None or bool(valid.all())):
        return None
    if valid is not None and not torch.equal(valid.all(1), valid.any(1)):
        return None
    keys, values = layer.dense()
    out = []
    for b in range(layer.positions.shape[0]):
        keep = (torch.arange(layer.positions.shape[-1], device=layer.positions.device) if valid is None
                else valid[b, 0].nonzero().squeeze(-1))
        row = DenseLayer()
        row.keys, row.values = keys[b:b + 1, :, keep], values[b:b + 1, :, keep]
        row.positions = layer.positions[b:b + 1, :, keep]
        row.is_initialized = True
        out.append(row)
    return out


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


def _dense_row(module, query: torch.Tensor, row: DenseLayer, call: AttentionCall) -> torch.Tensor:
    """One row's dense decode attention over its valid slots, computed as the engine computes it
    for that row alone (its storage mask and dense function, the model's softcap and sinks), so a
    row that attends densely this step matches decoding alone."""
    keys, values = row.dense()
    return dense_attention(module, query, keys, values, storage_mask(row, 1, call.window, call.chunk), call.scaling,
                           call)


class Quest(Stage):
    name = "quest"
    family = "sparse_attention"
    paper = ("Tang et al., Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference, ICML "
             "2024 (arXiv:2406.10774)")
    summary = "decode attends the KV pages with the highest query-key upper bounds"
    # reference: page bounds, top-k and a gather in PyTorch at every decode step (rows of a padded batch one by
    # one), not Quest's fused CUDA kernels
    reference_latency = True
    tolerance = 0.05
    defaults = {"page_size": 16, "dense_layers": 2}
    stages = ("prefill_attention", "decode")
    # the picked pages are attended with the model's softcap and sinks (the page bounds rank plain q·k
    # upper bounds: a softcap is monotonic, so the same pages win); on a chunked layer the pages of the
    # query's chunk compete, as the pages a sliding window reaches do
    attention_terms = frozenset({"softcap", "sinks", "chunk"})
    params = (
        Param("page_size", int, None, "tokens per KV page", min=1),
        Param("dense_layers", int, None, "first layers that stay dense (the paper skips 2)", min=0),
    )

    def begin_sample(self) -> None:
        self._selected = 0.0
        self._stored = 0.0
        self._planned: float | None = None
        self._bounds: dict[int, tuple] = {}

    # --- prefill: dense; learn the context length to state the density decoding will use -------
    def prefill_attention(self, module, query, key, value, mask, scaling, layer_idx, window=None, **terms):
        if query.shape[2] == key.shape[2] and getattr(self, "_planned", None) is None:  # the first attention layer
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
        keep = max(1, int(pages * share))  # at most the target, like the prefill patterns
        dense = min(self.args["dense_layers"], layers)
        return keep, (dense + (layers - dense) * keep / pages) / layers

    # --- decode -----------------------------------------------------------------------------
    def decode_attention(self, module, query, layer, scaling, layer_idx, window=None, softcap=None, sinks=None,
                         chunk=None):
        """On a sliding-window layer only the pages the window reaches compete, keys it hides are
        masked, and the density counts only the tokens the window lets the query see. A batch
        whose rows hold padding is paged row by row (:func:`rows_apart`). ``softcap`` / ``sinks``:
        the model's, applied to the picked pages."""
        call = AttentionCall(scaling, window=window, chunk=chunk, softcap=softcap, sinks=sinks)
        rows = None if self.ratio <= 0 or layer_idx < self.args["dense_layers"] else rows_apart(layer)
        if rows is None:
            return self._decode_pages(module, query, layer, call, layer_idx, layer_idx)
        outs = [self._decode_pages(module, query[b:b + 1], row, call, None, layer_idx) for b, row in enumerate(rows)]
        return torch.cat([_dense_row(module, query[b:b + 1], row, call) if out is None else out
                          for b, (row, out) in enumerate(zip(rows, outs))], dim=0)

    def _decode_pages(self, module, query, layer, call: AttentionCall, cache_key, layer_idx: int):
        """Quest's page selection on ``layer`` (None: dense this step), within what ``call``'s window or
        chunk lets the query see; ``cache_key`` keys the incremental page bounds (None when paged row
        by row: rows leave the batch, so a row index names no row for long; its bounds are computed
        afresh)."""
        visible = None
        if call.window or call.chunk:
            visible = layer.positions >= lowest_visible(layer.positions[..., -1:], call.window, call.chunk)
            if layer.valid is not None:
                visible = visible & layer.valid
            if bool(visible.all()):
                visible = None
        if self.ratio <= 0 or layer_idx < self.args["dense_layers"]:
            self._count(layer, None, visible)
            return None
        keys, values = layer.dense()
        B, Hkv, L, D = keys.shape
        Hq = query.shape[1]
        g = Hq // Hkv
        ps = self.args["page_size"]
        P = math.ceil(L / ps)
        seeable = L if visible is None else int(visible.sum(-1).max())  # the budget: what the window shows
        keep, _ = self._layer_keep(seeable, module.config.num_hidden_layers, layer_idx)
        if keep >= P:
            self._count(layer, None, visible)
            return None
        full = (L // ps) * ps  # whole pages; a partial newest page is always attended
        pick = keep - (1 if L > full else 0)
        kmin, kmax = self._page_bounds(cache_key, layer, keys, ps)
        q = query.float().reshape(B, Hkv, g, 1, D)
        bound = torch.maximum(q * kmin[:, :, None], q * kmax[:, :, None]).sum(-1).amax(2)  # (B, Hkv, P_full)
        if layer.valid is not None:
            bound = bound.masked_fill(torch.isinf(kmin).all(-1), float("-inf"))  # pages with no valid key
        if visible is not None:  # pages wholly outside the window
            bound = bound.masked_fill(~visible[..., :full].reshape(B, Hkv, full // ps, ps).any(-1), float("-inf"))
        if L == full:
            bound[..., -1] = float("inf")  # the newest page
        pages = bound.topk(pick, dim=-1).indices  # (B, Hkv, pick)
        bi = torch.arange(B, device=keys.device)[:, None, None]
        hi = torch.arange(Hkv, device=keys.device)[None, :, None]

        def take(t: torch.Tensor) -> torch.Tensor:  # the picked whole pages, then the partial page
            paged = t[:, :, :full].reshape(B, Hkv, full // ps, ps, *t.shape[3:])[bi, hi, pages]
            return torch.cat([paged.reshape(B, Hkv, pick * ps, *t.shape[3:]), t[:, :, full:]], dim=2)

        k_sel, v_sel = take(keys), take(values)
        live = None if layer.valid is None else take(layer.valid)
        if visible is not None:
            live = take(visible)
        allowed = None if live is None else live[:, :, None, :]
        if call.softcap is None and call.sinks is None:
            out = F.scaled_dot_product_attention(query.reshape(B, Hkv, g, D), k_sel, v_sel, attn_mask=allowed,
                                                 scale=call.scaling)
        else:  # query head h·g + i is row i of KV head h
            sink_column = None if call.sinks is None else call.sinks.reshape(1, Hkv, g, 1)
            out = softmax_attention(query.reshape(B, Hkv, g, D), k_sel, v_sel, call.scaling, allowed=allowed,
                                    softcap=call.softcap, sink_column=sink_column)
        self._count(layer, float(B * Hkv * k_sel.shape[2]) if live is None else float(live.sum()), visible)
        return out.reshape(B, Hq, 1, D).transpose(1, 2)

    def _page_bounds(self, key, layer, keys: torch.Tensor, ps: int):
        """Bounds of the whole pages of ``layer``, computed incrementally: pages are reused while the
        stored prefix is unchanged (checked on the stored positions); only new pages are computed."""
        full = (keys.shape[2] // ps) * ps
        if key is None:
            return page_bounds(keys[:, :, :full], None if layer.valid is None else layer.valid[:, :, :full], ps)
        cached = self._bounds.get(key)
        reuse = 0
        if cached is not None:
            done, positions, kmin, kmax = cached
            if done <= full and positions.shape[:2] == layer.positions.shape[:2] and \
                    torch.equal(positions, layer.positions[..., :done]):
                reuse = done
        valid = None if layer.valid is None else layer.valid[:, :, reuse:full]
        new_min, new_max = page_bounds(keys[:, :, reuse:full], valid, ps)
        if reuse:
            new_min, new_max = torch.cat([kmin, new_min], 2), torch.cat([kmax, new_max], 2)
        self._bounds[key] = (full, layer.positions[..., :full].clone(), new_min, new_max)
        return new_min, new_max

    def _count(self, layer, attended: float | None, visible: torch.Tensor | None = None) -> None:
        """Accumulate attended and stored valid tokens (those the window lets the query see, when
        ``visible`` is given), summed over rows and KV heads (None: all)."""
        if not hasattr(self, "_stored"):
            self.begin_sample()
        stored = float(layer.kept_tokens().float().sum()) if visible is None else float(visible.sum())
        self._stored += stored
        self._selected += stored if attended is None else attended

    def sample_stats(self) -> dict[str, float]:
        if getattr(self, "_stored", 0.0):
            density = self._selected / self._stored
            return {"attention_density": density, "decode_attention_density": density}
        planned = getattr(self, "_planned", None)
        return {} if planned is None else {"attention_density": planned}
