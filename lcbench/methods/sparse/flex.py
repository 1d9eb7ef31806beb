"""The block-sparse kernel on torch's FlexAttention (``torch.nn.attention.flex_attention``).

A :class:`~.kernel.BlockPattern` becomes a FlexAttention ``BlockMask`` with lcbench's block size:
selected off-diagonal blocks are *full* blocks (no per-element mask), the diagonal blocks, the blocks
holding vertical columns (for the later query blocks that do not select them) and, on a sliding-window
layer, every block are *partial* blocks whose elements the ``mask_mod`` decides (causal, the
pattern's blocks and columns, the window, padding). FlexAttention then computes only the listed
blocks. On CUDA it is compiled (``torch.compile``: one fused kernel per layer instead of the exact
path's loop of per-block SDPA calls, issue #14); elsewhere the exact loop of :mod:`.kernel` runs, and
the uncompiled FlexAttention (an unfused reference that evaluates the mask densely) is what the CPU
tests compare against it.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .kernel import BlockPattern


def available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def block_mask(pattern: BlockPattern, query_heads: int):
    """The FlexAttention ``BlockMask`` computing exactly ``pattern`` for ``query_heads`` query
    heads (the pattern is per KV head; query head h uses KV head h // groups)."""
    from torch.nn.attention.flex_attention import BlockMask

    blocks = pattern.blocks
    B, Hkv, nb, _ = blocks.shape
    g = query_heads // Hkv
    bs, L, window = pattern.block_size, pattern.length, pattern.window
    device = blocks.device
    n = nb * bs
    i = torch.arange(nb, device=device)[:, None]
    j = torch.arange(nb, device=device)[None, :]
    is_col = torch.zeros(B, Hkv, n, dtype=torch.bool, device=device)
    col_blocks = torch.zeros_like(blocks)
    if pattern.columns is not None and pattern.columns.shape[-1]:
        is_col.scatter_(2, pattern.columns, True)
        has_col = is_col.reshape(B, Hkv, n // bs, bs).any(-1)  # (B, Hkv, nb) key blocks holding a column
        col_blocks = has_col[:, :, None, :] & (j < i)
    partial = (blocks & (i == j)) | (col_blocks & ~blocks)
    full = blocks & (i != j)
    if window is not None:
        partial, full = partial | full, torch.zeros_like(full)

    def listing(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = mask.repeat_interleave(g, dim=1)
        count = mask.sum(-1).to(torch.int32)
        order = mask.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices.to(torch.int32)
        return count, order

    sel = blocks

    def mask_mod(b, h, q_idx, kv_idx):
        kvh = h // g
        keep = sel[b, kvh, q_idx // bs, kv_idx // bs] | is_col[b, kvh, kv_idx]
        keep = keep & (kv_idx <= q_idx) & (kv_idx < L)
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        return keep

    kv_num, kv_idx = listing(partial)
    full_num, full_idx = listing(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=mask_mod,
                                    seq_lengths=(n, n))


def flex_block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                pattern: BlockPattern, scaling: float, compiled: bool | None = None,
                                softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of ``query`` (B, Hq, L, D) over ``key``/``value`` (B, Hkv, L, D) computing
    only ``pattern`` with FlexAttention; (B, L, Hq, D) like :func:`.kernel.block_sparse_attention`.
    ``compiled``: compile it (default: on CUDA only). ``softcap`` is a ``score_mod`` on the scaled
    logits; ``sinks`` (Hq,) rescale each output by ``Z / (Z + e^s)`` = ``sigmoid(lse − s)`` from the
    kernel's log-sum-exp ``lse`` = log Z — exactly the extra softmax column that is then dropped."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    B, Hq, L, D = query.shape
    bs = pattern.block_size
    pad = math.ceil(L / bs) * bs - L
    if pad:  # padded keys lie after every real query (the mask hides them); padded rows are cut
        query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
    mask = block_mask(pattern, Hq)
    compiled = query.is_cuda if compiled is None else compiled
    run = _compiled() if compiled else flex_attention
    # the compiled kernel's tiles must divide the mask's blocks (its defaults are 128 or 64)
    options = {"BLOCK_M": min(bs, 64), "BLOCK_N": min(bs, 64)} if compiled else None
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / softcap) * softcap
    if sinks is None:
        out = run(query, key, value, score_mod=score_mod, block_mask=mask, scale=scaling,
                  enable_gqa=key.shape[1] != Hq, kernel_options=options)
    else:
        out, aux = run(query, key, value, score_mod=score_mod, block_mask=mask, scale=scaling,
                       enable_gqa=key.shape[1] != Hq, kernel_options=options, return_aux=AuxRequest(lse=True))
        keep = torch.sigmoid(aux.lse.float() - sinks.float().reshape(1, Hq, 1))  # (B, Hq, L)
        out = (out.float() * keep[..., None]).to(query.dtype)
    return out[:, :, :L].transpose(1, 2).contiguous()
