"""StreamingLLM: attention sinks + the most recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024
(arXiv:2309.17453). The first ``n_sink`` tokens and the latest tokens are kept.
"""

import torch

from ...params import Param
from ..base import Stage
from .select import keep_top


class StreamingLLM(Stage):
    name = "streamingllm"
    family = "kv_dropping"
    summary = "keep attention-sink tokens and a recent window"
    paper = "Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024 (arXiv:2309.17453)"
    stages = ("cache",)
    params = (Param("n_sink", int, 4, "initial tokens always kept (attention sinks)"),)

    def compress_layer(self, layer, seen):
        n = seen.context_length
        b, h, _ = layer.positions.shape
        # score = storage index (recent first), with the sinks above everything
        scores = torch.arange(n, device=layer.positions.device, dtype=torch.float32).expand(b, h, n).clone()
        scores[..., : self.args["n_sink"]] = float(n + 1)
        return keep_top(layer, scores, self.ratio, seen)
