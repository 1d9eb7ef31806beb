"""ChunkKV: keep whole chunks of tokens, and reuse the kept indices across adjacent layers.

Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM
Inference" (arXiv:2502.00299). Token scores are SnapKV's (window attention, pooled), summed over
the KV heads; a chunk's score is its tokens' mean; chunks are kept best first (the last one
partly, by token score, to meet the budget exactly), the same chunks in every head. Layer-wise
index reuse: in each group of ``index_reuse`` consecutive layers only the first scores, the
others keep the same tokens (the paper's saving of those layers' scoring; here the engine still
collects every layer's window attention, so the reuse changes what is kept, not the time taken).
"""

import torch

from ...params import Param
from ..base import Needs, Stage
from .select import align, keep_top
from .snapkv import KERNEL_SIZE, WINDOW_SIZE, window_scores


def chunk_major(token_scores: torch.Tensor, chunk: int) -> torch.Tensor:
    """(B, n) token scores → scores whose order is: chunks by mean score, then tokens in a chunk
    by their own score. +inf tokens (a kept window) make their chunk rank first."""
    b, n = token_scores.shape
    chunks = -(-n // chunk)
    padded = token_scores.new_full((b, chunks * chunk), float("nan"))
    padded[:, :n] = token_scores
    chunk_score = padded.view(b, chunks, chunk).nanmean(-1)
    rank = chunk_score.argsort(dim=-1, descending=True).argsort(dim=-1).float()  # 0 = best chunk
    finite = token_scores.masked_fill(~torch.isfinite(token_scores), float("nan"))
    lo = torch.nan_to_num(finite.nan_to_num(float("inf")).amin(-1, keepdim=True), posinf=0.0)
    hi = torch.nan_to_num(finite.nan_to_num(float("-inf")).amax(-1, keepdim=True), neginf=1.0)
    within = ((token_scores - lo) / (hi - lo).clamp_min(1e-12)).nan_to_num(posinf=1.0, neginf=0.0).clamp(0, 1)
    per_token = (chunks - rank).repeat_interleave(chunk, dim=-1)[:, :n]
    return per_token + 0.5 * within


class ChunkKV(Stage):
    name = "chunkkv"
    family = "kv_dropping"
    latent_cache = True  # selects slots by the observation / quantizes the cached numbers (MLA latents too)
    paper = ("Liu et al., ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context "
             "LLM Inference (arXiv:2502.00299)")
    summary = ("SnapKV scores summed per chunk of tokens; whole chunks kept; indices reused across "
               "adjacent layers")
    defaults = {"chunk_size": 10, "index_reuse": 2}
    stages = ("cache",)
    params = (
        Param("chunk_size", int, None, "tokens per chunk", min=1),
        Param("index_reuse", int, None, "consecutive layers sharing one layer's kept indices (1 = no reuse)", min=1),
        WINDOW_SIZE,
        KERNEL_SIZE,
    )

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        self.needs = Needs(window=self.args["window_size"])

    def begin_sample(self):
        self._shared: torch.Tensor | None = None  # kept true positions of the group's first layer

    def compress_layer(self, layer, seen):
        if self.ratio <= 0 or seen.context_length <= 1:  # nothing to choose (a window layer may hold only the question)
            return layer
        if not hasattr(self, "_shared"):
            self.begin_sample()
        fresh = layer.seq_len() == seen.context_length + seen.protected
        reuse = max(1, self.args["index_reuse"])
        # a layer reuses the group's first layer's tokens only when it held the same ones (layers
        # with different sliding windows hold different tokens: engine/attention.py)
        same = getattr(self, "_shared_from", None) == layer.positions.shape[-1]
        if seen.layer_idx % reuse and fresh and same and self._shared is not None:
            # the same tokens as the group's first layer: its kept positions, as slots of this layer
            layer.select(torch.searchsorted(layer.positions.contiguous(), self._shared.to(layer.positions.device).contiguous()))
            return layer
        self._shared_from = layer.positions.shape[-1]
        scores = window_scores(seen, self.args["window_size"], self.args["kernel_size"], "avg")
        scores = align(scores, layer, seen)
        ordered = chunk_major(scores.sum(1), self.args["chunk_size"])
        layer = keep_top(layer, ordered[:, None, :].expand_as(scores), self.ratio, seen)
        self._shared = layer.positions.clone() if fresh else None
        return layer
