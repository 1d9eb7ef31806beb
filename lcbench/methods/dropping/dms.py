"""DMS (training-free, as kvpress's ``DMSPress``): evict the tokens a scorer rates below a threshold,
outside a protected sliding window.

Łańcucki et al., "Inference-Time Hyper-Scaling with KV Cache Compression" (arXiv:2506.05345), whose
Dynamic Memory Sparsification *trains* per-head eviction decisions and evicts them with a delay (a
token decided out stays for a sliding window). The trained evictors are not reproduced here (they
need training; NVIDIA publishes DMS-trained checkpoints such as nvidia/Qwen3-8B-DMS-8x). What runs is
kvpress 0.5.5 ``DMSPress``'s dense-prefill, training-free version: a scorer (an lcbench dropping
method's per-token score: ``knorm`` by default, or ``snapkv``, ``tova``, ``keydiff``,
``expected_attention``) rates every context token per KV head; the last ``sliding_window_size``
tokens of the prefill are protected; every older token whose score is below the threshold is evicted
— per KV head, so heads keep different numbers of tokens (the layer becomes a ragged one; kvpress
masks the evicted keys, lcbench stores only the kept ones).

Two modes (``mode``):

``threshold``  kvpress's rule: evict scores ``< threshold`` (its scale is the scorer's: ``knorm``
               scores are minus key norms). The achieved ratio follows from the threshold: ``--ratio``
               is only the floor the engine checks it against (use ``--ratio 0`` to measure). Keeps
               exactly kvpress's positions on a fixed input (tests/test_kvpress_natives_more.py).
``ratio``      lcbench's ratio mode (the default, so ``--ratio`` is honoured; not kvpress's): in each
               layer the threshold is the score that evicts the requested share of the layer's tokens,
               one threshold shared by all its KV heads (so, as with DMSPress, heads whose tokens score
               low lose more of them), outside the sliding window; when the window leaves too few
               tokens to evict, it shrinks to what the ratio allows (the question tail in query-aware
               mode is always kept). Ratio 0 keeps everything.

kvpress's ``decoding=True`` (evicting generated tokens as they leave the window, scored on their
step's hidden states) is not implemented: ``decoding=true`` stops with a UserError; lcbench's decode-time
evictions are ``streamingllm``, ``h2o`` and ``tova``. ``--budget`` is refused (the budgets are per head
by design).
"""

from __future__ import annotations

import torch

from ...cache.ragged import RaggedLayer
from ...errors import UserError
from ...params import Param
from ..base import LayerObservation, Stage, keep_count
from .expected_attention import ExpectedAttention
from .keydiff import KeyDiff
from .knorm import KNorm
from .select import align, context_slots
from .snapkv import WINDOW_SIZE, SnapKV
from .tova import TOVA

SCORERS: dict[str, type] = {"knorm": KNorm, "snapkv": SnapKV, "tova": TOVA, "keydiff": KeyDiff,
                            "expected_attention": ExpectedAttention}


def ratio_keep(scores: torch.Tensor, evictable: torch.Tensor, drop: int) -> torch.Tensor:
    """(H, n) bool of one row: everything but the ``drop`` lowest ``scores`` among ``evictable`` slots
    over all heads together (a threshold shared by the heads; ties go to the earlier slot)."""
    h, n = scores.shape
    keep = torch.ones((h, n), dtype=torch.bool, device=scores.device)
    candidates = scores.float().masked_fill(~evictable, float("inf")).reshape(-1)
    drop = min(drop, int(evictable.sum()))
    if drop > 0:
        keep.view(-1)[candidates.topk(drop, largest=False, sorted=False).indices] = False
    return keep


class DMS(Stage):
    name = "dms"
    family = "kv_dropping"
    paper = ("Łańcucki et al., Inference-Time Hyper-Scaling with KV Cache Compression (arXiv:2506.05345); "
             "training-free as kvpress's DMSPress")
    summary = ("evict tokens scored below a threshold (per KV head) outside a protected sliding window; ratio mode "
               "sets each layer's threshold for --ratio")
    params = (
        Param("mode", str, "ratio", "ratio: each layer's threshold evicts the requested share (lcbench's); "
              "threshold: evict scores below `threshold` (kvpress's)", choices=("ratio", "threshold")),
        Param("threshold", float, 0.0, "threshold mode: tokens scoring below it are evicted (the scorer's scale)"),
        Param("scorer", str, "knorm", "the per-token scores", choices=tuple(SCORERS)),
        Param("sliding_window_size", int, 128, "latest prefill tokens protected from eviction", min=0),
        Param("decoding", bool, False, "kvpress's eviction while decoding (not implemented: refused)"),
        WINDOW_SIZE,
    )
    token_budget = False

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        if self.args["decoding"]:
            raise UserError("dms: decoding=true (evicting generated tokens as they leave the sliding window) is not "
                            "implemented in lcbench. Fix: drop decoding=true (prefill eviction, kvpress's default), or "
                            "use a decode-time eviction method (streamingllm, h2o, tova).")
        scorer_cls = SCORERS[self.args["scorer"]]
        accepted = {p.name for p in scorer_cls.params}
        self.scorer = scorer_cls(ratio, **{k: v for k, v in self.args.items() if k in accepted})
        self.needs = self.scorer.needs

    def begin_sample(self) -> None:
        self.scorer.begin_sample()

    def compress_layer(self, layer, seen: LayerObservation):
        n = context_slots(layer, seen)
        threshold_mode = self.args["mode"] == "threshold"
        if n <= 1 or (not threshold_mode and self.ratio <= 0):
            return layer
        scores = align(self.scorer.scores(layer, seen)[..., : seen.context_length], layer, seen).float()
        b, h, _ = scores.shape
        protected_ctx = max(0, self.args["sliding_window_size"] - seen.protected)  # window slots in the context
        slot = torch.arange(n, device=scores.device)
        valid = layer.valid[..., :n] if layer.valid is not None else torch.ones_like(scores, dtype=torch.bool)
        if threshold_mode:
            keep = (scores >= self.args["threshold"]) | (slot >= n - protected_ctx)
        else:
            rows = []
            for row in range(b):
                real = int(valid[row].sum()) // h
                total = real + seen.protected
                drop = h * (total - keep_count(total, self.ratio))
                window = min(protected_ctx, max(0, real - -(-drop // h)))  # shrunk when it leaves too few
                evictable = valid[row] & (slot < n - window)
                rows.append(ratio_keep(scores[row], evictable, drop))
            keep = torch.stack(rows)
        if bool(keep[valid].all()):
            return layer
        tail = torch.ones((b, h, seen.protected), dtype=torch.bool, device=keep.device)
        return RaggedLayer.from_layer(layer, torch.cat([keep, tail], dim=-1))
