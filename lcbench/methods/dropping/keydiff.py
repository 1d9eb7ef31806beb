"""KeyDiff: keep the tokens whose keys differ most from the layer's mean key direction.

Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments" (arXiv:2504.15364). Each KV head's anchor is the mean of its
unit-normalized context keys; a token's score is minus the cosine similarity of its key to the
anchor, so distinctive keys are kept and keys that look like every other key go first. Read
against kvpress 0.5.5 ``kvpress/presses/keydiff_press.py`` (KeyDiffPress), whose positions this
method keeps exactly (tests/test_kvpress_presses.py). The paper evicts block by block while
prefilling; like kvpress, lcbench scores the whole context at once (kvpress's BlockPress wraps the
block-wise variant; ``kvpress:BlockPress --method-args press=KeyDiffPress`` runs it).
"""

import torch
import torch.nn.functional as F

from .scoring import ScoringDrop
from .select import context_slots


def keydiff_scores(keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, n) minus the cosine similarity of each key (B, H, n, D) to its head's mean unit key
    (the mean over ``valid`` slots only, when padding is present)."""
    unit = F.normalize(keys.float(), p=2, dim=-1)
    if valid is None:
        anchor = unit.mean(dim=2, keepdim=True)
    else:
        weight = valid[..., None].float()
        anchor = (unit * weight).sum(2, keepdim=True) / weight.sum(2, keepdim=True).clamp(min=1)
    return -F.cosine_similarity(keys.float(), anchor, dim=-1)


class KeyDiff(ScoringDrop):
    name = "keydiff"
    family = "kv_dropping"
    paper = ("Park et al., KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in "
             "Resource-Constrained Environments (arXiv:2504.15364)")
    summary = "keep the keys least similar to the head's mean unit key (distinctive keys)"

    def scores(self, layer, seen):
        keys, _ = layer.dense()
        n = context_slots(layer, seen)
        valid = None if layer.valid is None else layer.valid[..., :n]
        return keydiff_scores(keys[:, :, :n], valid)
