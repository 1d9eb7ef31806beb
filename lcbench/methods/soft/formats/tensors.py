"""Read single named tensors from a transformers checkpoint folder without loading the model:
``model.safetensors`` / ``model.safetensors.index.json`` shards (safetensors' lazy ``safe_open``)
or ``pytorch_model.bin`` / its index (``torch.load(mmap=True)``), the layouts ``save_pretrained``
writes."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _shard_of(folder: Path, name: str) -> Path | None:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / index).is_file():
            shard = json.loads((folder / index).read_text()).get("weight_map", {}).get(name)
            return folder / shard if shard else None
        if (folder / single).is_file():
            return folder / single
    return None


def read_tensor(folder: Path, name: str) -> torch.Tensor | None:
    """The checkpoint's tensor ``name``, or None when the folder has no such tensor (or no weights)."""
    shard = _shard_of(folder, name)
    if shard is None or not shard.is_file():
        return None
    if shard.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as f:
            return f.get_tensor(name) if name in f.keys() else None
    return torch.load(shard, map_location="cpu", mmap=True, weights_only=True).get(name)


def same_weights(model, folder: Path, name: str) -> bool:
    """Whether the target model's parameter ``name`` equals the checkpoint's (True when either
    side lacks it: nothing to compare)."""
    theirs = read_tensor(folder, name)
    ours = dict(model.named_parameters()).get(name)
    if theirs is None or ours is None:
        return True
    return ours.shape == theirs.shape and torch.allclose(ours.float().cpu(), theirs.float(), atol=1e-2, rtol=1e-2)
