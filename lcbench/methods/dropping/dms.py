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

``decoding=true`` is kvpress's eviction while decoding (``DMSPress(decoding=True)``, read against
kvpress 0.5.5 ``presses/dms_press.py``, ``DMSPress.forward_hook``): every token is judged once, when it
leaves the sliding window of the latest ``sliding_window_size`` tokens — the context's protected
window as the question pushes it out, then question and generated tokens — and evicted (per KV head)
if its score is below ``threshold``. As there, the question part's pass evicts too (its tokens and
the context window tokens it pushes out, after that pass's attention; :meth:`Stage.after_question`),
then each generated token's step. Judging a token on its own key needs a scorer that scores a token
from itself: decoding works with ``scorer=knorm`` (kvpress scores new tokens with the wrapped press
on their own keys) and ``mode=threshold`` (kvpress's rule; in ratio mode there is no threshold to
apply to later tokens); other combinations stop with a UserError. kvpress masks an evicted key in
attention and keeps it stored; lcbench stores only the kept tokens, so KV bytes at the end fall.
``--budget`` is refused (the budgets are per head by design).
"""

from __future__ import annotations

import torch

from ...cache.ragged import RaggedLayer
from ...errors import UserError
from ...params import Param
from ..base import LayerObservation, Stage, keep_count
from .decode_eviction import EvictingLayer
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
               "sets each layer's threshold for --ratio; decoding=true also evicts while decoding (its decode stage)")
    params = (
        Param("mode", str, "ratio", "ratio: each layer's threshold evicts the requested share (lcbench's); "
              "threshold: evict scores below `threshold` (kvpress's)", choices=("ratio", "threshold")),
        Param("threshold", float, 0.0, "threshold mode: tokens scoring below it are evicted (the scorer's scale)"),
        Param("scorer", str, "knorm", "the per-token scores", choices=tuple(SCORERS)),
        Param("sliding_window_size", int, 128, "latest tokens protected from eviction", min=0),
        Param("decoding", bool, False, "also evict while decoding: tokens leaving the sliding window (question and "
              "generated ones) scored below `threshold` (kvpress's decoding=True; needs mode=threshold, scorer=knorm)"),
        WINDOW_SIZE,
    )
    stages = ("cache", "decode")
    token_budget = False

    def __init__(self, ratio: float = 0.0, **args):
        super().__init__(ratio, **args)
        if self.args["decoding"] and (self.args["mode"] != "threshold" or self.args["scorer"] != "knorm"):
            raise UserError(
                f"dms: decoding=true judges each question and generated token on its own key against a threshold, "
                f"as kvpress's DMSPress(decoding=True) does; it needs mode=threshold and scorer=knorm (got "
                f"mode={self.args['mode']}, scorer={self.args['scorer']}). Fix: pass mode=threshold,scorer=knorm,"
                f"threshold=T with decoding=true, or drop decoding=true.")
        # a decode stage only when it evicts while decoding (so prefill-only runs share contexts between turns)
        self.stages = ("cache", "decode") if self.args["decoding"] else ("cache",)
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

    # --- decoding=true: evict tokens as they leave the sliding window ----------------------------
    def after_question(self, layer, layer_idx, query):
        return self._evict_leaving(layer, query.shape[2])

    def after_decode_step(self, layer, layer_idx, query):
        return self._evict_leaving(layer, query.shape[2])

    def _evict_leaving(self, layer, arrived: int):
        """Judge the tokens the pass's ``arrived`` new slots pushed out of the sliding window: per row
        the window is the latest ``sliding_window_size`` positions (positions are contiguous in a
        row, so they count arrivals as kvpress's score buffer does), and a slot leaves it when the
        row's last position passes it; each leaving slot whose knorm score is below ``threshold``
        is evicted in its KV head."""
        window = self.args["sliding_window_size"]
        positions, valid = layer.positions, layer.valid  # the keys are read only when a slot leaves
        n = positions.shape[-1]
        if valid is None:
            valid = torch.ones_like(positions, dtype=torch.bool)
        last = positions.masked_fill(~valid, -1).amax(-1, keepdim=True)  # (B, H, 1): each row's newest
        new = valid[..., n - arrived:].sum(-1, keepdim=True)  # real tokens this pass added per row
        edge = last - window  # slots at or before this position are outside the window now
        leaving = valid & (positions <= edge) & (positions > edge - new)
        if not bool(leaving.any()):
            return layer
        keys, _ = layer.dense()
        scores = -torch.linalg.vector_norm(keys.float(), dim=-1)  # KnormPress.score on each token's own key
        evict = leaving & (scores < self.args["threshold"])
        if not bool(evict.any()):
            return layer
        layer = EvictingLayer.wrap(layer)  # numbers the slots before this turn's first eviction (crop_to)
        layer.drop(evict)
        return layer
