"""Switching a loaded model to lcbench's attention, and checking the switch took (the engine's
side of :mod:`lcbench.models.hook`).

The engine owns its attention function (:mod:`.attention`, registered with transformers'
``AttentionInterface``), so attaching it to a model is the engine's job: the models layer loads
weights and never imports the engine.
"""

from __future__ import annotations

import torch

from ..cache.model_caches import cache_for
from ..cache.recurrent import RecurrentLayer
from ..errors import UserError
from ..methods.base import acts_on_cache, computes_attention
from ..models.hook import (
    Geometry,
    IDLE_LAYER_TYPES,
    HookProbe,
    LayerCall,
    arch_name,
    config_refusal,
    text_config,
)
from . import attention
from .decode import forward
from .state import ForwardState


def attention_refusal(model, stages) -> str | None:
    """Why a stage that computes attention itself (sparse prefill, sparse decode) cannot run on
    ``model``: the model applies an attention-logit softcap (Gemma-2), a learned sink column
    (gpt-oss) or chunked attention (Llama-4) that the stage's own computation does not (it does not
    list it in :attr:`~lcbench.methods.base.Stage.attention_terms`), so on such a model it would silently
    compute other numbers than the model's attention. None when nothing stands in the way: the
    model has neither, the stage applies what it has, or the stage is at ratio 0 (it never replaces
    dense attention then)."""
    geometry = getattr(model, "lcbench_geometry", None)
    if geometry is None or not (geometry.softcap or geometry.sinks or any(geometry.chunks)):
        return None
    needed = {"softcap": geometry.softcap, "sinks": geometry.sinks, "chunk": any(geometry.chunks)}
    names = {"softcap": "an attention-logit softcap", "sinks": "learned attention sinks",
             "chunk": "chunked attention (a query sees only its own chunk)"}
    for stage in stages:
        if not (computes_attention(stage) and stage.ratio > 0):
            continue
        missing = [t for t, on in needed.items() if on and t not in getattr(stage, "attention_terms", ())]
        if missing:
            what = " and ".join(names[t] for t in missing)
            return (f"method '{stage.name}' computes attention itself (sparse {' and '.join(sorted(stage.stages))}) "
                    f"without {what}, which {arch_name(model)} applies: its numbers would not be "
                    f"this model's attention. Fix: a sparse method that applies it (`lcbench ls methods NAME` "
                    f"says), a method that compresses the cache instead (e.g. snapkv, kivi), or a model without it")
    return None


def latent_refusal(model, stages) -> str | None:
    """Why a stage cannot run on a model whose cache holds multi-head latents (DeepSeek-V2/V3's MLA,
    :attr:`Geometry.latent`): it acts on the cache or computes attention and does not declare
    :attr:`~lcbench.methods.base.Stage.latent_cache` (it reads cached slots as attention keys or
    values, e.g. key norms, key similarity, pages of keys, key channels), so on such a model it would
    compute on latents as if they were keys. None when nothing stands in the way (ratio 0 included:
    the stage then changes nothing)."""
    geometry = getattr(model, "lcbench_geometry", None)
    if geometry is None or not geometry.latent:
        return None
    for stage in stages:
        if acts_on_cache(stage) and not stage.latent_cache and (stage.ratio > 0 or stage.budget_tokens is not None):
            return (f"method '{stage.name}' reads the cache's slots as attention keys and values, but {arch_name(model)} "
                    f"caches a latent per token that its attention expands into keys and values (multi-head latent "
                    f"attention): its numbers would be computed on the latents. Fix: a method that runs on latent "
                    f"caches (`lcbench ls methods NAME` says; e.g. snapkv, streamingllm, kivi, int8, ashape), or a "
                    f"model with standard multi-head / grouped-query attention")
    return None


def hybrid_refusal(model, stages) -> str | None:
    """Why a stage cannot run on a hybrid model (:attr:`Geometry.recurrent`: linear-attention /
    state-space layers that keep a recurrent state and never call attention): it declares
    :attr:`~lcbench.methods.base.Stage.hybrid_layers` False, since its math takes every layer for an
    attention layer (at any ratio: its calibration alone walks every layer). None when nothing
    stands in the way."""
    geometry = getattr(model, "lcbench_geometry", None)
    if geometry is None or not (geometry.recurrent or geometry.reused):
        return None
    if geometry.recurrent:
        other = (f"{len(geometry.recurrent)} of {arch_name(model)}'s {len(geometry.windows)} layers are "
                 f"linear-attention / state-space layers that keep a recurrent state instead")
    else:
        other = (f"{len(geometry.reused)} of {arch_name(model)}'s {len(geometry.windows)} layers reuse an earlier "
                 f"layer's keys and values (KV sharing) and hold no cache of their own")
    for stage in stages:
        if not stage.hybrid_layers:  # even at ratio 0: its calibration would still walk every layer
            return (f"method '{stage.name}' takes every layer of the model for an attention layer with its own "
                    f"cache (it counts, calibrates or hooks them by layer), but {other}. Fix: a method that runs on "
                    f"hybrid models (`lcbench ls methods NAME` says; e.g. snapkv, pyramidkv, streamingllm, kivi, "
                    f"ashape), or a model whose layers are all attention layers with their own cache")
    return None


def attached(model) -> bool:
    """True once :func:`use_lcbench_attention` has switched ``model`` (and its probe passed)."""
    return getattr(model, "lcbench_geometry", None) is not None


def use_lcbench_attention(model, dense: str = "sdpa") -> None:
    """Route every attention call of ``model`` through lcbench's registered attention function,
    which computes dense attention with ``dense`` (``sdpa`` or ``eager``), then check with a 2-token
    probe that every layer really calls it (:func:`probe`; a model lcbench cannot take over raises
    :class:`UserError`) and record the model's geometry."""
    model.config.lcbench_dense_attention = dense
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text.lcbench_dense_attention = dense
    model.set_attn_implementation(attention.registered(attention.ATTENTION_NAME, attention.lcbench_attention))
    # never trust the switch silently: every layer must call lcbench's attention
    model.lcbench_geometry = probe(model)


def probe(model) -> Geometry:
    """Run 2 tokens through lcbench's path and check every layer called lcbench's attention once;
    return the model's :class:`Geometry`. Raises
    :class:`UserError` (with the reason) for a model lcbench cannot take over."""
    reason = config_refusal(model.config)
    if reason:
        raise UserError(f"{arch_name(model)}: {reason}")
    layers = text_config(model).num_hidden_layers
    cache = cache_for(model, layers)
    seen = HookProbe()
    state = ForwardState(cache=cache, stages=[], probe=seen)
    device = next(model.parameters()).device
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    pos = torch.arange(2, device=device)[None]
    try:
        with torch.inference_mode():
            forward(model, ids, pos, state)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means lcbench cannot run this model
        raise UserError(
            f"{arch_name(model)} does not run under lcbench's attention ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). lcbench cannot evaluate it. Fix: use a model "
            f"whose attention goes through transformers' attention interface (README, supported architectures)."
        ) from None
    recurrent = tuple(i for i in range(layers) if isinstance(cache.layers[i], RecurrentLayer))
    stateful = tuple(sorted({*recurrent, *cache.side_states}))
    if len(recurrent) == layers:
        raise UserError(
            f"{arch_name(model)} has no attention layer (every layer keeps a recurrent state: a pure state-space or "
            f"linear-attention model), so it has no KV cache for any method to compress. Fix: use a model with "
            f"attention layers (hybrids such as Qwen3-Next or Jamba run; README, supported architectures).")
    idle = {i for i, kind in enumerate(getattr(text_config(model), "layer_types", None) or ()) if kind in IDLE_LAYER_TYPES}
    missing = [i for i in range(layers) if seen.layers.get(i, LayerCall()).calls == 0 and i not in recurrent
               and i not in idle]
    if missing:
        raise UserError(
            f"{arch_name(model)} computes attention with its own code: layers {_ranges(missing)} of {layers} never "
            f"called lcbench's attention function, so no method could act on them and `full` would not be "
            f"lcbench's measurement. lcbench cannot evaluate this architecture. Fix: use a model whose attention "
            f"goes through transformers' attention interface (README, supported architectures)."
        )
    twice = [i for i, r in seen.layers.items() if r.calls != 1]
    if twice or seen.unindexed:
        raise UserError(
            f"{arch_name(model)} calls attention more than once per layer and pass (layers {_ranges(sorted(twice))}; "
            f"{seen.unindexed} calls without a layer index): lcbench's per-layer cache cannot follow it. "
            f"Fix: use a supported architecture (README)."
        )
    calls = [seen.layers.get(i, LayerCall()) for i in range(layers)]
    reused = tuple(i for i, r in enumerate(calls) if r.reused)
    if getattr(text_config(model), "num_kv_shared_layers", 0) and not reused:
        raise UserError(
            f"{arch_name(model)}'s config shares keys and values between layers (num_kv_shared_layers="
            f"{text_config(model).num_kv_shared_layers}), but no attention module says which (is_kv_shared_layer): "
            f"lcbench would cache and compress layers the model does not. Fix: use a supported architecture (README).")
    per_token = tuple(cache.layers[i].nbytes() // 2 for i in range(layers))
    return Geometry(tuple(r.window for r in calls), per_token, any(r.softcap for r in calls),
                    any(r.sinks for r in calls), tuple(r.chunk for r in calls), latent=any(r.latent for r in calls),
                    recurrent=recurrent, stateful=stateful, state_bytes=cache.state_nbytes(),
                    stepwise=bool(stateful) and continues_inexactly(model, layers, device), reused=reused)


def continues_inexactly(model, layers: int, device) -> bool:
    """Whether the model's recurrent layers continue a state over several tokens less exactly than
    token by token (transformers' PyTorch Mamba paths of Jamba and Bamba start such a pass's scan
    afresh): 8 random tokens in one pass against 4 + 4 and against 4 + 1 + 1 + 1 + 1."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    pos = torch.arange(8, device=device)[None]

    def last_logits(parts: list[int]) -> torch.Tensor:
        state, start = ForwardState(cache=cache_for(model, layers), stages=[]), 0
        with torch.inference_mode():
            for n in parts:
                logits = forward(model, ids[:, start:start + n], pos[:, start:start + n], state)
                start += n
        return logits.float()

    whole = last_logits([8])
    continued = (last_logits([4, 4]) - whole).abs().max()
    stepped = (last_logits([4, 1, 1, 1, 1]) - whole).abs().max()
    return bool(continued > 10 * stepped + 1e-4 * whole.abs().max())


def _ranges(idx: list[int]) -> str:
    return ", ".join(map(str, idx[:8])) + (" …" if len(idx) > 8 else "")
