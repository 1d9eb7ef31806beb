"""Checking, right after loading, that lcbench really computes the model's attention.

``set_attn_implementation("lcbench")`` is a request, not a guarantee: a model may keep its own
attention code (Falcon). The engine's probe (:func:`lcbench.engine.attach.probe`) runs a 2-token
forward through the engine's path and counts the calls of lcbench's attention function per layer
in a :class:`HookProbe`; every layer must call it exactly once. What the calls carried (sliding
window per layer, softcap, sinks), the bytes one token takes in each layer's dense cache, and
whether the cache holds the attention's keys and values or a latent the model expands them from
(multi-head latent attention, DeepSeek-V2/V3: :attr:`Geometry.latent`) are kept on the model as
its :class:`Geometry` — the reference a compressed cache is measured against (a sliding-window
layer's full cache holds at most ``window - 1`` context tokens). This module holds what the
models layer needs without the engine: the records, and :func:`config_refusal`, which refuses
from the config alone, before any weights are fetched.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerCall:
    calls: int = 0
    window: int | None = None
    chunk: int | None = None
    softcap: float | None = None
    sinks: bool = False
    latent: bool = False  # the layer stores something else than the keys/values attention receives (MLA)
    reused: bool = False  # the layer attends over an earlier layer's keys and values (KV sharing)


def reuses_kv(module) -> bool:
    """Whether the attention ``module`` attends over an earlier layer's keys and values and caches
    none of its own (KV sharing: Gemma-3n/4's ``is_kv_shared_layer``; engine/kv_sharing.py)."""
    return bool(getattr(module, "is_kv_shared_layer", False))


def produces_shared_kv(module) -> bool:
    """Whether later layers reuse the attention ``module``'s keys and values (``store_full_length_kv``)."""
    return bool(getattr(module, "store_full_length_kv", False))


@dataclass
class HookProbe:
    """Filled by :func:`lcbench.engine.attention.lcbench_attention` when a ForwardState carries it."""

    layers: dict[int, LayerCall] = field(default_factory=dict)
    unindexed: int = 0  # calls from modules without a layer_idx

    def seen(self, module, query, key, value, call, stored=None, layer_idx: int | None = None) -> None:
        """Record one attention call of layer ``layer_idx`` (the module's own index by default);
        ``stored`` is the cache layer the call's keys/values came from (its held tensors are
        compared with what attention received: :attr:`LayerCall.latent`)."""
        idx = getattr(module, "layer_idx", None) if layer_idx is None else layer_idx
        if idx is None:
            self.unindexed += 1
            return
        rec = self.layers.setdefault(int(idx), LayerCall())
        rec.calls += 1
        rec.window, rec.chunk, rec.softcap, rec.sinks = call.window, call.chunk, call.softcap, call.sinks is not None
        rec.reused = reuses_kv(module)
        held = getattr(stored, "keys", None), getattr(stored, "values", None)
        if held[0] is not None and held[1] is not None:
            rec.latent = held[0].shape[1:] != key.shape[1:] or held[1].shape[1:] != value.shape[1:]


@dataclass(frozen=True)
class Geometry:
    """Per layer: the sliding window (None: global attention), the attention chunk (Llama-4's
    chunked layers; None elsewhere) and the bytes one token's keys and values take in a dense
    cache, as measured by the probe. ``latent``: the cache holds a compressed latent per token that
    the model expands into every head's keys and values before each attention call (multi-head
    latent attention: DeepSeek-V2/V3's ``kv_a_proj_with_mqa`` latent and shared rotary key, cached
    as one "head" and expanded by ``kv_b_proj``), so a cache layer's slots are not attention keys:
    only stages that declare :attr:`~lcbench.methods.base.Stage.latent_cache` run on it."""

    windows: tuple[int | None, ...]
    bytes_per_token: tuple[int, ...]
    softcap: bool = False
    sinks: bool = False
    chunks: tuple[int | None, ...] = ()
    latent: bool = False
    recurrent: tuple[int, ...] = ()  # layers keeping a linear-attention / state-space state instead of KV (hybrids)
    stateful: tuple[int, ...] = ()  # layers keeping such a state, beside KV or instead of it (Falcon-H1: beside)
    state_bytes: int = 0  # bytes of those layers' states for one row (fixed: they do not grow with tokens)
    # those layers continue a state over several tokens inexactly (transformers' PyTorch Mamba paths of
    # Jamba and Bamba): a pass continuing a state feeds its tokens one at a time (engine/decode.forward)
    stepwise: bool = False
    reused: tuple[int, ...] = ()  # layers attending over an earlier layer's keys and values (KV sharing): no cache

    def visible(self, layer: int, tokens: int) -> int:
        """Tokens of a ``tokens``-long context (true positions 0 … tokens − 1) that layer ``layer``
        still holds for later queries: all on a global layer, the last ``window − 1`` on a sliding
        one, on a chunked one those of the chunk the next position is in (at least one: a context
        that ends on a chunk boundary leaves its newest token, masked; engine/attention.drop_unseeable)."""
        w = self.windows[layer]
        c = self.chunks[layer] if layer < len(self.chunks) else None
        if w:
            return min(tokens, w - 1)
        if c and tokens:
            return max(1, tokens % c)
        return tokens

    def dense_bytes(self, tokens: int) -> int:
        """Bytes of the uncompressed cache after a ``tokens``-long context: every global layer holds
        all of them, a sliding-window layer the ``window - 1`` it can still see, a chunked layer its
        last chunk's."""
        return sum(self.visible(i, tokens) * b for i, b in enumerate(self.bytes_per_token))

    def describe(self) -> str:
        windowed = sorted({w for w in self.windows if w})
        parts = [f"{len(self.windows)} layers"]
        if windowed:
            parts.append(f"{sum(1 for w in self.windows if w)} with sliding window {', '.join(map(str, windowed))}")
        chunked = sorted({c for c in self.chunks if c})
        if chunked:
            parts.append(f"{sum(1 for c in self.chunks if c)} with chunked attention {', '.join(map(str, chunked))}")
        if self.softcap:
            parts.append("attention softcap")
        if self.sinks:
            parts.append("learned attention sinks")
        if self.latent:
            parts.append("multi-head latent attention (a latent cached per token)")
        if self.reused:
            parts.append(f"{len(self.reused)} reusing an earlier layer's keys and values (KV sharing)")
        if self.stateful:
            size = f"{self.state_bytes / 2**20:.1f} MiB" if self.state_bytes >= 2**20 else f"{self.state_bytes / 2**10:.1f} KiB"
            n, beside = len(self.recurrent), len(self.stateful) - len(self.recurrent)
            what = [f"{n} linear-attention / state-space layer{'s' if n != 1 else ''}"] if n else []
            if beside:
                what.append(f"{beside} layer{'s' if beside != 1 else ''} with a state-space mixer beside attention")
            parts.append(f"{' and '.join(what)} holding {size} of recurrent state per row")
        return ", ".join(parts)


# refused by the config alone (before any weights are fetched); the probe refuses the rest
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
# a hybrid's "linear_attention" (gated delta rule, Mamba) and "conv" layers keep a recurrent state
# (cache/recurrent.py; the probe finds them); "mlp" / "moe" layers (Nemotron-H) have no token mixer
RECURRENT_LAYER_TYPES = {"linear_attention", "conv"}
IDLE_LAYER_TYPES = {"mlp", "moe"}
# layers running attention and a state-space mixer side by side (Falcon-H1, Zamba): KV and a state beside it
HYBRID_LAYER_TYPES = {"hybrid", "hybrid_sliding"}


def keeps_state(cfg) -> bool:
    """True when the config's layers keep a recurrent state (linear attention, Mamba, short convolution,
    alone or beside attention): a cache of such a model cannot be cropped back."""
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return bool(set(getattr(text, "layer_types", None) or ()) & (RECURRENT_LAYER_TYPES | HYBRID_LAYER_TYPES))


def config_refusal(cfg) -> str | None:
    """Why lcbench refuses a model of this config, or None. Only what the config proves; the
    post-load probe checks the rest."""
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    model_type = getattr(text, "model_type", "") or getattr(cfg, "model_type", "")
    if getattr(text, "alibi", False) is True:  # Falcon-RW: FalconModel.forward adds the bias to the mask
        return (f"its config sets alibi=True: {model_type or 'the model'} adds its ALiBi position bias to the attention "
                f"mask, and lcbench's attention builds its mask from what each layer holds, so the bias would be lost "
                f"and `full` would not be the model. Fix: use a rotary-position model (Falcon-7B, -40B and -180B "
                f"have alibi=False; README, supported architectures).")
    types = set(getattr(text, "layer_types", None) or ())
    kinds = types - _ATTENTION_LAYER_TYPES - RECURRENT_LAYER_TYPES - IDLE_LAYER_TYPES - HYBRID_LAYER_TYPES
    if kinds:
        return (f"its layers include {', '.join(sorted(kinds))}, which lcbench's attention does not implement "
                f"(only full, sliding-window and chunked attention, and linear-attention / state-space layers beside "
                f"them). Fix: use a supported architecture (README).")
    if types and not types & (_ATTENTION_LAYER_TYPES | HYBRID_LAYER_TYPES):
        return (f"it has no attention layer (its layers are {', '.join(sorted(types))}: a pure state-space or "
                f"linear-attention model), so it has no KV cache for any method to compress. Fix: use a model with "
                f"attention layers (hybrids such as Qwen3-Next, Qwen3.5 or Jamba run; README, supported architectures).")
    return None


def text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def arch_name(model) -> str:
    return f"{type(model).__name__} (model_type '{getattr(model.config, 'model_type', '?')}')"


def geometry(model) -> Geometry | None:
    """The :class:`Geometry` recorded when lcbench attention was switched on (None before)."""
    return getattr(model, "lcbench_geometry", None)
