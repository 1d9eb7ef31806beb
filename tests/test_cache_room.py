"""Appends into room kept after a layer's slots (lcbench/cache/room.py, issue #14): the held
values equal ``torch.cat`` at every step, a decode step copies no held slot, and no older view of
the slots is ever written over (crop, select, row copies)."""

from __future__ import annotations

import torch

from lcbench.cache.layer import DenseLayer
from lcbench.cache.quantized import QuantizedLayer, QuantSpec
from lcbench.cache.room import GROW, extend


def kv(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, tokens, 8, generator=gen), torch.randn(1, 2, tokens, 8, generator=gen)


def test_extend_equals_cat_and_reuses_its_storage():
    held, base = torch.randn(1, 2, 5, 8), None
    expected = held
    storages = set()
    for step in range(GROW + 10):
        new = torch.randn(1, 2, 1 + step % 3, 8)
        held, base = extend(held, base, new)
        expected = torch.cat([expected, new], dim=2)
        assert torch.equal(held, expected)
        storages.add(base.data_ptr())
    assert len(storages) <= 1 + (sum(1 + s % 3 for s in range(GROW + 10)) + 5) // GROW  # reallocated only when full


def test_dense_layer_appends_without_copying_what_it_holds():
    keys, values = kv(64)
    layer = DenseLayer()
    layer.append(keys[:, :, :40], values[:, :, :40], torch.arange(40)[None], None)
    layer.append(keys[:, :, 40:41], values[:, :, 40:41], torch.tensor([[40]]), None)  # allocates room
    ptr = layer.keys.data_ptr()
    for t in range(41, 64):
        layer.append(keys[:, :, t:t + 1], values[:, :, t:t + 1], torch.tensor([[t]]), None)
        assert layer.keys.data_ptr() == ptr  # written into the room, no copy
    assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    assert torch.equal(layer.positions[0, 0], torch.arange(64))
    assert layer.nbytes() == 2 * keys.numel() * 4  # the held slots, not the room


def test_an_older_view_is_never_written_over():
    keys, values = kv(50)
    layer = DenseLayer()
    layer.append(keys[:, :, :30], values[:, :, :30], torch.arange(30)[None], None)
    layer.append(keys[:, :, 30:31], values[:, :, 30:31], torch.tensor([[30]]), None)
    seen, _ = layer.dense()  # e.g. a turn's view of the context, 31 slots
    before = seen.clone()
    layer.crop_to(20)  # forget an answer, then append another one
    layer.append(keys[:, :, 40:50], values[:, :, 40:50], torch.arange(40, 50)[None], None)
    assert torch.equal(seen, before)
    assert torch.equal(layer.keys, torch.cat([keys[:, :, :20], keys[:, :, 40:50]], dim=2))
    copy = layer.repeat_rows(2)  # a row copy grows on its own storage
    copy.append(keys[:, :, :2].repeat(2, 1, 1, 1), values[:, :, :2].repeat(2, 1, 1, 1),
                torch.tensor([[0, 1], [0, 1]]), None)
    layer.append(keys[:, :, 2:4], values[:, :, 2:4], torch.tensor([[2, 3]]), None)
    assert torch.equal(copy.keys[0, :, 30:], keys[0, :, :2]) and torch.equal(layer.keys[0, :, 30:], keys[0, :, 2:4])


def test_quantized_layer_buffer_grows_in_place_and_a_crop_keeps_old_views():
    keys, values = kv(120)
    layer = QuantizedLayer.from_dense(keys[:, :, :64], values[:, :, :64], torch.arange(64).expand(1, 2, 64), None,
                                      QuantSpec(4, "token", 8, 16))
    layer.append(keys[:, :, 64:65], values[:, :, 64:65], torch.tensor([[64]]), None)
    ptr = layer.dkeys.data_ptr()
    for t in range(65, 100):
        layer.append(keys[:, :, t:t + 1], values[:, :, t:t + 1], torch.tensor([[t]]), None)
    assert layer.dkeys.data_ptr() == ptr
    seen = layer.dense()[0].clone()
    view = layer.dense()[0]
    layer.crop_to(90)
    layer.append(keys[:, :, 100:120], values[:, :, 100:120], torch.arange(100, 120)[None], None)
    assert torch.equal(view, seen)
    assert torch.equal(layer.positions[0, 0], torch.cat([torch.arange(90), torch.arange(100, 120)]))
