"""The FlexAttention path of the block-sparse kernel (issue #14): its BlockMask lists exactly the
pattern's blocks, and uncompiled FlexAttention on the CPU equals the exact loop path (and dense
attention restricted to the pattern) for blocks, vertical columns, sliding windows, GQA and a
partial last block. The compiled CUDA path is not exercised here (no GPU)."""

from __future__ import annotations

import pytest
import torch

from lcbench.methods.sparse import flex
from lcbench.methods.sparse.kernel import BlockPattern, block_sparse_attention, loop_block_sparse_attention
from test_sparse import qkv, reference, stage

pytestmark = [pytest.mark.skipif(not flex.available(), reason="this torch has no torch.nn.attention.flex_attention (added in torch 2.5); the exact loop path is tested in test_sparse.py"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def random_pattern(L=70, B=2, window=None, columns=True, seed=1):
    gen = torch.Generator().manual_seed(seed)
    nb = -(-L // 16)
    blocks = torch.rand(B, 2, nb, nb, generator=gen) < 0.4
    cols = torch.stack([torch.randperm(L, generator=gen)[:6].sort().values for _ in range(B * 2)]).view(B, 2, 6)
    return BlockPattern(blocks, 16, L, cols if columns else None, window=window)


@pytest.mark.parametrize("columns", [False, True])
@pytest.mark.parametrize("window", [None, 20])
def test_flex_equals_the_loop_path_on_the_same_blocks(columns, window):
    q, k, v = qkv(L=70, B=2)
    pattern = random_pattern(window=window, columns=columns)
    loop = loop_block_sparse_attention(q, k, v, pattern, 0.3)
    out = flex.flex_block_sparse_attention(q, k, v, pattern, 0.3, compiled=False)
    assert torch.allclose(out, loop, atol=1e-5)
    assert torch.allclose(out, reference(q, k, v, pattern.dense_mask(), 0.3), atol=1e-5)


def test_block_mask_lists_exactly_the_pattern_blocks():
    pattern = random_pattern(L=64, columns=True)
    mask = flex.block_mask(pattern, query_heads=4)
    listed = mask.to_dense().bool()  # (B, Hq, nb, nb): partial and full blocks together
    cols = torch.zeros(2, 2, 64, dtype=torch.bool).scatter_(2, pattern.columns, True).reshape(2, 2, 4, 16).any(-1)
    later = torch.arange(4)[None, :] < torch.arange(4)[:, None]
    want = pattern.blocks | (cols[:, :, None, :] & later)
    assert torch.equal(listed, want.repeat_interleave(2, dim=1))


def test_env_switch_routes_the_kernel_through_flex(monkeypatch):
    q, k, v = qkv(L=1024)
    pattern = stage("block_topk", 0.7, "block_size=16").pattern(q, k, 2, 0.25)
    monkeypatch.setenv("LCBENCH_SPARSE_KERNEL", "flex")
    called = []
    real = flex.flex_block_sparse_attention
    monkeypatch.setattr(flex, "flex_block_sparse_attention", lambda *a, **kw: called.append(1) or real(*a, **kw))
    out = block_sparse_attention(q, k, v, pattern, 0.25)
    assert called and torch.allclose(out, loop_block_sparse_attention(q, k, v, pattern, 0.25), atol=1e-5)
    monkeypatch.setenv("LCBENCH_SPARSE_KERNEL", "auto")  # on the CPU, auto is the exact loop
    called.clear()
    block_sparse_attention(q, k, v, pattern, 0.25)
    assert not called


@pytest.mark.parametrize("window", [None, 20])
def test_full_blocks_need_no_mask_and_the_mask_mod_is_the_pattern(window):
    """What a compiled kernel relies on: ``full`` blocks are wholly inside the pattern (it skips
    their mask_mod), and the mask_mod evaluated densely is the pattern's element mask."""
    from torch.nn.attention.flex_attention import create_mask

    pattern = random_pattern(L=64, columns=True, window=window)
    mask = flex.block_mask(pattern, query_heads=4)
    element = create_mask(mask.mask_mod, 2, 4, 64, 64, device="cpu")
    assert torch.equal(element, pattern.dense_mask().repeat_interleave(2, dim=1))
    if mask.full_kv_num_blocks is not None:
        full = torch.zeros(2, 4, 4, 4, dtype=torch.bool)
        for b in range(2):
            for h in range(4):
                for i in range(4):
                    for t in range(int(mask.full_kv_num_blocks[b, h, i])):
                        full[b, h, i, int(mask.full_kv_indices[b, h, i, t])] = True
        tiles = element.reshape(2, 4, 4, 16, 4, 16).all(3).all(-1)
        assert bool(tiles[full].all())
        assert window is None or not bool(full.any())
