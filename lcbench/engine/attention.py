"""lcbench's attention function, registered with transformers' ``AttentionInterface``.

The model's own attention modules project q/k/v, apply rotary embeddings and call
``KVCache.update``; then they call this function, which

1. builds the mask from what *this layer* holds (storage order, padding/ragged validity), so
   layers may keep different numbers of tokens under plain SDPA;
2. lets a sparse-attention stage replace the computation (prefill or decode);
3. on the compressing pass, collects what the cache stages asked for (window attention, ...)
   and runs them on this layer right away — before the next layer runs, so the full cache of
   all layers never exists at once;
4. in decode, lets decode stages evict after the step.

No model forward code is copied: any transformers model whose attention goes through
``ALL_ATTENTION_FUNCTIONS`` works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from ..cache.layer import KVLayer
from ..methods.base import LayerObservation, Needs
from .state import DECODE, ForwardState

ATTENTION_NAME = "lcbench"


def storage_mask(layer: KVLayer, q_len: int) -> torch.Tensor | None:
    """Boolean (B, 1 or H, q, L) mask: the ``q_len`` newest stored tokens are the queries; each
    sees every valid older token and the new ones up to itself. ``None`` when plain causal
    attention is exactly right (what transformers' SDPA path does), to keep its numerics."""
    L = layer.seq_len()
    if layer.valid is None and (q_len == 1 or q_len == L):
        return None
    device = layer.positions.device
    rows = torch.arange(q_len, device=device)[:, None] + (L - q_len)
    cols = torch.arange(L, device=device)[None, :]
    causal = cols <= rows  # (q, L)
    if layer.valid is None:
        return causal[None, None]
    own = cols == rows  # a padded query still sees itself: no all-masked rows (NaN)
    valid = layer.valid[:, :, None, :]  # (B, H, 1, L)
    mask = causal & (valid | own)
    if bool((layer.valid == layer.valid[:, :1]).all()):
        mask = mask[:, :1]
    return mask


DENSE_IMPLEMENTATIONS = ("sdpa", "eager")


def dense_attention(module, query, key, value, mask, scaling):
    """Exact attention over what the layer holds; per-KV-head masks expand to the query heads.

    The computation is torch SDPA (transformers' ``sdpa`` path, for identical numerics), or the
    explicit softmax of transformers' ``eager`` path when the model was loaded with
    ``attn_implementation=eager`` (recorded on the config as ``lcbench_dense_attention``)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if getattr(getattr(module, "config", None), "lcbench_dense_attention", "sdpa") == "eager":
        keys, values = repeat_kv(key, groups), repeat_kv(value, groups)
        scores = query @ keys.transpose(-1, -2) * scaling
        if mask is not None:
            scores = scores.masked_fill(~mask.repeat_interleave(groups, dim=1) if mask.shape[1] > 1 else ~mask,
                                        float("-inf"))
        elif query.shape[2] > 1:
            L, q = keys.shape[2], query.shape[2]
            causal = torch.arange(L, device=query.device)[None, :] <= torch.arange(L - q, L, device=query.device)[:, None]
            scores = scores.masked_fill(~causal, float("-inf"))
        probs = scores.softmax(-1, dtype=torch.float32).to(query.dtype)
        return (probs @ values).transpose(1, 2).contiguous()
    if mask is not None and mask.shape[1] > 1:
        mask = mask.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(query, repeat_kv(key, groups), repeat_kv(value, groups),
                                             attn_mask=mask, scale=scaling)
        return out.transpose(1, 2).contiguous()
    out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=scaling)
    return out


def observe(needs: Needs, query, key, layer: KVLayer, groups: int, scaling: float,
            layer_idx: int, num_layers: int, protected: int, module=None) -> LayerObservation:
    """Collect what the cache stages need from this layer's compressing pass."""
    L = layer.seq_len()
    q_len = query.shape[2]
    seen = LayerObservation(layer_idx=layer_idx, num_layers=num_layers, num_groups=groups,
                            context_length=L - protected, protected=protected, module=module,
                            positions=layer.positions[:, 0])
    if needs.queries:
        seen.queries = query
    if needs.window or needs.full_attention_sum:
        keys = repeat_kv(key, groups).float()
        valid = None if layer.valid is None else layer.valid.repeat_interleave(groups, dim=1)

        def probs(start: int, stop: int, width: int = L) -> torch.Tensor:
            """Attention of queries ``start:stop`` over the first ``width`` keys (the keys after
            the last of these queries are causally masked: leaving them out changes nothing)."""
            q = query[:, :, start:stop].float()
            scores = q @ keys[:, :, :width].transpose(-1, -2) * scaling  # (B, Hq, n, width)
            rows = torch.arange(start, stop, device=q.device)[:, None] + (L - q_len)
            cols = torch.arange(width, device=q.device)[None, :]
            allowed = cols <= rows
            if valid is not None:
                allowed = allowed & (valid[:, :, None, :width] | (cols == rows))
            return scores.masked_fill(~allowed, float("-inf")).softmax(-1)

        if needs.window:
            w = min(needs.window, q_len)
            seen.window_attention = probs(q_len - w, q_len)
            if needs.window_queries:
                seen.window_queries = query[:, :, q_len - w:]
        if needs.full_attention_sum:
            seen.attention_sum = (attention_sum(query, key, groups, scaling, L) if valid is None else
                                  sum_in_chunks(probs, query.shape[:2], L, q_len, query.device))
    elif needs.window_queries:
        seen.window_queries = query[:, :, max(0, q_len - 1):]
    return seen


def sum_in_chunks(probs, batch_heads, L: int, q_len: int, device, chunk: int = 512) -> torch.Tensor:
    """(B, Hq, L): attention each key received, summed over the queries, ``chunk`` queries at a time."""
    total = torch.zeros(*batch_heads, L, device=device)
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        width = L - q_len + stop
        total[..., :width] += probs(start, stop, width).sum(2)
    return total


def attention_sum(query, key, groups: int, scaling: float, L: int, chunk: int = 512) -> torch.Tensor:
    """:func:`sum_in_chunks` for a layer without padding, computed per KV head on the grouped
    queries (no repeated keys) and masking only each chunk's own diagonal block: same numbers,
    about half the time (H2O needs every query's attention, which SDPA does not return)."""
    b, hq, q_len, d = query.shape
    hkv = hq // groups
    keys_t = key.float().transpose(-1, -2)  # (B, Hkv, D, L)
    total = torch.zeros(b, hkv, groups, L, device=query.device)
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        n, width = stop - start, L - q_len + stop
        q = query[:, :, start:stop].float().reshape(b, hkv, groups * n, d)
        scores = torch.matmul(q, keys_t[..., :width]).mul_(scaling).view(b, hkv, groups, n, width)
        future = torch.ones(n, n, dtype=torch.bool, device=query.device).triu_(1)
        scores[..., width - n:].masked_fill_(future, float("-inf"))
        total[..., :width] += scores.softmax(-1).sum(3)
    return total.reshape(b, hq, L)


def lcbench_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The function transformers calls per layer when ``attn_implementation="lcbench"``. Its
    signature is ``sdpa_attention_forward``'s (``dropout`` before ``scaling``), which wrappers of
    registered attention functions (kvpress patches every one on import) pass positionally."""
    state: ForwardState | None = kwargs.get("lcbench_state")
    if state is None:  # the model used outside lcbench's engine: behave as plain SDPA
        q_len, kv_len = query.shape[2], key.shape[2]
        if attention_mask is None and 1 < q_len < kv_len:
            # transformers makes no mask for a custom attention name, and SDPA's is_causal aligns
            # top-left: queries appended to a cache (chunked prefill) need the bottom-right causal mask
            rows = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
            attention_mask = (torch.arange(kv_len, device=query.device)[None, :] <= rows)[None, None]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling)
    idx = module.layer_idx
    cache = state.cache
    layer = cache.layers[idx]
    q_len = query.shape[2]
    mask = storage_mask(layer, q_len)

    out = None
    if state.phase == DECODE:
        for stage in state.decode_stages:
            out = stage.decode_attention(module, query, layer, scaling, idx)
            if out is not None:
                break
    else:
        for stage in state.attention_stages:
            out = stage.prefill_attention(module, query, key, value, mask, scaling, idx)
            if out is not None:
                break
    if out is None:
        out = dense_attention(module, query, key, value, mask, scaling)

    if state.compressing and state.cache_stages:
        start = state.timer.now()
        groups = getattr(module, "num_key_value_groups", 1)
        seen = observe(state.needs, query, key, layer, groups, scaling, idx, len(cache.layers),
                       state.protected, module=module)
        for stage in state.cache_stages:
            layer = stage.compress_layer(layer, seen)
        cache.layers[idx] = layer
        state.compress_seconds += state.timer.now() - start
    elif state.phase == DECODE and state.decode_stages:
        for stage in state.decode_stages:
            layer = stage.after_decode_step(layer, idx, query)
        cache.layers[idx] = layer
    return out, None


AttentionInterface.register(ATTENTION_NAME, lcbench_attention)
