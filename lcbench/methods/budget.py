"""``--budget N``: a fixed number of tokens kept per layer and KV head, instead of a fraction.

The convention of the SnapKV, PyramidKV, AdaKV and EMS tables and of KVCache-Factory's
``max_capacity_prompt``: each layer keeps ``N`` tokens per KV head (the observation window, and in
query-aware mode the question, included), whatever the context's length. lcbench turns the budget
into the ratio that keeps exactly ``N`` of the tokens a layer holds (:func:`budget_ratio`), layer by
layer when the layer compresses (:func:`compress`): so a ``--budget N`` run and a ``--ratio r`` run
of a context where ``r`` keeps ``N`` tokens compute the same thing, and a sliding-window layer that
holds fewer than ``N`` tokens keeps them all. Between layers the component's ``ratio`` is the
sample's (``1 − N / tokens prefilled``), which decode-time hooks read.

Only token-keeping cache stages take a budget (dropping and merging methods,
:attr:`Stage.token_budget`); quantization, channel pruning, prompt compression, sparse attention
and the kvpress bridge (its presses take a ratio) are refused by :func:`budget_refusal`.
"""

from __future__ import annotations

from ..cache.layer import KVLayer
from .base import LayerObservation, Stage
from .dropping.select import real_context_slots


def budget_ratio(budget: int, held: int) -> float:
    """The ratio that keeps ``budget`` of ``held`` tokens (0 when the layer holds no more)."""
    return 0.0 if held <= budget else 1.0 - budget / held


def takes_budget(cls: type) -> bool:
    """Whether a component's cache stage keeps a number of tokens a budget can fix."""
    return ("cache" in cls.stages and cls.family in ("kv_dropping", "soft_compression", "baseline")
            and getattr(cls, "token_budget", False))


def budget_refusal(cls: type) -> str | None:
    """Why ``--budget`` cannot fix what component ``cls`` keeps (None: it can)."""
    if takes_budget(cls):
        return None
    if "cache" not in cls.stages:
        return f"'{cls.name}' ({cls.family}) has no cache stage that keeps tokens"
    return f"'{cls.name}' ({cls.family}) keeps no whole tokens per head (its cache stage takes a ratio)"


def compress(stage: Stage, layer: KVLayer, seen: LayerObservation) -> KVLayer:
    """``stage.compress_layer(layer, seen)``; with a budget, at the ratio that keeps ``stage.budget_tokens``
    of the tokens this layer holds (real context slots plus the protected tail), after which the
    stage's ratio is the sample's (over every token of the pass)."""
    budget = stage.budget_tokens
    if budget is None:
        return stage.compress_layer(layer, seen)
    stage.ratio = budget_ratio(budget, real_context_slots(layer, seen) + seen.protected)
    try:
        return stage.compress_layer(layer, seen)
    finally:
        stage.ratio = budget_ratio(budget, seen.context_length + seen.protected)
