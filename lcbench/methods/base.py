"""The method interface: a method is a chain of stage components (DESIGN.md "Methods").

Stages, in the order a sample meets them:

``text``               :meth:`Stage.compress_text` rewrites the context text (prompt compression).
``prefill_attention``  :meth:`Stage.prefill_attention` may replace attention during prefill (sparse).
``context_inputs``     :meth:`Stage.context_inputs` may prefill the context as input embeddings (or
                       write its KV directly) instead of token ids (soft compression).
``cache``              :meth:`Stage.compress_layer` turns one layer's full cache into the kept one,
                       called as soon as that layer finished its prefill (so peak memory falls).
``decode``             :meth:`Stage.decode_attention` / :meth:`Stage.after_decode_step` select or
                       evict per generated token (Quest, H2O, StreamingLLM's rolling window).

A component overrides only the hooks of its stages and lists them in ``stages``. Methods never
import tasks; the engine brings them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..cache.layer import KVLayer
from ..params import Param, ParamSet

STAGES = ("text", "context_inputs", "prefill_attention", "cache", "decode")


@dataclass(frozen=True)
class Needs:
    """What the engine must collect during the compressing prefill pass for a stage.

    ``window``: attention probabilities of the last ``window`` queries over every key (SnapKV,
    PyramidKV, AdaKV, TOVA use it); ``window_queries``: those query states themselves
    (post-rotary; Expected Attention, Q-Filters); ``full_attention_sum``: the attention every key
    received, summed over all prefill queries (H2O), computed block by block; ``queries``: every
    query state of the pass (post-rotary; Expected Attention, Q-Filters, Compactor, the kvpress bridge).
    """

    window: int = 0
    window_queries: bool = False
    full_attention_sum: bool = False
    queries: bool = False

    def merge(self, other: "Needs") -> "Needs":
        return Needs(max(self.window, other.window), self.window_queries or other.window_queries,
                     self.full_attention_sum or other.full_attention_sum, self.queries or other.queries)


@dataclass
class LayerObservation:
    """What was seen in one layer during the compressing pass (fields filled per :class:`Needs`).

    Tensors are per batch row; ``window_attention`` is (B, Hq, w, L) over the keys in storage
    order of the layer at the time of the pass, ``window_queries`` (B, Hq, w, D),
    ``attention_sum`` (B, Hq, L), ``queries`` (B, Hq, q, D). ``num_groups`` = query heads per KV head;
    ``module`` is the layer's attention module (its ``config`` gives the rotary embedding);
    ``positions`` the true positions of the pass's slots (a slot's index is its position only when
    nothing before the pass moved them: a ``context_inputs`` stage such as ``pool`` does).
    """

    layer_idx: int
    num_layers: int
    num_groups: int
    context_length: int  # tokens of the compressed region (those a cache stage may drop)
    protected: int = 0  # trailing stored tokens that must be kept (question in query-aware mode)
    window_attention: torch.Tensor | None = None
    window_queries: torch.Tensor | None = None
    attention_sum: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    queries: torch.Tensor | None = None
    module: Any = None
    positions: torch.Tensor | None = None  # (B, L) true position of each slot of the pass, ascending


@dataclass
class TextInput:
    """The text stage's view of a sample: the context part and, only in query-aware mode, the
    questions. ``tokenizer`` is the *target model's* (the achieved ratio is counted in it);
    ``model`` is the target model when the engine runs the stage (a compressor LM may default to it);
    ``fixed_tokens`` are tokens the engine measures with the context but the stage cannot shorten
    (chat template, system text, the question in query-aware mode), for budgets over both."""

    context: str
    questions: list[str]
    tokenizer: Any
    query_aware: bool
    model: Any = None
    fixed_tokens: int = 0


@dataclass
class ContextInputs:
    """What the engine prefills instead of the token ids (:meth:`Stage.context_inputs`).

    ``embeds`` (1, m, hidden) input embeddings at true ``positions`` (1, m); ``None`` when the
    stage already wrote everything into the cache and nothing is left to prefill.
    """

    embeds: torch.Tensor | None
    positions: torch.Tensor | None


class Stage:
    """Base class of every method component.

    Class attributes document the method for ``lcbench ls methods``: ``name``, ``family`` (one of
    kv_dropping, kv_quantization, prompt_compression, soft_compression, sparse_attention,
    baseline), ``paper`` (citation), ``params``. ``tolerance`` is how far (absolute) the achieved
    compression ratio may fall short of the requested one before the run fails.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "baseline"
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    stages: ClassVar[tuple[str, ...]] = ()
    tolerance: ClassVar[float] = 0.05
    needs: Needs = Needs()
    # True when what the stage does to a sample depends on earlier samples (e.g. statistics
    # calibrated on them); such a chain never batches samples together (engine/batching.py)
    cross_sample_state: ClassVar[bool] = False

    def __init__(self, ratio: float = 0.0, **args: Any):
        self.ratio = float(ratio)
        self.args = ParamSet(self.params).resolve(args, f"method '{self.name}'")

    # --- hooks (each stage overrides only what it needs) ----------------------------------
    def begin_sample(self) -> None:
        """Reset per-sample state."""

    def compress_text(self, text: TextInput) -> TextInput:
        return text

    def context_inputs(self, model, ids: torch.Tensor, context_length: int, cache) -> ContextInputs | None:
        """Replace the prefill of ``ids`` (1, L; the first ``context_length`` are the context, the
        rest the protected question) by input embeddings, or write the context's KV into ``cache``
        (a :class:`~lcbench.cache.KVCache`) directly; None keeps the token ids."""
        return None

    def prefill_attention(self, module, query, key, value, mask, scaling: float,
                          layer_idx: int) -> torch.Tensor | None:
        """Return the attention output (B, q, Hq, D) to replace dense attention, or None."""
        return None

    def compress_layer(self, layer: KVLayer, seen: LayerObservation) -> KVLayer:
        """Compress one layer's cache; return the (possibly new) layer object."""
        return layer

    def decode_attention(self, module, query, layer: KVLayer, scaling: float,
                         layer_idx: int) -> torch.Tensor | None:
        """Return the decode-step attention output to replace dense attention, or None."""
        return None

    def after_decode_step(self, layer: KVLayer, layer_idx: int, query: torch.Tensor) -> KVLayer:
        """Evict after a decode step; return the (possibly new) layer object."""
        return layer

    def sample_stats(self) -> dict[str, float]:
        """What the stage measured on the current sample (e.g. ``attention_density``); the engine
        merges it into the sample's stats after the prefill and again after decoding."""
        return {}

    # --- description ----------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "ratio": self.ratio, **self.args}


def keep_count(length: int, ratio: float) -> int:
    """Tokens to keep out of ``length`` when the fraction ``ratio`` is removed (at least 1)."""
    return max(1, min(length, int(round(length * (1.0 - ratio)))))
