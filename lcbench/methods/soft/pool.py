"""Mean-pooled context embeddings: the average-pooling baseline of the soft-compression literature.

The context's input embeddings are averaged over consecutive chunks of tokens, and each chunk is
prefilled as one position. Mean pooling as the compression operator follows Feldman & Artzi,
"Simple Context Compression: Mean-Pooling and Multi-Ratio Training" (arXiv:2510.20797), who pool a
*trained* encoder's outputs and find it beats compression tokens; here it is the training-free
floor: the target model's own input embeddings, pooled. ``--ratio r`` keeps
``round((1 − r)·n)`` positions: the first ``keep_first`` tokens stay as they are (the
attention sink / BOS), the rest are split into that many near-equal chunks; ``chunk=k`` fixes
the chunk length instead. Each pooled position takes the position id of its chunk's last token,
so the question that follows keeps its true position (DESIGN.md). In query-aware mode the
question tokens are not pooled.
"""

from __future__ import annotations

import math

import torch

from ...params import Param
from ..base import ContextInputs, Stage, keep_count


def chunk_bounds(length: int, slots: int) -> torch.Tensor:
    """``slots + 1`` boundaries splitting ``length`` tokens into near-equal consecutive chunks."""
    return torch.div(torch.arange(slots + 1) * length, slots, rounding_mode="floor")


def mean_pool(embeds: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """(1, n, h) embeddings averaged over the chunks ``bounds[i]:bounds[i+1]`` → (1, slots, h)."""
    sizes = (bounds[1:] - bounds[:-1]).to(embeds.device)
    owner = torch.repeat_interleave(torch.arange(len(sizes), device=embeds.device), sizes)
    total = torch.zeros(1, len(sizes), embeds.shape[-1], dtype=torch.float32, device=embeds.device)
    total.index_add_(1, owner, embeds.float())
    return (total / sizes[None, :, None]).to(embeds.dtype)


class Pool(Stage):
    name = "pool"
    family = "soft_compression"
    paper = ("Feldman & Artzi, Simple Context Compression: Mean-Pooling and Multi-Ratio Training "
             "(arXiv:2510.20797); here training-free, over input embeddings")
    summary = "context input embeddings mean-pooled over chunks, one position each"
    defaults = {"keep_first": 1, "chunk": 0}
    stages = ("context_inputs",)
    params = (
        Param("keep_first", int, None, "initial context tokens prefilled as they are (attention sink)", min=0),
        Param("chunk", int, None, "tokens per pooled position; 0 sizes the chunks from --ratio", min=0),
    )

    def context_inputs(self, model, ids, context_length, cache):
        chunk = self.args["chunk"]
        if chunk <= 1 and self.ratio <= 0:
            return None
        head = min(self.args["keep_first"], context_length)
        body = context_length - head
        if body <= 1:
            return None
        question = ids.shape[1] - context_length  # query-aware: kept as is, and counted in the budget
        slots = math.ceil(body / chunk) if chunk > 1 else \
            max(1, keep_count(context_length + question, self.ratio) - question - head)
        if slots >= body:
            return None
        embeds = model.get_input_embeddings()(ids)
        bounds = chunk_bounds(body, slots)
        pooled = mean_pool(embeds[:, head:context_length], bounds)
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        pooled_pos = head + bounds[1:].to(ids.device)[None] - 1
        return ContextInputs(
            embeds=torch.cat([embeds[:, :head], pooled, embeds[:, context_length:]], dim=1),
            positions=torch.cat([positions[:, :head], pooled_pos, positions[:, context_length:]], dim=1),
        )
