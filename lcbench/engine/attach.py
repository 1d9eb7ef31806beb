"""Switching a loaded model to lcbench's attention, and checking the switch took (the engine's
side of :mod:`lcbench.models.hook`).

The engine owns its attention function (:mod:`.attention`, registered with transformers'
``AttentionInterface``), so attaching it to a model is the engine's job: the models layer loads
weights and never imports the engine.
"""

from __future__ import annotations

import torch

from ..cache import KVCache
from ..errors import UserError
from ..methods.base import acts_on_cache, computes_attention
from ..models.hook import (
    Geometry,
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
    model.set_attn_implementation(attention.ATTENTION_NAME)
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
    cache = KVCache(layers)
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
    missing = [i for i in range(layers) if seen.layers.get(i, LayerCall()).calls == 0]
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
    calls = [seen.layers[i] for i in range(layers)]
    per_token = tuple(cache.layers[i].nbytes() // 2 for i in range(layers))
    return Geometry(tuple(r.window for r in calls), per_token, any(r.softcap for r in calls),
                    any(r.sinks for r in calls), tuple(r.chunk for r in calls), latent=any(r.latent for r in calls))


def _ranges(idx: list[int]) -> str:
    return ", ".join(map(str, idx[:8])) + (" …" if len(idx) > 8 else "")
