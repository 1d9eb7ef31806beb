"""The method interface: a method is a chain of stage components (DESIGN.md "Methods").

Stages, in the order a sample meets them:

``text``               :meth:`Stage.compress_text` rewrites the context text (prompt compression).
``prefill_attention``  :meth:`Stage.prefill_attention` may replace attention during prefill (sparse).
``context_inputs``     :meth:`Stage.context_inputs` may prefill the context as input embeddings (or
                       write its KV directly) instead of token ids (soft compression).
``cache``              :meth:`Stage.compress_layer` turns one layer's full cache into the kept one,
                       called as soon as that layer finished its prefill (so peak memory falls).
``decode``             :meth:`Stage.decode_attention` / :meth:`Stage.after_decode_step` select or
                       evict per generated token (Quest, H2O, StreamingLLM's rolling window);
                       :meth:`Stage.after_question` evicts after the question part's pass (DMS).

A component overrides only the hooks of its stages; ``stages`` is derived from the hooks it
overrides (a class may still list it, and then the list must match the overrides). A method's
class is its whole declaration: :func:`declaration_errors` says what is wrong with one (no or
unknown family, a declared stage without its hook, a hook without its stage), and the method
registry refuses such a class when it loads, naming its file. Methods never import tasks; the
engine brings them together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..cache.layer import KVLayer
from ..params import Param, ParamSet

STAGES = ("text", "context_inputs", "prefill_attention", "cache", "decode")

# the hooks that make a component take part in each stage
STAGE_HOOKS: dict[str, tuple[str, ...]] = {
    "text": ("compress_text",),
    "context_inputs": ("context_inputs",),
    "prefill_attention": ("prefill_attention",),
    "cache": ("compress_layer",),
    "decode": ("decode_attention", "after_question", "after_decode_step"),
}

# the model attention terms a stage that computes attention itself may apply (Stage.attention_terms)
ATTENTION_TERMS = ("softcap", "sinks", "chunk")

FAMILIES = ("baseline", "kv_dropping", "kv_quantization", "prompt_compression", "soft_compression",
            "sparse_attention")


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
    family: ClassVar[str] = ""  # one of FAMILIES; required of every registered method
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    stages: ClassVar[tuple[str, ...]] = ()
    tolerance: ClassVar[float] = 0.05
    # parameter defaults this class sets on the ``params`` it declares or inherits (a shared Param
    # may carry its own default; a class overrides it here, so one value is written once)
    defaults: ClassVar[dict[str, Any]] = {}
    needs: Needs = Needs()
    # True when what the stage does to a sample depends on earlier samples (e.g. statistics
    # calibrated on them); such a chain never batches samples together (engine/batching.py)
    cross_sample_state: ClassVar[bool] = False
    # False when the cache stage keeps no whole tokens per head, so ``--budget N`` cannot fix what
    # it keeps (ThinK prunes key channels; the kvpress bridge's presses take a ratio): lcbench/methods/budget.py
    token_budget: ClassVar[bool] = True
    # True when the stage's latency is a reference implementation's (Python loops, a dense stand-in
    # for a kernel), not representative of an optimized one: spec.json records it and `lcbench report`
    # and the leaderboard mark such runs' latencies so nobody ranks methods on them (issue #14)
    reference_latency: ClassVar[bool] = False
    # the model's attention terms besides q/k/v, scaling and a sliding window that the stage's own attention
    # computation (``prefill_attention`` / ``decode_attention``) applies: "softcap" (Gemma-2's logit softcap),
    # "sinks" (gpt-oss's learned sink column) and "chunk" (Llama-4's chunked layers: a query sees its own chunk).
    # The engine passes each as a keyword (``softcap=``, ``sinks=``, ``chunk=``) where the model has it, and
    # refuses a stage that computes attention on such a model without it (engine/attach.py)
    attention_terms: ClassVar[frozenset[str]] = frozenset()
    # True when the stage's math holds on a cache of multi-head latents (DeepSeek-V2/V3's MLA: each slot is
    # a per-token latent the model expands into every head's keys and values; one stored "head" for all
    # query heads): it selects slots from the engine's observation (attention of the expanded keys) or
    # quantizes the cached numbers, and reads no slot as an attention key or value. The engine refuses a
    # cache, decode or sparse-prefill stage without it on such a model (engine/attach.latent_refusal)
    latent_cache: ClassVar[bool] = False
    # False when the stage's math assumes every layer of the model is an attention layer: it counts,
    # calibrates or hooks layers by the model's layer count or modules (a per-layer table over
    # ``num_hidden_layers``, ``layer.self_attn``, waiting for ``num_layers`` observations). On a hybrid
    # model (Qwen3-Next, Qwen3.5, Jamba, Nemotron-H: linear-attention / state-space layers between the
    # attention layers, which keep a recurrent state and never call attention) and on a KV-sharing one
    # (Gemma-3n/4: layers that reuse an earlier layer's KV and cache none, engine/kv_sharing.py) the
    # engine refuses it (engine/attach.hybrid_refusal); stages acting through the per-layer hooks alone run there
    hybrid_layers: ClassVar[bool] = True
    # True when the stage scores with the question, which only --query-aware puts in the prefill (Finch):
    # the engine refuses such a chain without it, unless it compresses nothing (ratio 0)
    needs_question: ClassVar[bool] = False
    # the parameters a calibration (:meth:`calibrate`) depends on; None: all of them ("ratio" may be named)
    calibration_params: ClassVar[tuple[str, ...] | None] = None
    # True when the stage cuts layers only once the last layer was prefilled (it ranks every layer's
    # score, SimLayerKV's ratio mode): a later cache stage would already have acted on the uncut
    # layers, so a chain refuses one after it (methods/chain.py)
    cuts_after_last_layer: bool = False

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if "stages" not in cls.__dict__:  # not listed by this class: follow its hooks
            cls.stages = overridden_stages(cls)
        if cls.__dict__.get("defaults"):
            cls.params = tuple(dataclasses.replace(p, default=cls.defaults[p.name]) if p.name in cls.defaults else p
                               for p in cls.params)

    def __init__(self, ratio: float = 0.0, **args: Any):
        self.ratio = float(ratio)
        self.budget_tokens: int | None = None  # tokens kept per layer and KV head (--budget), set by the chain
        self.args = ParamSet(self.params).resolve(args, f"method '{self.name}'")
        self.calibration: Any = None  # what :meth:`calibrate` returned, set by the engine before the first sample

    # --- hooks (each stage overrides only what it needs) ----------------------------------
    def calibrate(self, model, tokenizer) -> Any:
        """Per-model offline work (find heads, layers, dimensions): return something ``torch.save``
        stores (tensors, numbers, lists, dicts). The engine calls it once per model and the
        parameters in :attr:`calibration_params`, caches it on disk, records it in spec.json and
        sets :attr:`calibration` before the first sample (:mod:`lcbench.engine.calibration`)."""
        return None

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
                          layer_idx: int, window: int | None = None) -> torch.Tensor | None:
        """Return the attention output (B, q, Hq, D) to replace dense attention, or None.
        ``window``: the layer's sliding window (a query at position p sees keys in (p − window, p]),
        passed only on sliding-window layers; ``mask`` (padding and storage order, None when plain
        causal) does not hold it, so a stage that computes attention must apply it. A stage that
        declares :attr:`attention_terms` also gets ``softcap=`` and/or ``sinks=`` on a model that has
        them, to apply as :func:`lcbench.engine.attention.softmax_attention` does, and ``chunk=`` on a
        chunked-attention layer (a query at position p sees keys in ``[⌊p / chunk⌋ · chunk, p]``)."""
        return None

    def compress_layer(self, layer: KVLayer, seen: LayerObservation) -> KVLayer:
        """Compress one layer's cache; return the (possibly new) layer object."""
        return layer

    def decode_attention(self, module, query, layer: KVLayer, scaling: float,
                         layer_idx: int, window: int | None = None) -> torch.Tensor | None:
        """Return the decode-step attention output to replace dense attention, or None (``window``:
        the layer's sliding window, passed only on sliding-window layers, to be honoured; ``softcap=``,
        ``sinks=`` and ``chunk=`` as for :meth:`prefill_attention`)."""
        return None

    def after_question(self, layer: KVLayer, layer_idx: int, query: torch.Tensor) -> KVLayer:
        """Evict after the question part's pass (its tokens appended, attention computed); return
        the (possibly new) layer object. A decode-stage hook: most decode-time evictions start at
        the first generated token and leave it alone."""
        return layer

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


def overridden_stages(cls: type) -> tuple[str, ...]:
    """The stages whose hooks ``cls`` overrides (or inherits overridden), in pipeline order."""
    return tuple(stage for stage, hooks in STAGE_HOOKS.items()
                 if any(getattr(cls, h) is not getattr(Stage, h) for h in hooks))


def computes_attention(stage: Any) -> bool:
    """Whether a stage (class or instance) may replace the dense attention computation: it
    overrides ``prefill_attention`` or ``decode_attention``."""
    cls = stage if isinstance(stage, type) else type(stage)
    return any(getattr(cls, hook) is not getattr(Stage, hook) for hook in ("prefill_attention", "decode_attention"))


def acts_on_cache(stage: Any) -> bool:
    """Whether a stage (class or instance) works on the cache or on attention — a cache, decode or
    sparse-prefill stage — rather than on the text or the inputs only (what :attr:`Stage.latent_cache`
    is asked of)."""
    return bool(set(stage.stages) & {"cache", "decode", "prefill_attention"})


def accepts_keyword(function: Any, name: str) -> bool:
    """Whether ``function`` can be called with the keyword argument ``name``."""
    import inspect

    params = inspect.signature(function).parameters.values()
    return any(p.kind is p.VAR_KEYWORD or (p.name == name and p.kind is not p.POSITIONAL_ONLY) for p in params)


def declaration_errors(cls: Any) -> list[str]:
    """What is wrong with ``cls`` as a registered method (empty when nothing is)."""
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        return [f"{cls!r} is not a subclass of lcbench.methods.base.Stage"]
    errors = []
    if not cls.name:
        errors.append("it sets no `name`")
    elif any(c in cls.name for c in "+,.: =;"):
        errors.append(f"its name {cls.name!r} contains one of '+,.: =;' (they separate chains and arguments)")
    if not cls.family:
        errors.append(f"it sets no `family` (one of {', '.join(FAMILIES)}); without one its ratio has no meaning")
    elif cls.family not in FAMILIES:
        errors.append(f"its family {cls.family!r} is not one of {', '.join(FAMILIES)}")
    declared, hooked = set(cls.stages), set(overridden_stages(cls))
    for stage in sorted(declared - set(STAGES)):
        errors.append(f"it declares an unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    for stage in sorted((declared & set(STAGES)) - hooked):
        errors.append(f"it declares the stage {stage!r} but overrides none of its hooks "
                      f"({' / '.join(STAGE_HOOKS[stage])}), so it would never be called")
    for stage in sorted(hooked - declared):
        errors.append(f"it overrides {' / '.join(h for h in STAGE_HOOKS[stage] if getattr(cls, h) is not getattr(Stage, h))} "
                      f"but its `stages` leaves out {stage!r}, so that hook would never be called "
                      f"(drop the `stages` line: stages follow the hooks)")
    for term in sorted(set(cls.attention_terms) - set(ATTENTION_TERMS)):
        errors.append(f"its `attention_terms` name {term!r}, which is not one of {', '.join(ATTENTION_TERMS)}")
    if cls.attention_terms and not computes_attention(cls):
        errors.append("it declares `attention_terms` but computes no attention (no prefill_attention / "
                      "decode_attention hook)")
    for hook in ("prefill_attention", "decode_attention"):
        if cls.attention_terms and getattr(cls, hook) is not getattr(Stage, hook):
            missing = [t for t in sorted(cls.attention_terms) if not accepts_keyword(getattr(cls, hook), t)]
            if missing:
                errors.append(f"its `attention_terms` name {', '.join(missing)}, but its {hook} takes no such "
                              f"keyword (the engine passes `{missing[0]}=`)")
    names = [p.name for p in cls.params]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"it declares the parameter {dup!r} twice")
    for unknown in sorted(set(cls.__dict__.get("defaults") or {}) - set(names)):
        errors.append(f"its `defaults` set {unknown!r}, which is not one of its params ({', '.join(names) or 'none'})")
    for p in cls.params:
        if p.default is None:
            errors.append(f"its parameter {p.name!r} has no default (give the Param one, or set it in `defaults`)")
    return errors


def keep_count(length: int, ratio: float) -> int:
    """Tokens to keep out of ``length`` when the fraction ``ratio`` is removed (at least 1)."""
    return max(1, min(length, int(round(length * (1.0 - ratio)))))
