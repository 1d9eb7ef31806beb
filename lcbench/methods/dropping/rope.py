"""Rotary position embeddings seen from a cache stage.

The cache holds keys *after* RoPE and the engine observes queries after RoPE. Methods that
reason about pre-rotary vectors (Expected Attention's query statistics, Compactor's leverage
scores on keys) undo the rotation with the model's own rotary module, built from the attention
module's config (the ``<Model>RotaryEmbedding`` class of the model's modeling file). Supported:
rotate-half RoPE over the whole head dimension (Llama, Qwen, Mistral, SmolLM2, ...).
"""

from __future__ import annotations

import sys

import torch

from ...errors import UserError

_ROTARY: dict[int, torch.nn.Module] = {}


def rotary_module(attention_module) -> torch.nn.Module:
    """The model's rotary embedding module for ``attention_module`` (built once per config)."""
    config = attention_module.config
    key = id(config)
    if key not in _ROTARY:
        modeling = sys.modules[type(attention_module).__module__]
        classes = [getattr(modeling, n) for n in dir(modeling) if n.endswith("RotaryEmbedding")]
        if not classes:
            raise UserError(
                f"this method needs the model's rotary embedding, but {type(attention_module).__name__}'s modeling "
                f"file defines no *RotaryEmbedding class. Fix: use a RoPE model (Llama, Qwen, Mistral, SmolLM2) "
                f"or a method that does not undo RoPE (snapkv, knorm, tova, h2o).")
        _ROTARY[key] = classes[0](config)
    return _ROTARY[key]


def cos_sin(attention_module, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (cos, sin) of shape (*positions.shape, D) for integer ``positions``."""
    rotary = rotary_module(attention_module).to(like.device)
    flat = positions.reshape(1, -1).to(like.device)
    cos, sin = rotary(like.float(), flat)
    d = like.shape[-1]
    if cos.shape[-1] != d:
        raise UserError(f"partial rotary embeddings ({cos.shape[-1]} of {d} dims) are not supported by this method.")
    return cos.float().view(*positions.shape, d), sin.float().view(*positions.shape, d)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE: ``x·cos + rotate_half(x)·sin``."""
    return x * cos + rotate_half(x) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo :func:`rotate` (a rotation by −θ, divided by the rotary's attention scaling squared)."""
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)
