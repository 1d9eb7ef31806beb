"""Approximate leverage scores of the keys, alone (``leverage``) and in Compactor (``compactor``).

Chari & Van Durme, "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate
Leverage Scores" (arXiv:2507.08143). A key that lies far outside the span of the others has a
high statistical leverage ℓᵢ = xᵢᵀ(XᵀX)⁻¹xᵢ and is hard to reconstruct from them, so it is kept.
X are the sequence-centred *pre-RoPE* keys of each KV head, sketched on the right with a seeded
Gaussian ``D × sketch_dimension`` matrix when that is smaller than the head dimension (exact
leverage otherwise). Compactor adds non-causal chunked attention: inside each chunk of
``chunk_size`` tokens every query attends to every key; a key's score is the attention it
receives times its value norm. Both scores are z-normalized and blended as
``blending · leverage + attention`` (``blending < 0`` means: use the compression ratio, the
paper's heuristic); ``sink_start`` first and ``sink_end`` last tokens are kept.
"""

import math

import torch

from ...errors import UserError
from ...params import Param
from ..base import Needs
from .rope import cos_sin, unrotate
from .scoring import ScoringDrop
from .select import context_slots, group_mean

LEVERAGE_PARAMS = (
    Param("sketch_dimension", int, None, "columns of the Gaussian sketch", min=1),
    Param("seed", int, None, "seed of the Gaussian sketch"),
)


def leverage_scores(keys: torch.Tensor, sketch: int, seed: int) -> torch.Tensor:
    """(B, H, n, D) keys → (B, H, n) approximate leverage scores."""
    x = keys.float() - keys.float().mean(dim=-2, keepdim=True)
    d = x.shape[-1]
    if sketch < d:
        gen = torch.Generator().manual_seed(seed)
        phi = torch.randn((d, sketch), generator=gen).to(x.device) / math.sqrt(sketch)
        x = x @ phi
    gram = x.transpose(-1, -2) @ x
    eye = torch.eye(gram.shape[-1], device=x.device)
    jitter = 1e-6 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None].clamp_min(1e-12)
    solved = torch.linalg.solve(gram + jitter * eye, x.transpose(-1, -2))  # (XᵀX)⁻¹Xᵀ
    return (x * solved.transpose(-1, -2)).sum(-1).clamp_min(0)


def pre_rope_keys(layer, seen, n: int) -> torch.Tensor:
    keys, _ = layer.dense()
    keys = keys[:, :, :n].float()
    cos, sin = cos_sin(seen.module, layer.positions[:, :, :n], keys)
    return unrotate(keys, cos, sin)


def zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-6)


def chunked_attention(queries: torch.Tensor, keys: torch.Tensor, chunk: int, scaling: float) -> torch.Tensor:
    """Non-causal attention inside chunks: (B, H, n, D) queries and keys of the same tokens →
    (B, H, n) attention each key receives from the queries of its chunk."""
    b, h, n, d = keys.shape
    chunks = -(-n // chunk)
    pad = chunks * chunk - n
    q = torch.cat([queries, queries.new_zeros(b, h, pad, d)], dim=2).view(b, h, chunks, chunk, d)
    k = torch.cat([keys, keys.new_zeros(b, h, pad, d)], dim=2).view(b, h, chunks, chunk, d)
    real = (torch.arange(chunks * chunk, device=keys.device) < n).view(chunks, chunk)
    logits = (q @ k.transpose(-1, -2)) * scaling  # (B, H, C, chunk, chunk)
    logits = logits.masked_fill(~real[:, None, :], float("-inf"))
    probs = logits.softmax(-1) * real[:, :, None]  # padded queries contribute nothing
    return probs.sum(-2).reshape(b, h, chunks * chunk)[..., :n]


class Leverage(ScoringDrop):
    name = "leverage"
    family = "kv_dropping"
    paper = ("Chari & Van Durme, Compactor: Calibrated Query-Agnostic KV Cache Compression with "
             "Approximate Leverage Scores (arXiv:2507.08143)")
    summary = "approximate statistical leverage of the pre-RoPE keys (Gaussian sketch)"
    defaults = {"sketch_dimension": 48, "seed": 0}
    params = LEVERAGE_PARAMS

    def scores(self, layer, seen):
        n = context_slots(layer, seen)
        return leverage_scores(pre_rope_keys(layer, seen, n), self.args["sketch_dimension"], self.args["seed"])


class Compactor(ScoringDrop):
    name = "compactor"
    family = "kv_dropping"
    paper = ("Chari & Van Durme, Compactor: Calibrated Query-Agnostic KV Cache Compression with "
             "Approximate Leverage Scores (arXiv:2507.08143)")
    summary = "leverage scores blended with non-causal chunked attention; sinks at both ends kept"
    defaults = {
        "sketch_dimension": 48,
        "seed": 0,
        "chunk_size": 256,
        "sink_start": 8,
        "sink_end": 4,
        "blending": -1.0,
    }
    needs = Needs(queries=True)
    params = LEVERAGE_PARAMS + (
        Param("chunk_size", int, None, "tokens per chunk of the non-causal attention", min=1),
        Param("sink_start", int, None, "first tokens always kept", min=0),
        Param("sink_end", int, None, "last context tokens always kept", min=0),
        Param("blending", float, None, "weight of the leverage scores (< 0: the compression ratio)"),
    )

    def scores(self, layer, seen):
        n = context_slots(layer, seen)
        if n != seen.context_length:
            raise UserError("compactor scores the tokens of the compressing pass; put it before other dropping "
                            "methods in a chain (e.g. compactor+kivi, not snapkv+compactor).")
        start, end = min(self.args["sink_start"], n), min(self.args["sink_end"], n)
        stop = max(start, n - end)
        keys, values = layer.dense()
        inner = slice(start, stop)
        leverage = leverage_scores(pre_rope_keys(layer, seen, n)[:, :, inner], self.args["sketch_dimension"],
                                   self.args["seed"])
        queries = seen.queries[:, :, : seen.queries.shape[2] - seen.protected][:, :, inner].float()
        groups = seen.num_groups
        head_dim = keys.shape[-1]
        scaling = float(getattr(seen.module, "scaling", head_dim ** -0.5))
        attention = chunked_attention(queries, keys[:, :, inner].float().repeat_interleave(groups, dim=1),
                                      self.args["chunk_size"], scaling)
        attention = group_mean(attention, groups) * values[:, :, inner].float().norm(dim=-1)
        blend = self.args["blending"] if self.args["blending"] >= 0 else self.ratio
        inner_scores = blend * zscore(leverage) + zscore(attention)
        scores = torch.full(keys.shape[:2] + (n,), float("inf"), device=keys.device)
        scores[:, :, inner] = inner_scores
        return scores
