"""Block-sparse causal attention that computes only the selected blocks (plain torch, CPU or GPU).

A :class:`BlockPattern` says, per batch row and KV head, which key blocks of ``block_size``
tokens each query block attends, plus optional single key columns (MInference's vertical
lines). The query heads of one KV head share its pattern, so the ``g`` query heads of a group are
stacked as ``g·block_size`` query rows over one gathered key set (GQA costs nothing extra).
Queries are processed one block at a time: the selected key blocks (and columns) are gathered
and attended with SDPA under the causal mask of the diagonal block, so the work done — and the
time — falls with the density. The result equals dense attention restricted to the pattern's
mask (:meth:`BlockPattern.dense_mask`) up to floating-point summation order.

MInference (Jiang et al., NeurIPS 2024, arXiv:2407.02490) computes its patterns with Triton
kernels over the same block/column structure; this is the portable equivalent. On CUDA the same
pattern runs as one compiled FlexAttention call with a block mask (:mod:`.flex`); the loop here is
the exact CPU path, and tests check the two against each other and against dense attention.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...engine.attention import softmax_attention


def chunk_pairs(length: int, chunk: int) -> float:
    """Causal (query ≥ key) pairs of positions 0 … ``length`` − 1 within chunks of ``chunk``
    positions: what a chunked-attention layer (Llama-4) computes densely."""
    full, rest = divmod(length, chunk)
    return float(full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2)


def dense_pairs(length: int, block_size: int, device=None, window: int | None = None,
                chunk: int | None = None) -> float:
    """Causal pairs a layer attends densely over ``length`` prefilled positions: within its chunks on
    a chunked layer, through its ``window`` on a sliding-window one (counted per block, as the block
    patterns count them), all of them otherwise — the total a sparse prefill's density is over."""
    if chunk is not None and chunk < length:
        return chunk_pairs(length, chunk)
    if window is not None and window < length:
        return float(causal_block_pairs(length, block_size, device, window).sum())
    return length * (length + 1) / 2


def causal_block_pairs(length: int, block_size: int, device=None, window: int | None = None) -> torch.Tensor:
    """(nb, nb) number of causal (query ≥ key) token pairs inside each block pair, counting only
    the ``length`` real tokens (the last block may be partial) — and, with a sliding ``window``,
    only the pairs it lets through (query − window < key ≤ query)."""
    nb = math.ceil(length / block_size)
    sizes = torch.full((nb,), block_size, dtype=torch.long, device=device)
    sizes[-1] = length - (nb - 1) * block_size
    if window is None or window >= length:
        pairs = sizes[:, None] * sizes[None, :]
        pairs = torch.tril(pairs, diagonal=-1)
        return pairs + torch.diag(sizes * (sizes + 1) // 2)
    return _window_block_pairs(length, block_size, window, str(device or "cpu")).clone()


@functools.lru_cache(maxsize=16)
def _window_block_pairs(length: int, bs: int, window: int, device: str) -> torch.Tensor:
    """:func:`causal_block_pairs` under a sliding window, from the pairs at each block distance δ:
    query offset a and key offset b of blocks δ apart are a pair iff 0 ≤ a − b + δ·bs < window."""
    nb = math.ceil(length / bs)
    last = length - (nb - 1) * bs
    reach = min(nb - 1, (window + bs - 1) // bs + 1)  # farther blocks hold no pair
    a = torch.arange(bs, device=device)[:, None]
    b = torch.arange(bs, device=device)[None, :]
    delta = torch.arange(reach + 1, device=device)[:, None, None]
    d = a - b + delta * bs
    inside = (d >= 0) & (d < window)  # (δ, a, b)
    full = inside.sum((1, 2))
    last_row = inside[:, :last].sum((1, 2))
    last_row[0] = inside[0, :last, :last].sum()
    pairs = torch.zeros(nb, nb, dtype=torch.long, device=device)
    rows = torch.arange(nb, device=device)
    for k in range(reach + 1):
        i = rows[k:]
        pairs[i, i - k] = full[k]
        pairs[nb - 1, nb - 1 - k] = last_row[k]
    return pairs


@dataclass
class BlockPattern:
    """Which (query block, key block) pairs and which key columns are computed.

    ``blocks`` (B, Hkv, nb, nb) bool, lower-triangular with the diagonal always set (every query
    sees at least itself); ``columns`` (B, Hkv, C) long key indices that every later query block
    also attends (MInference vertical lines), or None. ``window``: the layer's sliding window
    (slot index = true position in a prefill): pairs it hides are never computed nor counted,
    blocks wholly outside it are dropped, and density is over the pairs the window lets through.
    """

    blocks: torch.Tensor
    block_size: int
    length: int
    columns: torch.Tensor | None = None
    window: int | None = None

    def __post_init__(self):
        nb = self.blocks.shape[-1]
        eye = torch.eye(nb, dtype=torch.bool, device=self.blocks.device)
        allowed = torch.ones_like(eye).tril()
        if self.window is not None and self.window >= self.length:
            self.window = None
        if self.window is not None:
            allowed = causal_block_pairs(self.length, self.block_size, self.blocks.device, self.window) > 0
        self.blocks = (self.blocks & allowed) | eye

    def column_pairs(self) -> torch.Tensor:
        """(B, Hkv) pairs that the columns add beyond the selected blocks."""
        if self.columns is None or self.columns.shape[-1] == 0:
            return torch.zeros(self.blocks.shape[:2], dtype=torch.long, device=self.blocks.device)
        nb = self.blocks.shape[-1]
        bs = self.block_size
        rows = torch.full((nb,), bs, dtype=torch.long, device=self.blocks.device)
        rows[-1] = self.length - (nb - 1) * bs
        col_block = self.columns // bs  # (B, Hkv, C)
        covered = self.blocks.gather(3, col_block[:, :, None, :].expand(-1, -1, nb, -1))  # (B, Hkv, nb, C)
        later = torch.arange(nb, device=col_block.device)[:, None] > col_block[:, :, None, :]
        if self.window is None:
            return ((later & ~covered).long() * rows[:, None]).sum((2, 3))
        # under a window, only the query rows q ≤ c + window − 1 of a block see column c
        starts = (torch.arange(nb, device=col_block.device) * bs)[:, None]
        seen = (torch.minimum(starts + rows[:, None], self.columns[:, :, None, :] + self.window) - starts).clamp(min=0)
        seen = torch.minimum(seen, rows[:, None])  # (B, Hkv, nb, C)
        return ((later & ~covered).long() * seen).sum((2, 3))

    def pair_counts(self) -> tuple[torch.Tensor, int]:
        """Computed causal pairs per (row, KV head), and the total causal pairs of one head (those
        the window lets through, on a sliding-window layer)."""
        pairs = causal_block_pairs(self.length, self.block_size, self.blocks.device, self.window)
        computed = (self.blocks.long() * pairs).sum((2, 3)) + self.column_pairs()
        return computed, int(pairs.sum())

    def density(self) -> float:
        """Fraction of the causal (query, key) pairs that are computed."""
        computed, total = self.pair_counts()
        return float(computed.float().mean()) / total

    def dense_mask(self) -> torch.Tensor:
        """(B, Hkv, L, L) bool: the element mask the pattern computes (for checks; O(L²) memory)."""
        L, bs = self.length, self.block_size
        idx = torch.arange(L, device=self.blocks.device) // bs
        mask = self.blocks[:, :, idx][:, :, :, idx]
        if self.columns is not None:
            cols = torch.zeros(mask.shape[:2] + (L,), dtype=torch.bool, device=mask.device)
            cols.scatter_(2, self.columns, True)
            mask = mask | cols[:, :, None, :]
        mask = mask & torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
        if self.window is not None:
            mask = mask & ~torch.ones(L, L, dtype=torch.bool, device=mask.device).tril(-self.window)
        return mask


def block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           pattern: BlockPattern, scaling: float, softcap: float | None = None,
                           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of ``query`` (B, Hq, L, D) over ``key``/``value`` (B, Hkv, L, D) computing
    only ``pattern``; returns (B, L, Hq, D) like transformers' attention functions. ``softcap``
    (Gemma-2) caps the scaled logits, ``sinks`` (Hq,) (gpt-oss) adds each query head's learned sink
    column to the softmax, both as the models' eager attention does
    (:func:`lcbench.engine.attention.softmax_attention`). On CUDA it runs
    as compiled FlexAttention (:mod:`.flex`); ``LCBENCH_SPARSE_KERNEL=loop`` (or ``flex``) forces
    the exact loop below (or FlexAttention, uncompiled off CUDA) anywhere; a block size that is not
    a power of two ≥ 16 stays on the loop under ``auto``."""
    impl = os.environ.get("LCBENCH_SPARSE_KERNEL", "auto")
    bs = pattern.block_size
    tiles = bs >= 16 and bs & (bs - 1) == 0  # compiled FlexAttention (Triton) tiles: powers of two
    if impl == "flex" or (impl == "auto" and query.is_cuda and tiles):
        from . import flex

        if flex.available():
            return flex.flex_block_sparse_attention(query, key, value, pattern, scaling, softcap=softcap, sinks=sinks)
    return loop_block_sparse_attention(query, key, value, pattern, scaling, softcap=softcap, sinks=sinks)


def loop_block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                pattern: BlockPattern, scaling: float, softcap: float | None = None,
                                sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The exact path: one gathered SDPA call per query block (CPU, or anywhere on request); with a
    softcap or sinks, which SDPA cannot apply, the same gathered blocks on explicit logits."""
    B, Hq, L, D = query.shape
    Dv = value.shape[-1]  # MLA's values are narrower than its keys
    Hkv = key.shape[1]
    g = Hq // Hkv
    bs = pattern.block_size
    window = pattern.window  # None when it hides nothing (BlockPattern)
    nb = math.ceil(L / bs)
    pad = nb * bs - L
    if pad:  # padded keys lie after every real query, so the causal mask hides them
        query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
    kb = key.reshape(B, Hkv, nb, bs, D)
    vb = value.reshape(B, Hkv, nb, bs, Dv)
    qv = query.reshape(B, Hkv, g, nb * bs, D)
    out = query.new_empty(B, Hkv, g, nb * bs, Dv)
    counts = pattern.blocks.sum(-1)  # (B, Hkv, nb)
    order = pattern.blocks.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices  # selected first, ascending
    offs = torch.arange(bs, device=query.device)
    q_offs = offs.repeat(g)  # row r of a stacked group block is query offset r % bs
    diag_rows = q_offs[:, None] >= offs[None, :]  # (g·bs, bs) causal mask of the diagonal block
    bi = torch.arange(B, device=query.device)[:, None, None]
    hi = torch.arange(Hkv, device=query.device)[None, :, None]
    cols = pattern.columns if pattern.columns is not None and pattern.columns.shape[-1] else None
    if cols is not None:
        kc = key.gather(2, cols[..., None].expand(-1, -1, -1, D))
        vc = value.gather(2, cols[..., None].expand(-1, -1, -1, Dv))
        col_block = cols // bs
    # a stacked group block's row r belongs to query head (KV head · g + r // bs): its sink logit
    sink_rows = None if sinks is None else sinks.reshape(1, Hkv, g, 1, 1).expand(1, Hkv, g, bs, 1).reshape(1, Hkv, g * bs, 1)
    for i in range(nb):
        S = int(counts[:, :, i].max())
        idx = order[:, :, i, :S]  # (B, Hkv, S)
        padded = torch.arange(S, device=idx.device) >= counts[:, :, i, None]
        ks = kb[bi, hi, idx].reshape(B, Hkv, S * bs, D)
        vs = vb[bi, hi, idx].reshape(B, Hkv, S * bs, Dv)
        qg = qv[:, :, :, i * bs:(i + 1) * bs].reshape(B, Hkv, g * bs, D)
        if window is None and not bool(padded.any()) and bool((idx == idx[:1, :1]).all()):
            # one pattern for all heads; the diagonal block is the last one
            mask = torch.cat([diag_rows.new_ones(g * bs, (S - 1) * bs), diag_rows], dim=1)
        else:
            kpos = (idx[..., None] * bs + offs).reshape(B, Hkv, 1, S * bs)
            live = (~padded)[..., None].expand(-1, -1, -1, bs).reshape(B, Hkv, 1, S * bs)
            qpos = (i * bs + q_offs)[:, None]
            mask = (kpos <= qpos) & live
            if window is not None:
                mask = mask & (kpos > qpos - window)
        if cols is not None:
            seen = (cols < i * bs) & ~pattern.blocks[:, :, i].gather(2, col_block)
            if bool(seen.any()):
                ks = torch.cat([ks, kc], dim=2)
                vs = torch.cat([vs, vc], dim=2)
                col_mask = seen[:, :, None, :].expand(-1, -1, g * bs, -1)
                if window is not None:
                    col_mask = col_mask & (cols[:, :, None, :] > (i * bs + q_offs)[:, None] - window)
                mask = torch.cat([mask.expand(B, Hkv, g * bs, -1), col_mask], dim=-1)
        if softcap is None and sinks is None:
            o = F.scaled_dot_product_attention(qg, ks, vs, attn_mask=mask, scale=scaling)
        else:
            o = softmax_attention(qg, ks, vs, scaling, allowed=mask, softcap=softcap, sink_column=sink_rows)
        out[:, :, :, i * bs:(i + 1) * bs] = o.view(B, Hkv, g, bs, Dv)
    out = out[..., :L, :].reshape(B, Hq, L, Dv)
    return out.transpose(1, 2).contiguous()
