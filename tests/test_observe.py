"""Observations with bounded transients (issue #12): window attention and the full attention sum
computed per KV head on grouped queries, keys upcast in chunks and softmax in place — the same
numbers as the straightforward float32 computation over repeated keys, in float32 and bfloat16,
with and without padding, whatever the chunk sizes."""

import pytest
import torch
from transformers.integrations.sdpa_attention import repeat_kv

from lcbench.cache.layer import DenseLayer
from lcbench.engine import attention
from lcbench.methods.base import Needs


def _reference(query, key, valid, scaling, start, stop, L):
    """The former observation: repeated float32 keys, one masked softmax."""
    groups = query.shape[1] // key.shape[1]
    keys = repeat_kv(key, groups).float()
    q_len = query.shape[2]
    scores = query[:, :, start:stop].float() @ keys.transpose(-1, -2) * scaling
    rows = torch.arange(start, stop)[:, None] + (L - q_len)
    cols = torch.arange(L)[None, :]
    allowed = cols <= rows
    if valid is not None:
        allowed = allowed & (valid.repeat_interleave(groups, dim=1)[:, :, None, :] | (cols == rows))
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def _layer(key, valid):
    layer = DenseLayer()
    b, h, L, _ = key.shape
    layer.keys, layer.values = key, key
    layer.positions = torch.arange(L).expand(b, h, L).contiguous()
    layer.valid = valid
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
def test_observations_equal_the_repeated_float32_reference(monkeypatch, dtype, padded):
    monkeypatch.setattr(attention, "KEY_CHUNK", 37)  # several key chunks, a ragged last one
    monkeypatch.setattr(attention, "SOFTMAX_CHUNK_BYTES", 4 * 300)  # a few rows at a time
    monkeypatch.setattr(attention, "CHUNK_BYTES", 4 * 6 * 40 * 200)  # ~40 queries per H2O chunk
    torch.manual_seed(0)
    b, hkv, groups, L, d = 2, 2, 3, 200, 16
    query = torch.randn(b, hkv * groups, L, d).to(dtype)
    key = torch.randn(b, hkv, L, d).to(dtype)
    valid = None
    if padded:
        valid = torch.ones(b, hkv, L, dtype=torch.bool)
        valid[1, :, :30] = False  # a left-padded row
    seen = attention.observe(Needs(window=16, full_attention_sum=True), query, key, _layer(key, valid), groups,
                             0.25, 0, 1, 0)
    ref_window = _reference(query, key, valid, 0.25, L - 16, L, L)
    assert seen.window_attention.dtype == torch.float32
    assert torch.allclose(seen.window_attention, ref_window, atol=1e-6)
    ref_sum = _reference(query, key, valid, 0.25, 0, L, L).sum(2)
    assert torch.allclose(seen.attention_sum, ref_sum, atol=1e-4)


def test_query_chunk_bounds_the_scores_of_a_chunk():
    hq, L = 32, 131072
    n = attention.query_chunk(hq, L)
    assert 4 * hq * n * L <= attention.CHUNK_BYTES and n >= 1
    assert attention.query_chunk(9, 1000) == 512  # short contexts keep the usual 512
