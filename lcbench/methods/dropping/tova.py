"""TOVA: Token Omission Via Attention.

Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024 (arXiv:2401.06104): keep the
tokens the *last* query attends to most, with the attention averaged over all heads of the layer
(so every KV head keeps the same tokens). The last token itself is always kept (as kvpress's
TOVAPress does; its own weight is nearly always the largest anyway).
"""

from ..base import Needs
from .scoring import ScoringDrop
from .select import force_keep


class TOVA(ScoringDrop):
    name = "tova"
    family = "kv_dropping"
    paper = "Oren et al., Transformers are Multi-State RNNs (TOVA), EMNLP 2024 (arXiv:2401.06104)"
    summary = "attention of the last query, averaged over heads; the last token is kept"
    needs = Needs(window=1)

    def scores(self, layer, seen):
        n = seen.context_length
        last = seen.window_attention[:, :, -1, :n].float().mean(1)  # (B, n) over all query heads
        h = layer.positions.shape[1]
        scores = last[:, None, :].expand(-1, h, -1)
        return scores if seen.protected else force_keep(scores, n - 1)
